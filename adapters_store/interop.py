"""Import adapters trained elsewhere (a PEFT directory, or a legacy `<name>.pt` of the original system)
into a store, and export a revision as a plain PEFT directory.

Only safetensors and `torch.load(weights_only=True)` are used: a pickle that would run code is refused
before anything of it runs. Knows nothing about models; validation is the store's (validate.py).
"""
from __future__ import annotations

import json
import logging
import pickle
import re

import fsspec
import torch

from adapters_store.backends import ProgressCallback
from adapters_store.errors import UnsafeFileError
from adapters_store.names import validate_name
from adapters_store.safetensors_io import encode
from adapters_store.store import AdapterStore
from adapters_store.validate import CONFIG_FILE, LORA_KEY, MODEL_FILE, Where, decode_file

logger = logging.getLogger(__name__)

# Legacy key spellings: optional PEFT prefix, the module path, lora_A/lora_B (any case), then
# optionally PEFT's adapter name "default" and/or ".weight".
LEGACY_KEY = re.compile(
    r"(?:base_model\.model\.)?((?:[A-Za-z0-9_]+\.)*[A-Za-z0-9_]+)\.lora_([AaBb])(?:\.default)?(?:\.weight)?")


def _read(url: str) -> bytes:
    with fsspec.open(url, "rb") as handle:
        return handle.read()


def import_peft_dir(store: AdapterStore, path: str, name: str, *,
                    progress: ProgressCallback | None = None) -> str:
    """Commit the PEFT adapter directory at `path` (local or fsspec URL) as a new revision of `name`."""
    where = Where(validate_name(name), None)
    base = path.rstrip("/")
    try:
        config = json.loads(_read(f"{base}/{CONFIG_FILE}"))
        model_bytes = _read(f"{base}/{MODEL_FILE}")
    except FileNotFoundError as exc:
        raise where.invalid(None, f"{path} is not a PEFT adapter directory (needs {CONFIG_FILE} and "
                                  f"{MODEL_FILE}): {exc}") from None
    except json.JSONDecodeError as exc:
        raise where.corrupt(CONFIG_FILE, f"not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise where.invalid(CONFIG_FILE, "config is not a JSON object")
    tensors = decode_file(where, MODEL_FILE, bytearray(model_bytes))
    # PEFT may save keys with the adapter name ("...lora_A.default.weight"); normalize those.
    tensors = {_normalize_key(where, key): value for key, value in tensors.items()}
    return store.commit(name, tensors, config=config, parent=store.latest(name),
                        meta={"imported_from": path}, progress=progress)


def _normalize_key(where: Where, key: str) -> str:
    """The PEFT saved-key form of a LoRA key written in any of the accepted spellings."""
    if LORA_KEY.fullmatch(key):
        return key
    match = LEGACY_KEY.fullmatch(key)
    if match is None:
        raise where.invalid(MODEL_FILE, f"tensor {key!r} is not a LoRA A/B weight of a module")
    module, factor = match.groups()
    return f"base_model.model.{module}.lora_{factor.upper()}.weight"


def load_legacy_pt(path: str) -> tuple[dict[str, torch.Tensor], dict]:
    """(lora_state, metadata) of a legacy `.pt` file, loaded without executing any pickled code."""
    where = Where(None, None)
    try:
        with fsspec.open(path, "rb") as handle:
            payload = torch.load(handle, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights only" in str(exc).lower() or "unsupported global" in str(exc).lower():
            raise UnsafeFileError(f"{path}: refused, the pickle would need code execution to load "
                                  f"({str(exc).splitlines()[0][:200]})") from None
        raise where.corrupt(path, f"not a readable torch file: {exc}") from None
    except (RuntimeError, EOFError, ValueError) as exc:
        raise where.corrupt(path, f"not a readable torch file: {exc}") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("lora_state"), dict):
        raise where.invalid(path, "expected a dict with a 'lora_state' dict of tensors")
    metadata = payload.get("metadata") if isinstance(payload.get("metadata"), dict) else {}
    return payload["lora_state"], metadata


def legacy_to_peft(name: str, lora_state: dict, metadata: dict) -> tuple[dict, dict]:
    """(PEFT-keyed tensors, LoraConfig dict) for a legacy lora_state; unknown keys are an error."""
    where = Where(name, None)
    tensors = {}
    for key, value in lora_state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise where.invalid(MODEL_FILE, f"legacy entry {key!r} is not a named tensor")
        tensors[_normalize_key(where, key)] = value
    a_shapes = [t.shape for k, t in tensors.items() if k.endswith(".lora_A.weight") and t.dim() == 2]
    if not a_shapes:
        raise where.invalid(MODEL_FILE, "no lora_A tensors in the legacy file")
    rank = int(metadata.get("lora_rank") or metadata.get("rank") or a_shapes[0][0])
    alpha = metadata.get("lora_alpha") or metadata.get("alpha")
    if alpha is None:
        alpha = 2.0 * rank
        logger.warning("adapter %s: legacy metadata has no lora_alpha; using 2 * rank = %s", name, alpha)
    targets = sorted({LORA_KEY.fullmatch(k).group(2) for k in tensors})
    config = {"r": rank, "lora_alpha": alpha, "target_modules": targets,
              "base_model_name_or_path": metadata.get("model_path") or metadata.get("model")}
    return tensors, config


def import_legacy_pt(store: AdapterStore, path: str, name: str, *,
                     progress: ProgressCallback | None = None) -> str:
    """Commit a legacy `<name>.pt` ({'lora_state': ..., 'metadata': ...}) as a new revision."""
    validate_name(name)
    lora_state, metadata = load_legacy_pt(path)
    tensors, config = legacy_to_peft(name, lora_state, metadata)
    extra = {k: v for k, v in metadata.items() if isinstance(v, (str, int, float, bool, type(None)))}
    return store.commit(name, tensors, config=config, parent=store.latest(name),
                        meta={**extra, "imported_from": path}, progress=progress)


def import_path(store: AdapterStore, path: str, name: str, *,
                progress: ProgressCallback | None = None) -> str:
    """Import a `.pt` file or a PEFT directory, whichever `path` is."""
    if path.endswith(".pt") or path.endswith(".pth"):
        return import_legacy_pt(store, path, name, progress=progress)
    return import_peft_dir(store, path, name, progress=progress)


def export_revision(store: AdapterStore, name: str, dest: str, rev: str | None = None, *,
                    progress: ProgressCallback | None = None) -> str:
    """Write a validated revision to `dest` (a new or empty directory) as a PEFT adapter directory."""
    revision = store.read(name, rev)
    fs, root = fsspec.core.url_to_fs(dest)
    if fs.exists(root) and fs.ls(root):
        raise FileExistsError(f"export destination {dest} exists and is not empty")
    fs.makedirs(root, exist_ok=True)
    model_bytes = encode(revision.tensors)
    with fs.open(f"{root}/{MODEL_FILE}", "wb") as handle:
        for start in range(0, len(model_bytes), 8 * 2**20):
            chunk = memoryview(model_bytes)[start:start + 8 * 2**20]
            handle.write(chunk)
            if progress:
                progress(len(chunk))
    fs.pipe_file(f"{root}/{CONFIG_FILE}", json.dumps(revision.config, indent=2).encode())
    return revision.revision

