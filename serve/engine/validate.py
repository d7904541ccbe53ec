"""Checks adapter tensors against this engine's model before anything reaches the device, and converts
between PEFT-keyed tensor dicts and per-module (A, B) pairs.

Knows the PEFT key format and the wrapped modules' shapes; knows nothing about tiers or stores.
"""
from __future__ import annotations

import logging
import math

import torch

from adapters_store.errors import InvalidAdapterError
from serve.engine.lora import PEFT_KEY, peft_key

logger = logging.getLogger(__name__)

ModuleShapes = dict[str, tuple[int, int]]   # module path -> (in_features, out_features)
Weights = dict[str, tuple[torch.Tensor, torch.Tensor]]  # module path -> (A [r, in], B [out, r])


def _split_keys(tensors: dict, shapes: ModuleShapes, ref: str) -> dict[str, dict[str, torch.Tensor]]:
    """Group PEFT keys by module path; unknown keys or modules are errors, never ignored."""
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = PEFT_KEY.match(key) if isinstance(key, str) else None
        if match is None:
            raise InvalidAdapterError(f"{ref}: tensor {str(key)[:120]!r} is not a PEFT LoRA key",
                                      adapter=ref)
        module = match.group("module")
        if module not in shapes:
            raise InvalidAdapterError(f"{ref}: tensor {key!r} matches no LoRA target module of this model",
                                      adapter=ref)
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
            raise InvalidAdapterError(f"{ref}: tensor {key!r} is not a floating-point tensor", adapter=ref)
        grouped.setdefault(module, {})[match.group("which")] = tensor
    return grouped


def _check_pair(module: str, pair: dict, shape: tuple[int, int], max_rank: int, ref: str) -> int:
    """Shape, rank and finiteness of one module's A/B; returns its rank."""
    if set(pair) != {"A", "B"}:
        raise InvalidAdapterError(f"{ref}: module {module} has lora_{set(pair).pop()} without its pair",
                                  adapter=ref)
    a, b = pair["A"], pair["B"]
    in_features, out_features = shape
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != in_features or b.shape[0] != out_features \
            or a.shape[0] != b.shape[1]:
        raise InvalidAdapterError(
            f"{ref}: {module} has A {tuple(a.shape)} / B {tuple(b.shape)}; this model needs "
            f"A [r, {in_features}] and B [{out_features}, r]", adapter=ref)
    rank = a.shape[0]
    if not 1 <= rank <= max_rank:
        raise InvalidAdapterError(f"{ref}: rank {rank} of {module} is outside 1..{max_rank}", adapter=ref)
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        raise InvalidAdapterError(f"{ref}: {module} contains NaN or Inf", adapter=ref)
    return rank


def to_weights(tensors: dict, shapes: ModuleShapes, max_rank: int, ref: str) -> tuple[Weights, int]:
    """Validate PEFT-keyed tensors; return fp32 CPU (A, B) per module and the adapter's rank."""
    if not tensors:
        raise InvalidAdapterError(f"{ref}: the adapter has no tensors", adapter=ref)
    grouped = _split_keys(tensors, shapes, ref)
    ranks = {module: _check_pair(module, pair, shapes[module], max_rank, ref)
             for module, pair in grouped.items()}
    if len(set(ranks.values())) != 1:
        raise InvalidAdapterError(f"{ref}: modules have different ranks {sorted(set(ranks.values()))}",
                                  adapter=ref)
    weights = {module: (pair["A"].detach(), pair["B"].detach()) for module, pair in grouped.items()}
    return pack(weights), next(iter(ranks.values()))


def pack(weights: Weights) -> Weights:
    """fp32 CPU copies of every (A, B), all views into ONE buffer: a host-tier adapter costs its
    bytes plus a few small objects, not one heap allocation per tensor."""
    total = sum(a.numel() + b.numel() for a, b in weights.values())
    buffer = torch.empty(total, dtype=torch.float32)
    packed: Weights = {}
    offset = 0
    for module, pair in weights.items():
        views = []
        for tensor in pair:
            view = buffer[offset:offset + tensor.numel()].view(tensor.shape)
            view.copy_(tensor.detach())
            views.append(view)
            offset += tensor.numel()
        packed[module] = (views[0], views[1])
    return packed


def to_peft(weights: Weights) -> dict[str, torch.Tensor]:
    """PEFT-keyed CPU copies of per-module (A, B)."""
    out: dict[str, torch.Tensor] = {}
    for module, (a, b) in weights.items():
        out[peft_key(module, "A")] = a.detach().to("cpu").clone()
        out[peft_key(module, "B")] = b.detach().to("cpu").clone()
    return out


def scale_from_config(config: dict, rank: int, default_alpha: float, ref: str) -> tuple[float, float]:
    """(alpha, scale) from a PEFT config: alpha / r, or alpha / sqrt(r) with use_rslora."""
    alpha = float(config.get("lora_alpha", default_alpha)) if config else float(default_alpha)
    if not math.isfinite(alpha) or alpha <= 0:
        raise InvalidAdapterError(f"{ref}: lora_alpha must be positive, got {alpha}", adapter=ref)
    stated = config.get("r") if config else None
    if stated is not None and stated != rank:
        logger.warning("%s: config says r=%s, tensors have rank %d; using the tensors", ref, stated, rank)
    scale = alpha / math.sqrt(rank) if config and config.get("use_rslora") else alpha / rank
    return alpha, scale


def fresh_weights(shapes: ModuleShapes, rank: int, seed: int) -> Weights:
    """PEFT's initialisation: A kaiming-uniform, B zero, so the output equals the base model's."""
    generator = torch.Generator().manual_seed(seed)
    weights: Weights = {}
    for module, (in_features, out_features) in shapes.items():
        bound = 1.0 / math.sqrt(in_features)  # kaiming_uniform_(a=sqrt(5)) on [r, in]
        a = (torch.rand(rank, in_features, generator=generator) * 2 - 1) * bound
        weights[module] = (a, torch.zeros(out_features, rank))
    return weights
