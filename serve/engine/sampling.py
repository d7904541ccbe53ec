"""Per-request sampling parameters, next-token choice per batch row, and incremental detokenisation
with stop strings (text deltas for streaming that never show part of a stop string).

Knows nothing about models, adapters or batching beyond one logits row per request.
"""
from __future__ import annotations

from typing import Optional

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from serve.engine.errors import InvalidRequestError

# Below this temperature a row is decoded greedily (the limit of sampling as T -> 0): dividing logits by
# a subnormal temperature gives inf/NaN probabilities, and torch.multinomial then kills the decode loop.
MIN_TEMPERATURE = 1e-5


class SamplingParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_tokens: int = Field(64, ge=1, le=1_000_000, description="most tokens to generate")
    temperature: float = Field(0.0, ge=0.0, le=100.0, description="0 means greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus sampling mass")
    top_k: int = Field(0, ge=0, le=1_000_000, description="keep the k most likely tokens; 0 = all")
    stop: list[str] = Field(default_factory=list, description="strings that end the text")
    seed: Optional[int] = Field(None, ge=0, le=2**63 - 1, description="per-request random seed")
    ignore_eos: bool = Field(False, description="keep generating past end-of-sequence (benchmarks)")

    @field_validator("stop", mode="before")
    @classmethod
    def _stops(cls, value):
        stops = [value] if isinstance(value, str) else list(value or [])
        if any(not s for s in stops) or len(stops) > 16:
            raise ValueError("stop must be up to 16 non-empty strings")
        return stops

    @classmethod
    def build(cls, defaults: dict, overrides: dict) -> "SamplingParams":
        """Defaults from the engine config, then per-call overrides; None means "use the default"."""
        merged = {**defaults, **{k: v for k, v in overrides.items() if v is not None}}
        try:
            return cls(**merged)
        except ValidationError as exc:
            raise InvalidRequestError(f"invalid sampling parameters: {exc.errors()[0]['msg']} "
                                      f"({exc.errors()[0]['loc']})") from None


def _filtered_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, top-k and top-p applied to one row of logits [V]; returns probabilities [V]."""
    logits = logits.float() / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        drop = (torch.cumsum(sorted_probs, 0) - sorted_probs) >= params.top_p
        drop[0] = False  # a top_p below float32's smallest value would otherwise drop every token
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return probs


def sample_rows(logits: torch.Tensor, params: list[SamplingParams],
                generators: list[torch.Generator | None]) -> list[int]:
    """One next token per row of logits [B, V]: argmax for greedy rows, else sampled."""
    greedy = logits.argmax(dim=-1).tolist()
    out = []
    for row, (p, generator) in enumerate(zip(params, generators)):
        if p.temperature < MIN_TEMPERATURE:
            out.append(greedy[row])
            continue
        probs = _filtered_probs(logits[row], p).cpu()
        out.append(int(torch.multinomial(probs, 1, generator=generator).item()))
    return out


class TextTracker:
    """Decodes a growing token list; finds stop strings; hands out the text that is safe to show."""

    def __init__(self, tokenizer, stops: list[str]):
        self.tokenizer, self.stops = tokenizer, stops
        self.token_ids: list[int] = []
        self.text = ""
        self.emitted = 0
        self.stopped = False

    def add(self, token_id: int) -> str:
        """Append a token; return the new text delta (empty while it may still become a stop)."""
        self.token_ids.append(token_id)
        self.text = self.tokenizer.decode(self.token_ids, skip_special_tokens=True)
        cut = self._first_stop()
        if cut is not None:
            self.text, self.stopped = self.text[:cut], True
            return self.flush()
        safe = len(self.text) - self._holdback()
        delta = self.text[self.emitted:safe] if safe > self.emitted else ""
        self.emitted = max(self.emitted, safe)
        return delta

    def flush(self) -> str:
        """Everything not yet emitted (at the end of the request)."""
        delta = self.text[self.emitted:]
        self.emitted = len(self.text)
        return delta

    def _first_stop(self) -> int | None:
        start = max(0, self.emitted - max((len(s) for s in self.stops), default=0))
        hits = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
        return min(hits) if hits else None

    def _holdback(self) -> int:
        """Length of the tail that might be the start of a stop string or a split UTF-8 character."""
        hold = len(self.text) - len(self.text.rstrip("\ufffd"))
        for stop in self.stops:
            for size in range(min(len(stop) - 1, len(self.text)), hold, -1):
                if self.text.endswith(stop[:size]):
                    hold = size
                    break
        return hold
