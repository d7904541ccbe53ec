"""The worker deployment: one Engine per replica (one replica per GPU, or N on CPU), serving requests
routed by `multiplexed_model_id = "name@rev"` and running learn calls for the ingress.

It loads adapters through `@serve.multiplexed` (so Serve tells every router which replica holds which
ref), reports its resident refs, free slots and counters to the Directory, answers Serve's health
checks with `engine.check_health()`, and shuts the engine down after Serve drained running requests.
It does not resolve names to revisions or take learn leases (the ingress does), and it knows nothing of
HTTP. The engine class comes from `AppConfig.engine_factory` (dependency injection; tests pass fakes).
"""
from __future__ import annotations

import asyncio
import dataclasses
import importlib
import logging
import time

import ray
from ray import serve

from serve.app.config import AppConfig
from serve.app.directory import open_app_store
from serve.app.metrics import app_metrics

logger = logging.getLogger(__name__)

_COUNTER_KEYS = ("loads", "evictions")
MULTIPLEX_IDS = 512  # most "name@rev" ids one replica advertises to Serve's routers (a bound, not a cache)


def import_factory(path: str):
    """'module:attr' -> the object (the engine class or any callable with Engine's constructor)."""
    module_name, _, attr = path.partition(":")
    target = importlib.import_module(module_name)
    for part in attr.split("."):
        target = getattr(target, part)
    return target


def _as_dict(result) -> dict:
    return dataclasses.asdict(result) if dataclasses.is_dataclass(result) else dict(result)


def engine_counters(stats: dict) -> dict:
    """The worker's view of engine.stats(): free device slots, adapter loads and evictions (all tiers)."""
    free = int(stats.get("slots", 1)) - int(stats.get("slots_used", 0))
    return {"free_slots": max(free, 0), "loads": int(stats.get("slot_misses", 0)),
            "store_reads": int(stats.get("store_reads", 0)),
            "evictions": int(stats.get("slot_evictions", 0)) + int(stats.get("host_evictions", 0))}


