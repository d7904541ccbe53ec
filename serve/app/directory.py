"""The Directory: the one small actor that knows, cluster-wide, the latest revision of every adapter,
who holds each adapter's learn lease, which worker holds which `name@rev`, and the hit/miss counts.

It is a Serve deployment with one replica (Serve restarts it if it dies; `__init__` then rebuilds the
revision table from the store). It is never on the token path: the ingress asks it once per request to
resolve `name` -> `name@rev`, workers report to it every `report_interval_s`. It does not run models,
read adapter tensors, or route requests (the request router does that with Serve's replica info).
"""
from __future__ import annotations

import asyncio
import logging
import time

from ray import serve

from serve.app.config import AppConfig, warn_if_local_store_on_cluster
from serve.app.leases import LeaseTable

logger = logging.getLogger(__name__)


def revision_seq(rev: str) -> int:
    """The sequence number of a revision id "{seq:06d}-{hex}" (docs/INTERFACES.md); -1 if not one."""
    head = rev.split("-", 1)[0]
    return int(head) if head.isdigit() else -1


class DirectoryCore:
    """The Directory's state and rules, without Ray (the deployment below wraps it)."""

    def __init__(self, store=None, *, report_interval_s: float = 1.0):
        self.store = store
        self.latest: dict[str, str] = {}
        self.leases = LeaseTable()
        self.workers: dict[str, dict] = {}  # worker id -> its last report (+ "seen_at")
        self.deletions: list[str] = []  # names whose resident copies workers must drop, in order
        self.report_interval_s = report_interval_s
        if store is not None:
            self.rebuild()

    def rebuild(self) -> int:
        """Reload the latest revision of every stored adapter (start-up, or after a restart)."""
        for name in self.store.list_adapters():
            rev = self.store.latest(name)
            if rev is not None:
                self.latest[name] = rev
        logger.info("directory rebuilt from %s: %d adapters", self.store.url, len(self.latest))
        return len(self.latest)

    def resolve(self, name: str) -> str | None:
        """Latest revision of `name`; a name unknown here is looked up in the store (imported by the CLI)."""
        rev = self.latest.get(name)
        if rev is None and self.store is not None:
            rev = self.store.latest(name)
            if rev is not None:
                self.latest[name] = rev
        return rev

    def set_latest(self, name: str, rev: str) -> str:
        """Record a committed revision; never moves backwards (a slow report cannot undo a newer learn)."""
        current = self.latest.get(name)
        if current is None or revision_seq(rev) >= revision_seq(current):
            self.latest[name] = rev
        return self.latest[name]

    def drop(self, name: str, *, forget: bool) -> bool:
        """Ask every worker to drop resident copies of `name`; `forget` also drops its revision pointer."""
        known = name in self.latest
        self.deletions.append(name)
        if forget:
            self.latest.pop(name, None)
        return known

    def report(self, worker_id: str, report: dict, seen_deletions: int) -> dict:
        """A worker's periodic report; the answer lists deletions it has not applied yet."""
        report = dict(report, seen_at=time.monotonic())
        self.workers[worker_id] = report
        return {"deletions": self.deletions[seen_deletions:], "seen": len(self.deletions)}

    def live_workers(self) -> dict[str, dict]:
        """Reports fresh enough to trust; a worker silent for 5 intervals is presumed gone."""
        horizon = time.monotonic() - 5 * self.report_interval_s
        return {wid: rep for wid, rep in self.workers.items() if rep["seen_at"] >= horizon}

    def holders(self, ref: str) -> list[str]:
        return sorted(wid for wid, rep in self.live_workers().items() if ref in rep.get("resident", ()))

    def stats(self) -> dict:
        workers = self.live_workers()
        keys = ("hits", "misses", "loads", "evictions", "store_reads", "requests", "queue_depth")
        totals = {key: sum(int(rep.get(key, 0)) for rep in workers.values()) for key in keys}
        per_worker = {wid: {k: v for k, v in rep.items() if k != "seen_at"} for wid, rep in workers.items()}
        return {"adapters": len(self.latest), "latest": dict(sorted(self.latest.items())),
                "leases": self.leases.snapshot(), "expired_leases": self.leases.expired_count,
                "workers": per_worker, "totals": totals,
                "store": self.store.url if self.store is not None else None}


@serve.deployment(num_replicas=1, max_ongoing_requests=100_000, ray_actor_options={"num_cpus": 0})
class Directory:
    """Serve deployment around DirectoryCore; every method is a cheap, non-blocking call."""

    def __init__(self, config: dict, store_factory=None):
        app_config = AppConfig(**config)
        store = open_app_store(app_config.store_url, store_factory)
        _warn_on_multinode(app_config.store_url)
        self.core = DirectoryCore(store, report_interval_s=app_config.routing.report_interval_s)
        self._lease_ttl_s = app_config.routing.lease_ttl_s
        self._expiry_task = asyncio.get_running_loop().create_task(self._expire_leases())

    async def _expire_leases(self) -> None:
        while True:  # why a loop: a dead holder never calls again, so expiry cannot wait for a call
            await asyncio.sleep(min(1.0, self._lease_ttl_s / 4))
            for name in self.core.leases.expire():
                logger.warning("learn lease on %r expired (its holder stopped renewing)", name)

    async def resolve(self, name: str) -> str | None:
        if name in self.core.latest or self.core.store is None:
            return self.core.latest.get(name)
        return await asyncio.to_thread(self.core.resolve, name)  # store read: off the actor's loop

    async def set_latest(self, name: str, rev: str) -> str:
        return self.core.set_latest(name, rev)

    async def list_adapters(self) -> list[str]:
        return sorted(self.core.latest)

    async def drop(self, name: str, forget: bool) -> bool:
        return self.core.drop(name, forget=forget)

    async def acquire_lease(self, name: str, holder: str, wait_s: float) -> str:
        return await self.core.leases.acquire(name, holder, self._lease_ttl_s, wait_s)

    async def renew_lease(self, name: str, token: str) -> bool:
        return self.core.leases.renew(name, token)

    async def release_lease(self, name: str, token: str) -> bool:
        return self.core.leases.release(name, token)

    async def report(self, worker_id: str, report: dict, seen_deletions: int) -> dict:
        return self.core.report(worker_id, report, seen_deletions)

    async def holders(self, ref: str) -> list[str]:
        return self.core.holders(ref)

    async def stats(self) -> dict:
        return self.core.stats()


def open_app_store(url: str | None, store_factory=None):
    """The store for `url` (None -> memory only); store_factory overrides adapters_store.open_store."""
    if not url:
        return None
    if store_factory is None:
        from adapters_store import open_store as store_factory
    return store_factory(url)


def _warn_on_multinode(url: str | None) -> None:
    import ray

    alive = sum(1 for node in ray.nodes() if node.get("Alive"))
    warn_if_local_store_on_cluster(url, alive)
