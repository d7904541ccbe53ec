"""Helpers that build small, valid LoRA tensor sets and configs for tests and benchmarks.

Knows the PEFT key convention only; nothing about stores or models.
"""
from __future__ import annotations

import torch

# A two-layer toy "model": module path -> (in_features, out_features).
TOY_MODULES = {
    f"model.layers.{layer}.self_attn.{proj}": (16, 16)
    for layer in range(2) for proj in ("q_proj", "v_proj")
}


def lora_key(module: str, factor: str) -> str:
    """PEFT's saved key of lora_A / lora_B of `module`."""
    return f"base_model.model.{module}.lora_{factor}.weight"


def random_lora(modules: dict[str, tuple[int, int]] | None = None, rank: int = 4, *, seed: int = 0,
                dtype: torch.dtype = torch.float32, scale: float = 0.1) -> dict[str, torch.Tensor]:
    """Random A [r, in] and B [out, r] per module (B non-zero, so the adapter changes outputs)."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for module, (in_features, out_features) in (modules or TOY_MODULES).items():
        tensors[lora_key(module, "A")] = (torch.randn(rank, in_features, generator=generator)
                                          * scale).to(dtype)
        tensors[lora_key(module, "B")] = (torch.randn(out_features, rank, generator=generator)
                                          * scale).to(dtype)
    return tensors


def lora_config(rank: int = 4, alpha: float = 8.0, targets: list[str] | None = None,
                base: str = "toy-model") -> dict:
    """The minimal PEFT LoraConfig fields a commit needs."""
    return {"r": rank, "lora_alpha": alpha, "target_modules": targets or ["q_proj", "v_proj"],
            "base_model_name_or_path": base}
