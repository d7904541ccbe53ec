"""Constructor options of OnlineLLM / AsyncOnlineLLM, how the store is chosen, and LoRA config helpers.

Validates the original API's constructor arguments (pydantic, extra fields forbidden), opens the
adapter store from an object, a URL or `LORA_SAVE_PATH`, and derives a PEFT LoraConfig and metadata
checks from PEFT-keyed tensors. Knows nothing about the engine's internals or event loops.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Mapping

from pydantic import BaseModel, ConfigDict, Field

from adapters_store.errors import OnlineLLMError

logger = logging.getLogger(__name__)

# Errors a store operation may raise that mean "the stored copy or the store is unusable now":
# management methods turn them into False / None / disk_error instead of crashing the caller.
STORE_FAILURES = (OnlineLLMError, OSError, ValueError)


class ApiOptions(BaseModel):
    """The original API's constructor options; `temperature`/`max_tokens` are `generate` defaults."""

    model_config = ConfigDict(extra="forbid")

    temperature: float = Field(0.0, ge=0.0, le=10.0,
                               description="default sampling temperature for generate; 0 is greedy")
    max_tokens: int = Field(64, ge=1, le=1_000_000, description="default cap on generated tokens")
    lora_rank: int = Field(16, ge=1, le=256, description="rank of new adapters")
    lora_alpha: float = Field(32.0, gt=0.0, le=1_000_000.0,
                              description="LoRA alpha of new adapters (scale = alpha / rank)")


@dataclass(frozen=True)
class OpenedStore:
    """The store to use (None: memory only), where it is, and why it could not be opened."""

    store: Any | None
    location: str | None
    error: str | None = None


def open_api_store(store: Any) -> OpenedStore:
    """`store`: an AdapterStore, a path/URL, None (use LORA_SAVE_PATH) or False (memory only).

    A store that cannot be opened is logged and the API runs memory-only, never crashing.
    """
    if store is False:
        return OpenedStore(None, None)
    if store is not None and not isinstance(store, (str, os.PathLike)):
        return OpenedStore(store, getattr(store, "url", None))
    location = os.fspath(store) if store is not None else (os.environ.get("LORA_SAVE_PATH") or None)
    if location is None:
        return OpenedStore(None, None)
    from adapters_store import open_store

    try:
        return OpenedStore(open_store(location), location)
    except STORE_FAILURES as exc:
        logger.error("adapter store %s cannot be opened, running memory-only: %s", location, exc)
        return OpenedStore(None, location, f"{type(exc).__name__}: {exc}")


def split_peft_key(key: str) -> tuple[str, str] | None:
    """'base_model.model.<path>.lora_A.weight' -> (path, 'A'); None for other keys."""
    prefix, suffix_a, suffix_b = "base_model.model.", ".lora_A.weight", ".lora_B.weight"
    if not key.startswith(prefix):
        return None
    for suffix, which in ((suffix_a, "A"), (suffix_b, "B")):
        if key.endswith(suffix):
            return key[len(prefix):-len(suffix)], which
    return None


def lora_config_for(tensors: Mapping[str, Any], *, alpha: float, base_model: str,
                    use_rslora: bool = False) -> dict:
    """The PEFT LoraConfig fields for PEFT-keyed tensors: rank from lora_A [r, in], targets by name;
    ValueError for keys or shapes that are not LoRA's."""
    ranks, targets = set(), set()
    for key, tensor in tensors.items():
        parsed = split_peft_key(key)
        if parsed is None:
            raise ValueError(f"tensor {key!r} is not a PEFT LoRA key (base_model.model.<module>.lora_A/B.weight)")
        if tensor.dim() != 2:
            raise ValueError(f"tensor {key!r} has shape {tuple(tensor.shape)}; LoRA matrices are 2-d")
        targets.add(parsed[0].rsplit(".", 1)[-1])
        if parsed[1] == "A":
            ranks.add(int(tensor.shape[0]))
    if len(ranks) != 1:
        raise ValueError(f"expected one LoRA rank across lora_A tensors, found {sorted(ranks)}")
    return {"r": ranks.pop(), "lora_alpha": alpha, "use_rslora": bool(use_rslora),
            "target_modules": sorted(targets), "base_model_name_or_path": base_model}


def metadata_mismatches(meta: Mapping[str, Any], *, model_id: str, rank: int, alpha: float) -> list[str]:
    """Human-readable differences between a stored adapter's metadata and this API's settings."""
    found = []
    stored_model = meta.get("model_path") or meta.get("base_model_name_or_path")
    if stored_model and str(stored_model) != str(model_id):
        found.append(f"trained on base model {stored_model!r}, serving {model_id!r}")
    if meta.get("lora_rank") is not None and int(meta["lora_rank"]) != rank:
        found.append(f"lora_rank {meta['lora_rank']} differs from the configured {rank}")
    if meta.get("lora_alpha") is not None and float(meta["lora_alpha"]) != float(alpha):
        found.append(f"lora_alpha {meta['lora_alpha']} differs from the configured {alpha}")
    return found


def cpu_tensors(state: Mapping[str, Any]) -> dict:
    """Detached, contiguous CPU copies of a tensor mapping; TypeError for anything else."""
    import torch

    if not isinstance(state, Mapping):
        raise TypeError(f"lora_state must be a dict of tensors, got {type(state).__name__}")
    result = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"lora_state[{key!r}] is {type(value).__name__}, not a tensor")
        result[str(key)] = value.detach().to("cpu").contiguous()
    return result


def report_as_dict(report: Any) -> dict:
    """The engine's LearnReport as a plain dict (JSON-able, usable as a mapping)."""
    if hasattr(report, "to_dict"):
        return dict(report.to_dict())
    if isinstance(report, Mapping):
        return dict(report)
    import dataclasses

    return dataclasses.asdict(report)
