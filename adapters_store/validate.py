"""Validation of adapter revisions: checksums, PEFT LoRA config, tensor names/shapes/dtypes, finiteness.

Used on every read and before every commit, so nothing unchecked reaches a device or the store.
Every error names the adapter, the revision and the file (InvalidAdapterError / CorruptAdapterError
attributes and message). Knows nothing about where the bytes came from.
"""
from __future__ import annotations

import hashlib
import math
import re
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

from adapters_store.errors import CorruptAdapterError, InvalidAdapterError
from adapters_store.safetensors_io import SafetensorsFormatError, decode

if TYPE_CHECKING:
    import torch

MODEL_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
OPTIMIZER_FILE = "optimizer.safetensors"
META_FILE = "meta.json"

# PEFT's saved key for one LoRA factor of one module: "base_model.model.<module path>.lora_A.weight".
LORA_KEY = re.compile(r"base_model\.model\.((?:[A-Za-z0-9_]+\.)*([A-Za-z0-9_]+))\.lora_([AB])\.weight")


@dataclass(frozen=True)
class Where:
    """Which adapter/revision is being checked; builds errors that say so."""

    adapter: str | None
    revision: str | None

    def _text(self, file: str | None, problem: str) -> str:
        parts = [f"adapter {self.adapter!r}" if self.adapter else "adapter",
                 f"revision {self.revision}" if self.revision else None, file]
        return ", ".join(p for p in parts if p) + f": {problem}"

    def invalid(self, file: str | None, problem: str) -> InvalidAdapterError:
        return InvalidAdapterError(self._text(file, problem), adapter=self.adapter,
                                   revision=self.revision, file=file)

    def corrupt(self, file: str | None, problem: str) -> CorruptAdapterError:
        return CorruptAdapterError(self._text(file, problem), adapter=self.adapter,
                                   revision=self.revision, file=file)


def sha256_hex(data: bytes | bytearray | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_parts(parts: list[memoryview]) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part)  # hashlib releases the GIL for large buffers: this overlaps with I/O
    return digest.hexdigest()


class ChunkHasher:
    """sha256 of chunks fed in order. Large chunks are hashed on one worker thread, so hashing
    overlaps with reading the next chunk; small files are hashed inline."""

    LARGE = 2**20

    def __init__(self):
        self._digest = hashlib.sha256()
        self._pool: ThreadPoolExecutor | None = None
        self._pending: list[Future] = []

    def update(self, chunk: memoryview) -> None:
        if self._pool is None and len(chunk) < self.LARGE:
            self._digest.update(chunk)
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="sha256")
        self._pending.append(self._pool.submit(self._digest.update, chunk))

    def hexdigest(self) -> str:
        self.close()
        return self._digest.hexdigest()

    def close(self) -> None:
        if self._pool is not None:
            for future in self._pending:
                future.result()
            self._pool.shutdown()
            self._pool, self._pending = None, []


def check_checksum(where: Where, file: str, data: bytes | bytearray, expected: str | None,
                   actual: str | None = None) -> None:
    """Compare a file's sha256 (`actual` if already computed while reading) with the manifest."""
    if expected is None:
        raise where.corrupt(file, "no checksum in meta.json")
    actual = actual or sha256_hex(data)
    if actual != expected:
        raise where.corrupt(file, f"sha256 mismatch: expected {expected[:12]}..., got {actual[:12]}..."
                                  f" ({len(data)} bytes)")


