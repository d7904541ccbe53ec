"""The running decode batch: left-padded rows sharing one KV cache, each with its own adapter slot.

New rows are prefilled on their own and merged into the cache (both sides left-padded to one
length); finished rows are dropped with an index select, and columns that every remaining row
masks are trimmed. Each forward sets the shared LoRA state from the rows' slots (base / single /
mixed). Knows nothing about requests' futures, stores or sampling.
"""
from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from serve.engine.lora import LoraBatchState


def cache_kwarg(model) -> str:
    """transformers 5.x calls the KV cache argument `cache`; older releases `past_key_values`."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def set_lora_rows(state: LoraBatchState, slots: list[int], ranks: list[int], device) -> None:
    """Choose the cheapest LoRA mode that serves these rows' slots."""
    distinct = set(slots)
    rank = max(ranks) if ranks else 0
    if distinct == {0} or rank == 0:
        state.mode, state.rank = "base", rank
    elif len(distinct) == 1:
        state.mode, state.slot, state.rank = "single", slots[0], rank
    else:
        # A new idx (or rank) invalidates the modules' gathered copies; the same rows reuse them.
        key = (tuple(slots), rank)
        if state.idx_key != key:
            state.idx = torch.tensor(slots, dtype=torch.long, device=device)
            state.idx_key = key
            state.version += 1
        state.mode, state.rank = "mixed", rank


def _left_pad(t: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    """Pad tensor `t` with zeros on the left of `dim` up to `length`."""
    missing = length - t.shape[dim]
    if missing <= 0:
        return t
    pad = [0, 0] * (t.dim() - 1 - dim) + [missing, 0]
    return F.pad(t, pad)


class DecodeBatch:
    """Cache, attention mask [B, L] and next positions [B] of the rows currently decoding."""

    def __init__(self, model, lora_state: LoraBatchState, device, pad_id: int):
        self.model, self.lora_state, self.device, self.pad_id = model, lora_state, device, pad_id
        self.cache: DynamicCache | None = None
        self.cache_kw = cache_kwarg(model)
        self.mask = torch.zeros(0, 0, dtype=torch.long, device=device)
        self.positions = torch.zeros(0, dtype=torch.long, device=device)
        self.slots: list[int] = []
        self.ranks: list[int] = []

    def __len__(self) -> int:
        return len(self.slots)

    @torch.no_grad()
    def prefill(self, prompts: list[list[int]], slots: list[int], ranks: list[int]) -> torch.Tensor:
        """Run new prompts, add them to the batch; returns their last-position logits [n, V]."""
        length = max(len(p) for p in prompts)
        ids = torch.tensor([[self.pad_id] * (length - len(p)) + p for p in prompts], device=self.device)
        mask = torch.tensor([[0] * (length - len(p)) + [1] * len(p) for p in prompts], device=self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        set_lora_rows(self.lora_state, slots, ranks, self.device)
        cache = DynamicCache()
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                         use_cache=True, logits_to_keep=1, **{self.cache_kw: cache})
        self._merge(cache, mask, slots, ranks)
        return out.logits[:, -1, :]

    @torch.no_grad()
    def full_logits(self, prompts: list[list[int]], slots: list[int], ranks: list[int]) -> torch.Tensor:
        """Logits at every position of left-padded prompts [n, L, V]; the batch itself is unchanged."""
        length = max(len(p) for p in prompts)
        ids = torch.tensor([[self.pad_id] * (length - len(p)) + p for p in prompts], device=self.device)
        mask = torch.tensor([[0] * (length - len(p)) + [1] * len(p) for p in prompts], device=self.device)
        set_lora_rows(self.lora_state, slots, ranks, self.device)
        return self.model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                          use_cache=False).logits

    @torch.no_grad()
    def decode(self, tokens: list[int]) -> torch.Tensor:
        """Feed one token per row (in row order); returns next-token logits [B, V]."""
        ids = torch.tensor(tokens, device=self.device).unsqueeze(1)
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(tokens), 1)], dim=1)
        set_lora_rows(self.lora_state, self.slots, self.ranks, self.device)
        out = self.model(input_ids=ids, attention_mask=self.mask, position_ids=self.positions.unsqueeze(1),
                         use_cache=True, **{self.cache_kw: self.cache})
        self.positions = self.positions + 1
        return out.logits[:, -1, :]

    def _merge(self, cache: DynamicCache, mask: torch.Tensor, slots: list[int], ranks: list[int]) -> None:
        new_positions = mask.sum(-1)
        if self.cache is None or not self.slots:
            self.cache, self.mask, self.positions = cache, mask, new_positions
        else:
            length = max(self.mask.shape[1], mask.shape[1])
            merged = []
            for old_layer, new_layer in zip(self.cache.layers, cache.layers):
                keys = torch.cat([_left_pad(old_layer.keys, length, 2), _left_pad(new_layer.keys, length, 2)])
                values = torch.cat([_left_pad(old_layer.values, length, 2),
                                    _left_pad(new_layer.values, length, 2)])
                merged.append((keys, values))
            self.cache = DynamicCache(ddp_cache_data=merged)
            self.mask = torch.cat([_left_pad(self.mask, length, 1), _left_pad(mask, length, 1)])
            self.positions = torch.cat([self.positions, new_positions])
        self.slots = self.slots + list(slots)
        self.ranks = self.ranks + list(ranks)

    def keep(self, rows: list[int]) -> None:
        """Keep only these row indices (in this order); trim columns no remaining row attends to."""
        if len(rows) == len(self.slots):
            return
        self.slots = [self.slots[i] for i in rows]
        self.ranks = [self.ranks[i] for i in rows]
        if not rows:
            self.cache, self.mask = None, self.mask[:0, :0]
            self.positions = self.positions[:0]
            return
        index = torch.tensor(rows, dtype=torch.long, device=self.device)
        self.mask, self.positions = self.mask[index], self.positions[index]
        start = int((self.mask.sum(0) > 0).nonzero()[0].item())
        self.mask = self.mask[:, start:]
        for layer in self.cache.layers:
            layer.keys = layer.keys[index, :, start:]
            layer.values = layer.values[index, :, start:]
