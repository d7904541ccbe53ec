"""One learn run as a step-able job for the scheduler thread: a private trainable copy of an adapter,
AdamW with gradient clipping, optimizer state carried in and out as a dict of tensors.

The scheduler calls `step()` between decode iterations, so serving goes on while it trains; the
model's LoRA state is switched to "train" only inside a step. Knows nothing about stores, names or
revisions; the engine commits and installs what `result` holds.
"""
from __future__ import annotations

import logging
import math
import time
from concurrent.futures import Future
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from serve.engine.data import IGNORE, Example
from serve.engine.lora import LoraBatchState, peft_key
from serve.engine.validate import Weights

logger = logging.getLogger(__name__)


@dataclass
class LearnResult:
    weights: Weights                      # fp32 CPU (A, B) per module
    optimizer_state: dict[str, torch.Tensor]
    steps: int
    tokens: int
    loss_before: float
    loss_after: float
    duration_s: float


def _pad_batch(examples: list[Example], pad_id: int, device) -> tuple[torch.Tensor, ...]:
    """Right-padded input_ids, attention_mask, labels: [n, L] each."""
    length = max(len(e.input_ids) for e in examples)
    ids = [e.input_ids + [pad_id] * (length - len(e.input_ids)) for e in examples]
    mask = [[1] * len(e.input_ids) + [0] * (length - len(e.input_ids)) for e in examples]
    labels = [e.labels + [IGNORE] * (length - len(e.labels)) for e in examples]
    return (torch.tensor(ids, device=device), torch.tensor(mask, device=device),
            torch.tensor(labels, device=device))


class LearnJob:
    def __init__(self, model, lora_state: LoraBatchState, *, weights: Weights, scale: float,
                 optimizer_state: dict | None, examples: list[Example], steps: int, lr: float,
                 batch_size: int, max_grad_norm: float, weight_decay: float, pad_id: int, device):
        self.model, self.lora_state, self.scale = model, lora_state, scale
        self.steps, self.max_grad_norm = steps, max_grad_norm
        self.device, self.future = device, Future()
        self.params = {path: (a.to(device, torch.float32).clone().requires_grad_(True),
                              b.to(device, torch.float32).clone().requires_grad_(True))
                       for path, (a, b) in sorted(weights.items())}
        flat = [t for pair in self.params.values() for t in pair]
        self.optimizer = torch.optim.AdamW(flat, lr=lr, weight_decay=weight_decay)
        self._restore_optimizer(optimizer_state or {}, lr)
        self.batches = [_pad_batch(examples[i:i + batch_size], pad_id, device)
                        for i in range(0, len(examples), batch_size)]
        self.done_steps, self.tokens, self.first_loss = 0, 0, math.nan
        self.started = time.perf_counter()
        self.future.set_running_or_notify_cancel()

    def _keys(self):
        """(PEFT key, tensor) per trainable tensor, in optimizer order."""
        for path, (a, b) in self.params.items():
            yield peft_key(path, "A"), a
            yield peft_key(path, "B"), b

    def _restore_optimizer(self, saved: dict, lr: float) -> None:
        """Continue AdamW's moments from a previous learn when they fit these tensors."""
        restored = 0
        for key, tensor in self._keys():
            avg, avg_sq, step = (saved.get(f"{key}.{n}") for n in ("exp_avg", "exp_avg_sq", "step"))
            if avg is None or avg_sq is None or step is None or avg.shape != tensor.shape:
                continue
            self.optimizer.state[tensor] = {"step": step.detach().to(torch.float32).reshape(()).clone(),
                                            "exp_avg": avg.to(self.device, torch.float32).clone(),
                                            "exp_avg_sq": avg_sq.to(self.device, torch.float32).clone()}
            restored += 1
        if saved and not restored:
            logger.warning("optimizer state did not match the adapter's tensors; starting fresh")

    def _loss(self, batch) -> tuple[torch.Tensor, int]:
        ids, mask, labels = batch
        self.lora_state.mode, self.lora_state.train_scale = "train", self.scale
        self.lora_state.train_weights = self.params
        try:
            logits = self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        finally:
            self.lora_state.mode, self.lora_state.train_weights = "base", {}
        loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(),
                               ignore_index=IGNORE)
        return loss, int(mask.sum())

    def step(self) -> bool:
        """One optimizer step on the next batch; on the last one, measure and publish the result."""
        batch = self.batches[self.done_steps % len(self.batches)]
        with torch.enable_grad():
            loss, tokens = self._loss(batch)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
        if self.done_steps == 0:
            self.first_loss = float(loss.detach())
        torch.nn.utils.clip_grad_norm_([t for _, t in self._keys()], self.max_grad_norm)
        self.optimizer.step()
        self.done_steps += 1
        self.tokens += tokens
        if self.done_steps < self.steps:
            return False
        self.future.set_result(self._finish())
        return True

    @torch.no_grad()
    def _finish(self) -> LearnResult:
        losses = [self._loss(batch)[0].item() for batch in self.batches]
        weights = {path: (a.detach().to("cpu").clone(), b.detach().to("cpu").clone())
                   for path, (a, b) in self.params.items()}
        return LearnResult(weights=weights, optimizer_state=self._export_optimizer(),
                           steps=self.done_steps, tokens=self.tokens, loss_before=self.first_loss,
                           loss_after=sum(losses) / len(losses),
                           duration_s=time.perf_counter() - self.started)

    def _export_optimizer(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for key, tensor in self._keys():
            state = self.optimizer.state.get(tensor, {})
            for name in ("exp_avg", "exp_avg_sq", "step"):
                if name in state:
                    value = state[name]
                    value = value if isinstance(value, torch.Tensor) else torch.tensor(float(value))
                    value = value.detach().to("cpu", torch.float32).clone()
                    out[f"{key}.{name}"] = value.reshape(1) if name == "step" else value
        return out