def decode_file(where: Where, file: str, data: bytes | bytearray) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file, or CorruptAdapterError naming what is wrong."""
    try:
        tensors, _ = decode(data)
    except SafetensorsFormatError as exc:
        raise where.corrupt(file, str(exc)) from None
    return tensors


def validate_config(where: Where, config: object, max_rank: int) -> dict:
    """Check a PEFT LoraConfig dict; returns it unchanged."""
    if not isinstance(config, dict):
        raise where.invalid(CONFIG_FILE, "config is not a JSON object")
    if config.get("peft_type", "LORA") != "LORA":
        raise where.invalid(CONFIG_FILE, f"peft_type {config.get('peft_type')!r} is not LORA")
    rank = config.get("r")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= max_rank:
        raise where.invalid(CONFIG_FILE, f"rank r={rank!r} is outside 1..{max_rank}")
    alpha = config.get("lora_alpha")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) \
            or alpha <= 0:
        raise where.invalid(CONFIG_FILE, f"lora_alpha={alpha!r} must be a positive number")
    targets = config.get("target_modules")
    if not isinstance(targets, list) or not targets or not all(
            isinstance(t, str) and re.fullmatch(r"[A-Za-z0-9_]+", t) for t in targets):
        raise where.invalid(CONFIG_FILE, f"target_modules={targets!r} must be a non-empty list of "
                                         "module names")
    return config


def validate_lora_tensors(where: Where, tensors: dict[str, torch.Tensor], config: dict) -> None:
    """PEFT key names on target modules, A [r, in] / B [out, r] pairs, float dtype, finite values."""
    if not tensors:
        raise where.invalid(MODEL_FILE, "no tensors")
    rank, targets = config["r"], set(config["target_modules"])
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = LORA_KEY.fullmatch(key) if isinstance(key, str) else None
        if match is None:
            raise where.invalid(MODEL_FILE, f"tensor {key!r} is not a PEFT LoRA key "
                                            "(base_model.model.<module>.lora_A/B.weight)")
        module, leaf, factor = match.groups()
        if leaf not in targets:
            raise where.invalid(MODEL_FILE, f"tensor {key!r} matches no target module "
                                            f"({leaf!r} not in {sorted(targets)})")
        _check_tensor(where, key, tensor)
        pairs.setdefault(module, {})[factor] = tensor
    for module, pair in pairs.items():
        _check_pair(where, module, pair, rank)


def _check_tensor(where: Where, key: str, tensor: object) -> None:
    import torch

    if not isinstance(tensor, torch.Tensor):
        raise where.invalid(MODEL_FILE, f"tensor {key!r} is a {type(tensor).__name__}, not a tensor")
    if not tensor.is_floating_point():
        raise where.invalid(MODEL_FILE, f"tensor {key!r} has dtype {tensor.dtype}, expected a float")
    if tensor.dim() != 2:
        raise where.invalid(MODEL_FILE, f"tensor {key!r} has shape {list(tensor.shape)}, expected 2-D")
    # One summing pass finds any NaN/Inf (they make the sum non-finite); only a non-finite sum,
    # which an overflow of huge finite values could also cause, pays for the exact elementwise check.
    if not bool(torch.isfinite(tensor.sum())) and not bool(torch.isfinite(tensor).all()):
        raise where.invalid(MODEL_FILE, f"tensor {key!r} contains NaN or Inf values")


def _check_pair(where: Where, module: str, pair: dict[str, torch.Tensor], rank: int) -> None:
    if set(pair) != {"A", "B"}:
        missing = "lora_B" if "A" in pair else "lora_A"
        raise where.invalid(MODEL_FILE, f"module {module!r} has no {missing} tensor")
    lora_a, lora_b = pair["A"], pair["B"]  # A [r, in], B [out, r]
    if lora_a.shape[0] != rank or lora_b.shape[1] != rank or lora_a.shape[1] == 0 \
            or lora_b.shape[0] == 0:
        raise where.invalid(MODEL_FILE, f"module {module!r}: lora_A {list(lora_a.shape)} / lora_B "
                                        f"{list(lora_b.shape)} do not fit rank {rank} "
                                        "(expected A [r, in], B [out, r])")


def validate_optimizer_tensors(where: Where, tensors: dict[str, torch.Tensor]) -> None:
    """Optimizer state is opaque to the store, but must not smuggle NaN/Inf into training."""
    import torch

    for key, tensor in tensors.items():
        if not isinstance(key, str) or not isinstance(tensor, torch.Tensor):
            raise where.invalid(OPTIMIZER_FILE, f"optimizer entry {key!r} is not a named tensor")
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise where.invalid(OPTIMIZER_FILE, f"optimizer tensor {key!r} contains NaN or Inf values")
