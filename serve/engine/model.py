"""Loads the frozen base causal LM and its tokenizer for the engine.

Any Hugging Face causal-LM directory or id (Qwen3, Llama, Mistral, Qwen2 ...) through
AutoModelForCausalLM; the embedded tiny model's id is mapped to its locally built directory.
fp32 on CPU, bf16 on CUDA. Knows nothing about adapters, batching or stores.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from serve.tiny_model import resolve_model

logger = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    device: torch.device
    dtype: torch.dtype
    path: str                 # local directory or hub id actually loaded
    max_len: int              # context length in tokens
    eos_ids: frozenset[int]   # token ids that end a generation
    pad_id: int


def pick_device(device: str | None) -> torch.device:
    """The configured device, else the first GPU when there is one, else the CPU."""
    if device:
        return torch.device(device)
    return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")


def _eos_ids(model, tokenizer) -> frozenset[int]:
    ids: set[int] = set()
    for source in (getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(source, int):
            ids.add(source)
        elif source:
            ids.update(int(i) for i in source)
    return frozenset(ids)


def load_model(model_id: str, device: str | None = None, max_model_len: int | None = None) -> LoadedModel:
    """Load `model_id` frozen, in eval mode, on `device` (bf16 on CUDA, fp32 on CPU)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model(model_id)
    dev = pick_device(device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(dev).eval()
    for param in model.parameters():
        param.requires_grad_(False)
    if tokenizer.pad_token_id is None:  # Llama-style tokenizers ship without one
        tokenizer.pad_token = tokenizer.eos_token
    context = getattr(model.config, "max_position_embeddings", None) or tokenizer.model_max_length
    max_len = min(int(max_model_len or context), int(context))
    logger.info("loaded %s on %s (%s), context %d", path, dev, dtype, max_len)
    return LoadedModel(model=model, tokenizer=tokenizer, device=dev, dtype=dtype, path=path,
                       max_len=max_len, eos_ids=_eos_ids(model, tokenizer),
                       pad_id=int(tokenizer.pad_token_id))