class Worker:
    """One Engine; methods are called through the worker DeploymentHandle by the ingress."""

    def __init__(self, config: dict, directory, store_factory=None):
        self.config = AppConfig(**config)
        self.directory = directory
        store = open_app_store(self.config.store_url, store_factory)
        factory = import_factory(self.config.engine_factory)
        self.engine = factory(store=store, **self.config.engine_config())
        context = serve.get_replica_context()
        self.worker_id = context.replica_id.unique_id if context else "local"
        self.placement = {"node_id": ray.get_runtime_context().get_node_id(),
                          "gpu_ids": [str(gpu) for gpu in ray.get_gpu_ids()]}
        self.counts = {"hits": 0, "misses": 0, "requests": 0, "learns": 0}
        self.ongoing = 0
        self._seen_deletions = 0
        self._reported_counters = {key: 0 for key in _COUNTER_KEYS}
        self._report_task = asyncio.get_running_loop().create_task(self._report_loop())
        logger.info("worker %s ready: engine %s, store %s", self.worker_id, self.config.engine_factory,
                    getattr(store, "url", None))

    # -- requests ---------------------------------------------------------------------------------

    async def generate(self, prompt, sampling: dict) -> dict:
        """One completion for the request's multiplexed ref ("" = base model)."""
        ref = await self._prepare()
        self.ongoing += 1
        try:
            result = _as_dict(await self.engine.generate(prompt, adapter=ref, **sampling))
        finally:
            self.ongoing -= 1
        app_metrics().token_counts(result.get("prompt_tokens", 0), result.get("completion_tokens", 0))
        return result

    async def stream(self, prompt, sampling: dict):
        """Text deltas for the request's ref, as the engine produces them, then the result as a dict
        (finish_reason and token counts) so the last SSE chunk can say why generation stopped."""
        ref = await self._prepare()
        self.ongoing += 1
        try:
            async for item in self.engine.stream(prompt, adapter=ref, include_result=True, **sampling):
                yield item if isinstance(item, str) else _as_dict(item)
        finally:
            self.ongoing -= 1

    async def learn(self, data, adapter: str, parent: str | None, options: dict) -> dict:
        """Train `adapter` from `parent` (None: a fresh adapter), commit, install; the report as a dict."""
        if parent is None:
            # A name the Directory does not know must start from zero, not from a stale resident copy.
            await asyncio.to_thread(self.engine.delete, adapter)
        started = time.monotonic()
        self.ongoing += 1
        try:
            report = _as_dict(await self.engine.learn(data, adapter, parent=parent, **options))
        finally:
            self.ongoing -= 1
        self.counts["learns"] += 1
        app_metrics().learned(self.worker_id, int(report.get("steps", 0)), time.monotonic() - started)
        # Register the new revision with Serve's multiplexing, so routers send its requests here.
        await self._load(f"{adapter}@{report['revision']}")
        await self._report_once()
        return report

    async def adapter_info(self, name: str) -> dict:
        """What this worker holds of `name`: resident refs and the parameter count of the latest."""
        state = self.engine.adapter_state(name)
        refs = [ref for ref in self.engine.resident() if ref.split("@", 1)[0] == name]
        count = sum(t.numel() for t in state.values()) if state else None
        return {"resident": refs, "param_count": count}

    async def drop(self, name: str) -> bool:
        # engine.delete waits for the scheduler thread: keep that wait off the replica's event loop.
        return await asyncio.to_thread(self.engine.delete, name)

    async def stats(self) -> dict:
        return {"worker": self.worker_id, **self.counts, **self.placement, "ongoing": self.ongoing,
                "engine": self.engine.stats()}

    # -- Serve hooks ------------------------------------------------------------------------------

    @serve.multiplexed(max_num_models_per_replica=MULTIPLEX_IDS)
    async def _load(self, ref: str) -> str:
        # Serve's cache only records that this replica serves `ref` (routers learn it within 0.1 s);
        # the engine's own LRU tiers decide what stays in memory. Both are LRU, so the bounded id list
        # tracks the engine's tiers; routing_stats carries the engine's exact resident set besides.
        return await self.engine.load(ref)

    async def check_health(self) -> None:
        await asyncio.to_thread(self.engine.check_health)

    def record_routing_stats(self) -> dict:
        free_slots = engine_counters(self.engine.stats())["free_slots"]
        return {"free_slots": free_slots, "resident": self.engine.resident(), "queue": self.ongoing}

    def __del__(self):
        # Serve calls this after graceful shutdown drained the running requests.
        task = getattr(self, "_report_task", None)
        if task is not None:
            task.cancel()
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()

    # -- internals --------------------------------------------------------------------------------

    async def _prepare(self) -> str | None:
        """Count the request and make its ref resident (hit if it already was); None for the base model."""
        self.counts["requests"] += 1
        ref = serve.get_multiplexed_model_id() or None
        if ref is None:
            return None
        hit = ref in set(self.engine.resident())
        self.counts["hits" if hit else "misses"] += 1
        app_metrics().adapter_event(self.worker_id, "hit" if hit else "miss")
        await self._load(ref)
        if not hit:
            await self._report_once()
        return ref

    async def _report_loop(self) -> None:
        while True:
            try:
                await self._report_once()
            except Exception:  # why: a Directory restart must not kill the worker's reporting
                logger.warning("report to the Directory failed", exc_info=True)
            await asyncio.sleep(self.config.routing.report_interval_s)

    async def _report_once(self) -> None:
        counters = engine_counters(self.engine.stats())
        for key in _COUNTER_KEYS:
            delta = counters[key] - self._reported_counters[key]
            app_metrics().adapter_event(self.worker_id, key.rstrip("s"), delta)
        self._reported_counters = {key: counters[key] for key in _COUNTER_KEYS}
        app_metrics().queue_depth.set(self.ongoing, tags={"worker": self.worker_id})
        report = {**self.counts, **counters, **self.placement, "queue_depth": self.ongoing,
                  "resident": self.engine.resident()}
        answer = await self.directory.report.remote(self.worker_id, report, self._seen_deletions)
        for name in answer["deletions"]:
            await asyncio.to_thread(self.engine.delete, name)
        self._seen_deletions = answer["seen"]
