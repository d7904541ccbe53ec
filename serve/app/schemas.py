"""Request and response models of the HTTP API (OpenAI-compatible parts and adapter management).

Requests are validated with the configured limits passed as pydantic validation context
(`Model.model_validate(body, context={"limits": LimitsConfig})`), so an over-limit request fails in the
schema with a message naming the limit. Hard caps in `Field(le=...)` hold even without a context.
Response helpers build OpenAI's JSON shapes. Nothing here knows about Ray, engines or stores.
"""
from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from serve.app.config import LimitsConfig

HARD_MAX_TOKENS = 32768
HARD_MAX_STEPS = 100_000


def _limits(info: ValidationInfo) -> LimitsConfig:
    context = info.context or {}
    return context.get("limits") or LimitsConfig()


class SamplingFields(BaseModel):
    """Sampling parameters shared by completions and chat completions."""

    model_config = ConfigDict(extra="forbid")
    model: str = Field(..., min_length=1, max_length=300, description="base id, adapter, base:adapter.")
    max_tokens: int | None = Field(None, ge=1, le=HARD_MAX_TOKENS, description="Tokens to generate.")
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0, le=100_000)
    stop: str | list[str] | None = Field(None, description="Up to 4 stop strings.")
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stream: bool = False
    stream_options: dict | None = Field(None, description="Accepted for compatibility; usage is not streamed.")
    n: int = Field(1, ge=1, le=1, description="Only one choice per prompt is supported.")
    user: str | None = Field(None, max_length=256)

    @field_validator("stop")
    @classmethod
    def _few_stops(cls, stop):
        if isinstance(stop, list) and (len(stop) > 4 or any(not s for s in stop)):
            raise ValueError("stop: at most 4 non-empty strings")
        return stop

    @field_validator("max_tokens")
    @classmethod
    def _max_tokens_limit(cls, value, info: ValidationInfo):
        limit = _limits(info).max_tokens
        if value is not None and value > limit:
            raise ValueError(f"max_tokens {value} is over this server's limit of {limit}")
        return value

    def sampling(self) -> dict:
        """Engine sampling kwargs: only what the client set, so engine defaults apply otherwise."""
        fields = ("max_tokens", "temperature", "top_p", "top_k", "stop", "seed")
        return {name: getattr(self, name) for name in fields if getattr(self, name) is not None}


def _check_prompt_chars(total: int, info: ValidationInfo) -> None:
    limit = _limits(info).max_prompt_chars
    if total > limit:
        raise ValueError(f"prompt is {total} characters, over this server's limit of {limit}")


class CompletionRequest(SamplingFields):
    """POST /v1/completions."""

    prompt: str | list[str] = Field(..., description="One prompt or a list of up to 16.")

    @field_validator("prompt")
    @classmethod
    def _prompt_limits(cls, prompt, info: ValidationInfo):
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if not 1 <= len(prompts) <= 16:
            raise ValueError("prompt: give 1 to 16 prompts")
        _check_prompt_chars(sum(len(p) for p in prompts), info)
        return prompt


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: str = Field(..., max_length=10_000_000)
    name: str | None = Field(None, max_length=64)


class ChatCompletionRequest(SamplingFields):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(..., min_length=1, max_length=1024)

    @field_validator("messages")
    @classmethod
    def _messages_limits(cls, messages, info: ValidationInfo):
        _check_prompt_chars(sum(len(m.content) for m in messages), info)
        return messages

    def conversation(self) -> list[dict]:
        return [{"role": m.role, "content": m.content} for m in self.messages]


class LearnRequest(BaseModel):
    """POST /v1/adapters/{name}/learn: examples in any SEED_API form, plus training options."""

    model_config = ConfigDict(extra="forbid")
    examples: list[Any] = Field(..., min_length=1, description="Conversations, prompt/response dicts "
                                "or strings (shared/SEED_API.md).")
    steps: int | None = Field(None, ge=1, le=HARD_MAX_STEPS)
    lr: float | None = Field(None, gt=0.0, le=1.0)

    @model_validator(mode="after")
    def _learn_limits(self, info: ValidationInfo):
        limits = _limits(info)
        if len(self.examples) > limits.max_learn_examples:
            raise ValueError(f"{len(self.examples)} examples, over this server's limit of "
                             f"{limits.max_learn_examples} per learn call")
        if self.steps is not None and self.steps > limits.max_learn_steps:
            raise ValueError(f"steps {self.steps} is over this server's limit of {limits.max_learn_steps}")
        _check_prompt_chars(_examples_chars(self.examples), info)
        return self

    def options(self) -> dict:
        return {name: getattr(self, name) for name in ("steps", "lr") if getattr(self, name) is not None}


def _examples_chars(examples: list) -> int:
    # Bounded by the body size limit already; this keeps one huge example from passing as "one example".
    return max((len(str(example)) for example in examples), default=0)


def openai_error(message: str, error_type: str, *, param: str | None = None, code: str | None = None) -> dict:
    """OpenAI's error body."""
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def _usage(results: list[dict]) -> dict:
    prompt = sum(r["prompt_tokens"] for r in results)
    completion = sum(r["completion_tokens"] for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def completion_response(model: str, results: list[dict]) -> dict:
    """OpenAI text_completion body; results are GenerationResult dicts (text, finish_reason, tokens)."""
    choices = [{"index": i, "text": r["text"], "logprobs": None, "finish_reason": r["finish_reason"]}
               for i, r in enumerate(results)]
    return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": model, "choices": choices, "usage": _usage(results),
            "system_fingerprint": _served(results[0])}


def _served(result: dict) -> str:
    # OpenAI's system_fingerprint names the backend configuration; here: the exact "name@rev" served.
    return result.get("adapter") or "base"


def chat_response(model: str, result: dict) -> dict:
    message = {"role": "assistant", "content": result["text"]}
    choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": result["finish_reason"]}
    return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": model, "choices": [choice], "usage": _usage([result]),
            "system_fingerprint": _served(result)}


def stream_chunk(kind: str, chunk_id: str, model: str, text: str | None, *, finish_reason: str | None = None,
                 first: bool = False) -> dict:
    """One SSE chunk: kind 'chat' (chat.completion.chunk, delta) or 'text' (text_completion)."""
    created = int(time.time())
    if kind == "chat":
        delta: dict = {"role": "assistant"} if first else {}
        if text:
            delta["content"] = text
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return {"id": chunk_id, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [choice]}
    choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
    return {"id": chunk_id, "object": "text_completion", "created": created, "model": model, "choices": [choice]}


def model_card(model_id: str, *, parent: str | None, created: int = 0) -> dict:
    """An entry of GET /v1/models; adapters have parent = the base model id."""
    return {"id": model_id, "object": "model", "created": created, "owned_by": "online-llm",
            "root": parent or model_id, "parent": parent}
