"""Encode and decode the safetensors format from/to in-memory buffers, checking the header first.

Decoding never trusts the header: its length is checked against the file size before anything is
parsed or allocated, every tensor's byte range must lie inside the file and match dtype x shape.
Tensors are created as views of the buffer (no second copy of a large file). Knows nothing about
LoRA, PEFT keys or the store; callers turn SafetensorsFormatError into their own typed errors.
"""
from __future__ import annotations

import json
import math
import struct

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# safetensors dtype tag -> (torch dtype name, bytes per element). torch itself is imported only by
# the functions that make tensors, so that header checks (and the CLI's listing) start fast.
DTYPES: dict[str, tuple[str, int]] = {
    "F64": ("float64", 8), "F32": ("float32", 4), "F16": ("float16", 2), "BF16": ("bfloat16", 2),
    "I64": ("int64", 8), "I32": ("int32", 4), "I16": ("int16", 2), "I8": ("int8", 1),
    "U8": ("uint8", 1), "BOOL": ("bool", 1),
}
MAX_HEADER_BYTES = 64 * 2**20  # real adapter headers are kilobytes; larger claims are refused


class SafetensorsFormatError(ValueError):
    """The bytes are not a well-formed safetensors file (message says what is wrong)."""


def encode_parts(tensors: dict[str, torch.Tensor],
                 metadata: dict[str, str] | None = None) -> list[memoryview]:
    """A safetensors file as a list of buffers: the 8-byte length, the header (padded to 8 bytes),
    then each tensor's bytes as a view of the tensor itself (no copy of large data)."""
    import torch

    tags = {getattr(torch, name): tag for tag, (name, _) in DTYPES.items()}
    header: dict[str, object] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset, flat = 0, []
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        if tensor.dtype not in tags:
            raise SafetensorsFormatError(f"tensor {name!r}: unsupported dtype {tensor.dtype}")
        size = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": tags[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
        if size:
            flat.append(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)
    return [memoryview(struct.pack("<Q", len(header_bytes)) + header_bytes), *flat]


def encode(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """Serialize CPU tensors into one safetensors buffer."""
    return b"".join(encode_parts(tensors, metadata))


def parse_header(buffer: bytes | bytearray) -> tuple[dict[str, dict], dict, int]:
    """Validate and return (tensor entries, __metadata__, data start) of a safetensors buffer."""
    if len(buffer) < 8:
        raise SafetensorsFormatError(f"file is {len(buffer)} bytes, too short for a safetensors header")
    (header_len,) = struct.unpack("<Q", bytes(buffer[:8]))
    if header_len > len(buffer) - 8 or header_len > MAX_HEADER_BYTES:
        raise SafetensorsFormatError(
            f"header claims {header_len} bytes but the file has {len(buffer)} bytes")
    try:
        header = json.loads(bytes(buffer[8:8 + header_len]).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SafetensorsFormatError(f"header is not valid JSON: {exc}") from None
    if not isinstance(header, dict):
        raise SafetensorsFormatError("header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    data_len = len(buffer) - 8 - header_len
    for name, entry in header.items():
        _check_entry(name, entry, data_len)
    return header, metadata, 8 + header_len


def _check_entry(name: str, entry: object, data_len: int) -> None:
    """One header entry: known dtype, non-negative shape, byte range inside the data and sized right."""
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise SafetensorsFormatError(f"tensor {name!r}: malformed header entry")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in DTYPES:
        raise SafetensorsFormatError(f"tensor {name!r}: unsupported dtype {dtype!r}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise SafetensorsFormatError(f"tensor {name!r}: invalid shape {shape!r}")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) for o in offsets) or not 0 <= offsets[0] <= offsets[1]):
        raise SafetensorsFormatError(f"tensor {name!r}: invalid data offsets {offsets!r}")
    if offsets[1] > data_len:
        raise SafetensorsFormatError(
            f"tensor {name!r}: data ends at byte {offsets[1]} but the file holds {data_len} (truncated?)")
    expected = math.prod(shape) * DTYPES[dtype][1]
    if offsets[1] - offsets[0] != expected:
        raise SafetensorsFormatError(
            f"tensor {name!r}: {offsets[1] - offsets[0]} bytes for shape {shape} {dtype} "
            f"(expected {expected})")


def decode(buffer) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, metadata) of a safetensors buffer (bytes, or any writable buffer such as a bytearray
    or numpy array, which the tensors then view without a copy)."""
    import torch

    header, metadata, data_start = parse_header(buffer)
    if isinstance(buffer, bytes):
        buffer = bytearray(buffer)  # torch.frombuffer needs a writable buffer to avoid a warning
    tensors = {}
    for name, entry in header.items():
        (dtype_name, itemsize), (start, end) = DTYPES[entry["dtype"]], entry["data_offsets"]
        dtype = getattr(torch, dtype_name)
        if end == start:
            tensors[name] = torch.empty(entry["shape"], dtype=dtype)
            continue
        tensor = torch.frombuffer(buffer, dtype=dtype, count=(end - start) // itemsize,
                                  offset=data_start + start).view(entry["shape"])
        # Files written elsewhere may not align tensors to their element size; copy those.
        tensors[name] = tensor.clone() if (data_start + start) % itemsize else tensor
    return tensors, metadata
