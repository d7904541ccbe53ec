"""A test-only engine for the fault suite: the real Engine plus one hook that makes a request or learn
stay in flight for a while, so a fault can be injected while it runs.

The hook is off unless a prompt (or a learn example) contains SLOW_MARK; the app selects this class
only through `engine_factory="fault_hooks:HookedEngine"` in the fault suite's config. Nothing else in
the engine changes. It knows nothing about Ray or HTTP.
"""
from __future__ import annotations

import asyncio

from serve.engine import Engine

SLOW_MARK = "[[hold-in-flight]]"
HOLD_S = 3.0


async def _hold_if_marked(payload) -> None:
    # Sleeps on the replica's event loop: the request is in flight, the worker stays responsive.
    if SLOW_MARK in str(payload):
        await asyncio.sleep(HOLD_S)


class HookedEngine(Engine):
    """Engine whose generate/learn first wait HOLD_S seconds when their input carries SLOW_MARK."""

    async def generate(self, prompt, adapter=None, **sampling):
        await _hold_if_marked(prompt)
        return await super().generate(prompt, adapter, **sampling)

    async def learn(self, data, adapter, **options):
        if SLOW_MARK in str(data) and options.get("parent"):
            # Make the starting revision resident first, so a fault injected during the hold hits the
            # train -> commit part of the learn, not the load of its starting point.
            await self.load(f"{adapter}@{options['parent']}")
        await _hold_if_marked(data)
        return await super().learn(data, adapter, **options)
