"""EngineConfig: every knob of one engine (model, LoRA shape, tiers, batching, defaults).

Validated with pydantic; knows nothing about how the engine uses the values.
"""
from __future__ import annotations

from typing import Optional

from pydantic import BaseModel, ConfigDict, Field

from serve.tiny_model import TINY_MODEL_ID


class EngineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str = Field(TINY_MODEL_ID, description="HF id or local model directory; the tiny id builds "
                                                  "the embedded model")
    lora_rank: int = Field(16, ge=1, le=1024, description="rank of adapters this engine creates")
    lora_alpha: float = Field(32.0, gt=0, le=1e6, description="LoRA alpha; scale = alpha / rank")
    target_modules: Optional[list[str]] = Field(
        None, description="last names of the nn.Linear layers to adapt; None = attention + MLP")
    max_lora_rank: int = Field(64, ge=1, le=1024, description="largest rank accepted from a store")
    max_slots: int = Field(32, ge=1, le=4096, description="adapters held on the device at once")
    host_cache_size: int = Field(256, ge=1, le=1_000_000, description="adapters held in host memory")
    max_batch_size: int = Field(32, ge=1, le=4096, description="rows decoded together")
    batch_window_ms: float = Field(2.0, ge=0, le=1000, description="wait that gathers a first batch")
    device: Optional[str] = Field(None, description="'cpu', 'cuda:0', ...; None = GPU if present")
    cpu_threads: Optional[int] = Field(
        None, ge=1, le=1024, description="torch intra-op threads on CPU (process-wide); None = leave "
                                         "torch's setting. 1 avoids OpenMP spin-waits on busy small hosts")
    max_model_len: Optional[int] = Field(None, ge=2, le=10_000_000, description="context cap, tokens")
    temperature: float = Field(0.0, ge=0, le=100, description="default sampling temperature")
    max_tokens: int = Field(64, ge=1, le=1_000_000, description="default completion length")
    learn_steps: int = Field(30, ge=1, le=100_000, description="default optimizer steps per learn")
    learn_lr: float = Field(3e-3, gt=0, le=1.0, description="default AdamW learning rate")
    learn_batch_size: int = Field(16, ge=1, le=4096, description="examples per optimizer step")
    max_grad_norm: float = Field(1.0, gt=0, le=1e6, description="gradient clipping norm")
    weight_decay: float = Field(0.0, ge=0, le=1.0, description="AdamW weight decay")
