"""The ingress's logic without HTTP: resolve `model`/`adapter` to `name@rev` through the Directory, admit
or refuse work (bounded), call workers with `multiplexed_model_id`, run learn calls under the adapter's
lease, and answer the management calls. Its public coroutines are the Python handle API
(`generate`, `learn`, `list_adapters`, `get_adapter_info`, `delete_adapter`, `stats`, AsyncOnlineLLM
semantics). It raises the project's typed errors; mapping them to HTTP codes is ingress.py's job.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket

from adapters_store.errors import AdapterNotFoundError, CommitConflictError, OnlineLLMError
from adapters_store.names import parse_ref, validate_name

from serve.app.config import AppConfig
from serve.app.directory import open_app_store
from serve.app.metrics import app_metrics

logger = logging.getLogger(__name__)

LEASE_WAIT_S = 600.0  # a learn queued behind others on one adapter waits at most this long


class OverloadedError(OnlineLLMError, RuntimeError):
    """This ingress already runs its admission limit of requests; the client should retry later."""


class AppService:
    """Everything the ingress does, callable from HTTP routes and through the DeploymentHandle."""

    def __init__(self, config: dict, workers, directory, store_factory=None):
        self.config = AppConfig(**config)
        self.workers = workers
        self.directory = directory
        self.store = open_app_store(self.config.store_url, store_factory)
        self.base_id = self._base_model_id()
        self.inflight = 0
        self.counts = {"requests": 0, "refused": 0, "learns": 0}
        self.holder_id = f"{socket.gethostname()}:{os.getpid()}"

    def _base_model_id(self) -> str:
        # The id clients use for the base model: the configured id, or a local directory's name.
        model = self.config.model
        return os.path.basename(model.rstrip("/")) if os.path.isdir(model) else model

    # -- resolution -------------------------------------------------------------------------------

    def adapter_of_model(self, model: str) -> str | None:
        """`model` (base id, 'adapter', 'base:adapter', 'adapter@rev') -> adapter ref, None for the base."""
        if model == self.base_id or model == self.config.model:
            return None
        prefix = f"{self.base_id}:"
        ref = model[len(prefix):] if model.startswith(prefix) else model
        try:
            parse_ref(ref)
        except ValueError:
            raise AdapterNotFoundError(f"The model `{model}` does not exist.") from None
        return ref

    async def resolve(self, ref: str | None, *, strict: bool) -> str | None:
        """'name' -> 'name@latest' from the Directory (read-your-writes); a pinned 'name@rev' as given.

        Unknown names: AdapterNotFoundError when strict (HTTP), else None = the base model (SEED_API).
        """
        if ref is None:
            return None
        name, rev = parse_ref(ref)
        if rev is not None:
            return ref
        latest = await self.directory.resolve.remote(name)
        if latest is None and strict:
            raise AdapterNotFoundError(f"The model `{name}` does not exist.")
        return f"{name}@{latest}" if latest else None

    @contextlib.contextmanager
    def admitted(self):
        """Count one request in; refuse (OverloadedError) beyond the admission limit, never queue."""
        if self.inflight >= self.config.queues.max_inflight:
            self.counts["refused"] += 1
            raise OverloadedError(f"server busy: {self.inflight} requests in flight on this ingress")
        self.inflight += 1
        self.counts["requests"] += 1
        app_metrics().inflight.set(self.inflight, tags={"ingress": self.holder_id})
        try:
            yield
        finally:
            self.inflight -= 1

    # -- generation -------------------------------------------------------------------------------

    async def complete(self, prompt, ref: str | None, sampling: dict) -> dict:
        """One GenerationResult dict for an already resolved ref."""
        with self.admitted():
            handle = self.workers.options(multiplexed_model_id=ref or "")
            return await handle.generate.remote(prompt, sampling)

    async def open_stream(self, prompt, ref: str | None, sampling: dict):
        """An async iterator of text deltas (the worker call starts at once; errors surface on first read)."""
        handle = self.workers.options(multiplexed_model_id=ref or "", stream=True)
        return handle.stream.remote(prompt, sampling)

    async def generate(self, prompt, adapter: str | None = None, **sampling) -> str:
        """AsyncOnlineLLM.generate: the completion text; an unknown adapter answers like the base model."""
        ref = await self.resolve(adapter, strict=False)
        result = await self.complete(prompt, ref, sampling)
        return result["text"]

    # -- learning ---------------------------------------------------------------------------------

    async def learn(self, data, adapter: str, **options) -> dict:
        """Train `adapter` on `data` under its cluster-wide lease; returns the report (with `revision`).

        When it returns revision r, the Directory already serves r, so every later generate uses >= r.
        """
        name = validate_name(adapter)
        with self.admitted():
            token = await self.directory.acquire_lease.remote(name, self.holder_id, LEASE_WAIT_S)
            renewer = asyncio.get_running_loop().create_task(self._renew(name, token))
            try:
                report = await self._learn_under_lease(data, name, options)
            finally:
                renewer.cancel()
                await self.directory.release_lease.remote(name, token)
        self.counts["learns"] += 1
        return report

    async def _learn_under_lease(self, data, name: str, options: dict) -> dict:
        parent = await self.directory.resolve.remote(name)
        try:
            report = await self._learn_from(data, name, parent, options)
        except Exception as exc:  # why broad: Ray wraps the worker's CommitConflictError
            latest = await self._store_moved_on(exc, name, parent)
            if latest is None:
                raise
            # The store has a revision the Directory never heard of (a commit whose answer was lost when
            # a worker died, or a CLI import): catch up, then learn once more on top of it.
            await self.directory.set_latest.remote(name, latest)
            report = await self._learn_from(data, name, latest, options)
        await self.directory.set_latest.remote(name, report["revision"])
        return report

    async def _learn_from(self, data, name: str, parent: str | None, options: dict) -> dict:
        # Route to a worker that holds the parent (it starts training without a load).
        handle = self.workers.options(multiplexed_model_id=f"{name}@{parent}" if parent else "")
        return await handle.learn.remote(data, name, parent, options)

    async def _store_moved_on(self, exc: BaseException, name: str, parent: str | None) -> str | None:
        """The store's latest revision of `name` if `exc` is a commit conflict and it differs from `parent`."""
        while getattr(exc, "cause", None) is not None and exc.cause is not exc:
            exc = exc.cause
        if not isinstance(exc, CommitConflictError) or self.store is None:
            return None
        latest = await asyncio.to_thread(self.store.latest, name)
        return latest if latest is not None and latest != parent else None

    async def _renew(self, name: str, token: str) -> None:
        interval = self.config.routing.lease_ttl_s / 3
        while True:
            await asyncio.sleep(interval)
            if not await self.directory.renew_lease.remote(name, token):
                logger.warning("learn lease on %r was lost while learning", name)
                return

    # -- management -------------------------------------------------------------------------------

    async def list_adapters(self) -> list[str]:
        names = set(await self.directory.list_adapters.remote())
        if self.store is not None:
            names.update(await asyncio.to_thread(self.store.list_adapters))
        return sorted(names)

    async def list_revisions(self, adapter: str) -> list[str]:
        name = validate_name(adapter)
        if self.store is not None:
            revisions = await asyncio.to_thread(self.store.list_revisions, name)
        else:
            latest = await self.directory.resolve.remote(name)
            revisions = [latest] if latest else []
        if not revisions:
            raise AdapterNotFoundError(f"adapter {name!r} not found")
        return revisions

    async def get_adapter_info(self, adapter: str) -> dict:
        """SEED_API fields: name, in_memory, on_disk, param_count, metadata, disk_path, revision, disk_error."""
        name = validate_name(adapter)
        latest = await self.directory.resolve.remote(name)
        info = {"name": name, "revision": latest, "on_disk": False, "disk_path": None, "metadata": {},
                "revisions": []}
        if self.store is not None:
            info.update(await asyncio.to_thread(self._store_info, name))
        holders = await self.directory.holders.remote(f"{name}@{latest}") if latest else []
        info["workers"] = holders
        resident = {"resident": [], "param_count": None}
        if latest:
            handle = self.workers.options(multiplexed_model_id=f"{name}@{latest}")
            resident = await handle.adapter_info.remote(name)
        info["in_memory"] = bool(resident["resident"] or holders)
        info["param_count"] = resident["param_count"]
        if not latest and not info["on_disk"]:
            raise AdapterNotFoundError(f"adapter {name!r} not found")
        return info

    def _store_info(self, name: str) -> dict:
        try:
            stored = self.store.info(name)
        except AdapterNotFoundError:
            return {"on_disk": False}
        except OnlineLLMError as error:  # unreadable copy: reported, never raised (SEED_API)
            return {"on_disk": False, "disk_error": str(error)}
        return {"on_disk": True, "disk_path": stored.get("path"), "metadata": stored.get("meta", {}),
                "revisions": stored.get("revisions", []), "size_bytes": stored.get("size_bytes")}

    async def delete_adapter(self, adapter: str, delete_from_disk: bool = False) -> bool:
        """Drop `adapter` from every worker (and the store when asked); False if it existed nowhere."""
        name = validate_name(adapter)
        on_disk = False
        if delete_from_disk and self.store is not None:
            on_disk = await asyncio.to_thread(self.store.delete, name)
        forget = self.store is None or delete_from_disk
        known = await self.directory.drop.remote(name, forget)
        if self.store is None:
            # Memory only means one worker: drop there now, so a re-learn right after is never undone.
            known = await self.workers.drop.remote(name) or known
        return bool(known or on_disk)

    async def stats(self, show_detailed: bool = True) -> dict:
        directory = await self.directory.stats.remote()
        summary = {"base_model": self.base_id, "store": directory["store"], "adapters": directory["adapters"],
                   "ingress": {"inflight": self.inflight, **self.counts}, "totals": directory["totals"]}
        if show_detailed:
            summary.update(workers=directory["workers"], leases=directory["leases"], latest=directory["latest"])
        return summary
