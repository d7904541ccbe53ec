"""The engine's result records: what a generation and a learn run return to callers.

Plain dataclasses; they know nothing about how the results were produced.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class GenerationResult:
    text: str
    finish_reason: str            # "stop" (eos or a stop string) | "length" (max_tokens or context)
                                  # | "abort" (the caller left early)
    prompt_tokens: int
    completion_tokens: int
    adapter: str | None           # "name@rev" used; None for the base model
    token_ids: list[int] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class LearnReport:
    adapter: str
    revision: str
    parent: str | None
    steps: int
    tokens: int                   # supervised (loss-bearing) tokens per step, times steps
    loss_before: float
    loss_after: float
    duration_s: float
    committed: bool               # True when a store holds the new revision

    def to_dict(self) -> dict:
        return asdict(self)
