"""LoRA-aware linear layers with stacked per-slot adapter weights, so one batch can mix adapters.

Each wrapped `nn.Linear` keeps device tensors A [S, R, in] and B [S, out, R] (S slots, R the slot
rank width; slot 0 stays zero = the base model) and a per-slot scale (lora_alpha / r). A shared
`LoraBatchState` says, for the forward about to run, which slot each batch row uses; then every
module does one gather + batched matmul whatever the number of distinct adapters in the batch:

    y = W x + scale[idx] * ((x @ A[idx]^T) @ B[idx]^T)

with fast paths when all rows share one slot (plain matmuls) or all rows are the base (skip).
A "train" mode uses per-module trainable tensors instead of the slots (for `learn`).

This module knows nothing about adapter names, revisions, stores or scheduling; it only holds
tensors in numbered slots.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PEFT_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<which>[AB])(?:\.default)?\.weight$")


def peft_key(module_path: str, which: str) -> str:
    """PEFT's saved key for a module's A or B matrix."""
    return f"base_model.model.{module_path}.lora_{which}.weight"


@dataclass
class LoraBatchState:
    """What the next forward pass should add: shared by every `LoraLinear` of one model.

    mode: "base" (skip LoRA), "single" (all rows use `slot`), "mixed" (row i uses idx[i]),
    "train" (each module's own trainable tensors, scale `train_scale`).
    rank: how many of the R rank columns are in use by the rows of this batch.
    """

    mode: str = "base"
    slot: int = 0
    idx: torch.Tensor | None = None          # [batch] long, on the model's device
    idx_key: tuple = ()                      # (slots tuple, rank) of idx: compared without a device sync
    rank: int = 0
    version: int = 0                         # bumps when idx, rank or any slot's content changes
    train_scale: float = 1.0
    train_weights: dict = field(default_factory=dict)  # module path -> (A [r, in], B [out, r])


class LoraLinear(nn.Module):
    """Wraps one frozen nn.Linear; adds the LoRA term of the slot(s) named by the shared state."""

    def __init__(self, base: nn.Linear, path: str, state: LoraBatchState, num_slots: int, rank: int):
        super().__init__()
        self.base, self.path, self.state = base, path, state
        self.in_features, self.out_features = base.in_features, base.out_features
        device, dtype = base.weight.device, base.weight.dtype
        # Buffers, not parameters: never trained in place, never in the model's state_dict users see.
        self.register_buffer("lora_A", torch.zeros(num_slots, rank, self.in_features, device=device,
                                                   dtype=dtype), persistent=False)
        self.register_buffer("lora_B", torch.zeros(num_slots, self.out_features, rank, device=device,
                                                   dtype=dtype), persistent=False)
        self.register_buffer("scale", torch.zeros(num_slots, device=device, dtype=dtype),
                             persistent=False)
        self._gathered: tuple | None = None  # (state version, A[idx], B[idx], scale[idx])

    @property
    def slot_rank(self) -> int:
        return self.lora_A.shape[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        mode = self.state.mode
        if mode == "base":
            return out
        if mode == "single":
            return out + self._single(x)
        if mode == "mixed":
            return self._mixed(x, out)
        if mode == "train":
            return out + self._train(x)
        raise ValueError(f"unknown LoRA mode {mode!r}")

    def _single(self, x: torch.Tensor) -> torch.Tensor:
        """All rows on one slot: two plain matmuls on the used rank columns."""
        slot, rank = self.state.slot, self.state.rank
        a, b = self.lora_A[slot, :rank], self.lora_B[slot, :, :rank]   # [r, in], [out, r]
        return ((x @ a.t()) @ b.t()) * self.scale[slot]

    def _mixed(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Row i uses slot idx[i]: one gather, then one bmm and one fused add-bmm over rows.
        x: [batch, seq, in] (or [batch, in]); out: the base output, same leading shape.

        The gather is kept while the batch's rows and the slots' contents stay the same (every
        decode step between joins/leaves), so a step costs only the bmm's reads of the weights; it
        is stored transposed and contiguous, with the per-row scale folded into B."""
        a_t, b_t = self._gather()                    # [batch, in, r], [batch, r, out] (scaled)
        if x.dim() == 3:
            return torch.baddbmm(out, torch.bmm(x, a_t), b_t)
        low = torch.bmm(x.unsqueeze(1), a_t)         # [batch, 1, r]
        return torch.baddbmm(out.unsqueeze(1), low, b_t).squeeze(1)

    def _gather(self) -> tuple[torch.Tensor, torch.Tensor]:
        state = self.state
        if self._gathered is None or self._gathered[0] != state.version:
            idx, rank = state.idx, state.rank
            a_t = self.lora_A[idx, :rank].transpose(1, 2).contiguous()
            b_t = (self.lora_B[idx, :, :rank] * self.scale[idx].view(-1, 1, 1)).transpose(1, 2).contiguous()
            self._gathered = (state.version, a_t, b_t)
        return self._gathered[1:]

    def drop_gathered(self) -> None:
        self._gathered = None

    def _train(self, x: torch.Tensor) -> torch.Tensor:
        weights = self.state.train_weights.get(self.path)
        if weights is None:
            return torch.zeros((), device=x.device, dtype=x.dtype)
        a, b = weights
        return ((x @ a.t().to(x.dtype)) @ b.t().to(x.dtype)) * self.state.train_scale

    def write_slot(self, slot: int, a: torch.Tensor | None, b: torch.Tensor | None, scale: float) -> None:
        """Copy one adapter's A [r, in] / B [out, r] into `slot`, zero-padding rank to R."""
        self.lora_A[slot].zero_()
        self.lora_B[slot].zero_()
        if a is None or b is None:
            self.scale[slot] = 0.0
            return
        rank = a.shape[0]
        self.lora_A[slot, :rank].copy_(a, non_blocking=True)
        self.lora_B[slot, :, :rank].copy_(b, non_blocking=True)
        self.scale[slot] = scale

    def grow_rank(self, rank: int) -> None:
        """Widen the slot rank to `rank` (existing slots keep their values, zero-padded)."""
        if rank <= self.slot_rank:
            return
        num_slots = self.lora_A.shape[0]
        new_a = self.lora_A.new_zeros(num_slots, rank, self.in_features)
        new_b = self.lora_B.new_zeros(num_slots, self.out_features, rank)
        new_a[:, :self.slot_rank].copy_(self.lora_A)
        new_b[:, :, :self.slot_rank].copy_(self.lora_B)
        self.lora_A, self.lora_B = new_a, new_b


def find_targets(model: nn.Module, target_modules: list[str] | None) -> list[str]:
    """Paths of the nn.Linear modules whose last name component is a target (PEFT's rule)."""
    wanted = set(target_modules or DEFAULT_TARGETS)
    return [name for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in wanted]


def wrap_model(model: nn.Module, target_modules: list[str] | None, num_slots: int,
               rank: int) -> tuple[LoraBatchState, dict[str, LoraLinear]]:
    """Replace each target nn.Linear by a LoraLinear sharing one state; returns (state, path->module)."""
    state = LoraBatchState()
    paths = find_targets(model, target_modules)
    if not paths:
        raise ValueError(f"no nn.Linear matches target_modules={target_modules}")
    wrapped: dict[str, LoraLinear] = {}
    for path in paths:
        parent_path, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        layer = LoraLinear(getattr(parent, child), path, state, num_slots, rank)
        setattr(parent, child, layer)
        wrapped[path] = layer
    return state, wrapped
