"""The in-process Python API of shared/SEED_API.md: `AsyncOnlineLLM` and its blocking twin `OnlineLLM`.

Both are one Engine (the model is loaded once, in the constructor) plus one adapter store (from
`store=` or LORA_SAVE_PATH; none means memory only). `AsyncOnlineLLM.learn/generate` are coroutines
that await the engine directly, from any event loop. `OnlineLLM.learn/generate` block: they run the
same coroutines on a private loop thread (never `asyncio.run`), so they work from plain code, from a
running loop's executor threads, and from inside a running loop. The management methods
(api_core.py) are blocking in both. Knows nothing about Ray or HTTP.
"""
from __future__ import annotations

from typing import Any, AsyncIterator

from adapters_store.names import parse_ref, validate_name
from serve.api_core import OnlineLLMCore
from serve.api_options import report_as_dict

__all__ = ["AsyncOnlineLLM", "OnlineLLM"]


class _Coroutines(OnlineLLMCore):
    """The coroutine bodies of learn/generate, shared by both public classes."""

    async def _learn(self, data: Any, adapter: str, steps: int | None, lr: float | None,
                     opts: dict) -> dict:
        # The engine commits to the store (when there is one) before returning: auto-save.
        report = await self._engine.learn(data, validate_name(adapter), steps=steps, lr=lr, **opts)
        return report_as_dict(report)

    async def _generate(self, prompt: Any, adapter: str | None, sampling: dict) -> str:
        if adapter is not None:
            parse_ref(adapter)
        result = await self._engine.generate(prompt, adapter, **self._sampling(sampling))
        return result.text

    async def _generate_batch(self, prompts: list, adapters: Any, sampling: dict) -> list[str]:
        results = await self._engine.generate_batch(prompts, adapters, **self._sampling(sampling))
        return [result.text for result in results]


class AsyncOnlineLLM(_Coroutines):
    """`OnlineLLM(model=None, *, temperature, max_tokens, lora_rank, lora_alpha, store, engine_cls,
    **engine_options)` with coroutine `learn` and `generate`.

    model: HF id or local directory; None is the embedded tiny model. store: an AdapterStore, a
    path/URL, None (LORA_SAVE_PATH) or False (memory only). engine_cls: the Engine class to build
    (dependency injection); engine_options go to it (max_slots, device, ...).
    """

    async def learn(self, data: Any, adapter: str, *, steps: int | None = None,
                    lr: float | None = None, **opts: Any) -> dict:
        """Train `adapter` on `data`; returns the report (adapter, revision, steps, tokens, losses)."""
        return await self._learn(data, adapter, steps, lr, opts)

    async def generate(self, prompt: Any, adapter: str | None = None, **sampling: Any) -> str:
        """The completion text for `prompt` (a string or chat messages) with `adapter` (None: base)."""
        return await self._generate(prompt, adapter, sampling)

    async def generate_batch(self, prompts: list, adapters: Any = None, **sampling: Any) -> list[str]:
        """Texts for many prompts in one batch; `adapters`: one per prompt, one for all, or None."""
        return await self._generate_batch(prompts, adapters, sampling)

    async def stream(self, prompt: Any, adapter: str | None = None, **sampling: Any) -> AsyncIterator[str]:
        """Text deltas as they are generated."""
        if adapter is not None:
            parse_ref(adapter)
        async for delta in self._engine.stream(prompt, adapter, **self._sampling(sampling)):
            yield delta


class OnlineLLM(_Coroutines):
    """The blocking twin of AsyncOnlineLLM (same constructor, same methods, results returned)."""

    def learn(self, data: Any, adapter: str, *, steps: int | None = None, lr: float | None = None,
              **opts: Any) -> dict:
        """Train `adapter` on `data`; returns the report (adapter, revision, steps, tokens, losses)."""
        return self._runner.run(self._learn(data, adapter, steps, lr, opts))

    def generate(self, prompt: Any, adapter: str | None = None, **sampling: Any) -> str:
        """The completion text for `prompt` (a string or chat messages) with `adapter` (None: base)."""
        return self._runner.run(self._generate(prompt, adapter, sampling))

    def generate_batch(self, prompts: list, adapters: Any = None, **sampling: Any) -> list[str]:
        """Texts for many prompts in one batch; `adapters`: one per prompt, one for all, or None."""
        return self._runner.run(self._generate_batch(prompts, adapters, sampling))
