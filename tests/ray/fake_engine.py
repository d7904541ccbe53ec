"""A light stand-in for serve.engine.Engine, injected through AppConfig.engine_factory where a test is
about placement or overload rather than model output (it loads no model, so a Ray node starts fast).

It keeps the Engine's method names and result shapes (docs/INTERFACES.md). "Learning" stores the last
response per prompt, so output still depends on the adapter; `delay_s` makes generation slow on purpose,
`broken_marker` makes health checks fail while that file exists.
"""
from __future__ import annotations

import asyncio
import os
import uuid

from adapters_store.errors import AdapterNotFoundError
from serve.engine.types import GenerationResult, LearnReport


class FakeEngine:
    def __init__(self, config=None, *, store=None, delay_s: float = 0.0, max_slots: int = 4,
                 broken_marker: str | None = None, **_ignored):
        self.broken_marker = broken_marker  # check_health fails while this file exists
        self.store = store
        self.delay_s = delay_s
        self.max_slots = max_slots
        self.model_id = "fake"
        self.adapters: dict[str, dict] = {}  # "name@rev" -> {prompt: response}
        self.counter = 0
        self.pid = os.getpid()
        self.cuda_visible = os.environ.get("CUDA_VISIBLE_DEVICES")

    async def generate(self, prompt, adapter=None, **sampling) -> GenerationResult:
        await asyncio.sleep(self.delay_s)
        taught = self.adapters.get(adapter, {}) if adapter else {}
        text = taught.get(str(prompt), f"echo:{prompt}")
        return GenerationResult(text, "stop", 1, 1, adapter, [])

    async def stream(self, prompt, adapter=None, *, include_result=False, **sampling):
        result = await self.generate(prompt, adapter, **sampling)
        for word in result.text.split(" "):
            yield word + " "
        if include_result:
            yield result

    async def learn(self, data, adapter, *, steps=None, lr=None, parent=None, **opts) -> LearnReport:
        self.counter += 1
        base = dict(self.adapters.get(f"{adapter}@{parent}", {})) if parent else {}
        base.update({item["prompt"]: item["response"] for item in data})
        rev = f"{self.counter:06d}-{uuid.uuid4().hex[:8]}"
        self.adapters[f"{adapter}@{rev}"] = base
        return LearnReport(adapter, rev, parent, steps or 1, 1, 1.0, 0.5, 0.0, False)

    async def load(self, ref: str) -> str:
        if ref not in self.adapters:
            raise AdapterNotFoundError(f"adapter {ref!r} not found")
        return ref

    def resident(self) -> list[str]:
        return sorted(self.adapters)

    def adapter_state(self, name):
        return None

    def delete(self, name: str) -> bool:
        refs = [ref for ref in self.adapters if ref.split("@")[0] == name]
        for ref in refs:
            del self.adapters[ref]
        return bool(refs)

    def stats(self) -> dict:
        return {"slots": self.max_slots, "slots_used": min(len(self.adapters), self.max_slots),
                "pid": self.pid, "cuda_visible_devices": self.cuda_visible}

    def check_health(self) -> None:
        if self.broken_marker and os.path.exists(self.broken_marker):
            raise RuntimeError("engine marked broken by the test")

    def shutdown(self) -> None:
        return None
