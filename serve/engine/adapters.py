"""The engine's adapter tiers above the device: a host-memory LRU of validated adapters, the store
behind it, single-flight loads per `name@rev`, and name -> latest-revision resolution.

Device slots live in slots.py; this module never touches the device. Adapters without a stored copy
(memory-only mode, or not yet committed) are pinned: eviction never drops the only copy.
"""
from __future__ import annotations

import logging
import threading
import zlib
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from adapters_store.errors import AdapterNotFoundError, RevisionNotFoundError
from adapters_store.names import format_ref, new_revision_id, parse_ref, revision_seq, validate_name
from serve.engine.validate import (ModuleShapes, Weights, fresh_weights, pack, scale_from_config, to_peft,
                                   to_weights)

logger = logging.getLogger(__name__)

MEMORY_REVISIONS_KEPT = 3   # memory-only revisions per adapter (the latest included)


@dataclass(eq=False)
class HostAdapter:
    """One validated adapter revision in host memory (fp32 CPU tensors)."""

    name: str
    revision: str | None          # None: a fresh, never-installed adapter (learn's starting point)
    weights: Weights              # module path -> (A [r, in], B [out, r])
    rank: int
    alpha: float
    scale: float
    stored: bool                  # a store holds this revision, so host eviction may drop it
    optimizer_state: dict[str, torch.Tensor] | None = None
    meta: dict = field(default_factory=dict)
    use_rslora: bool = False      # scale = alpha / sqrt(r) (else alpha / r); kept so commits say so

    @property
    def key(self) -> str:
        return format_ref(self.name, self.revision)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes + b.nbytes for a, b in self.weights.values())


@dataclass
class TierCounters:
    host_hits: int = 0
    host_misses: int = 0
    store_reads: int = 0
    host_evictions: int = 0


class AdapterManager:
    """Host tier + store access. Thread-safe; loads run on a small thread pool, one per key at a time."""

    def __init__(self, shapes: ModuleShapes, *, store=None, host_cache_size: int, max_rank: int,
                 default_rank: int, default_alpha: float, model_path: str):
        self.shapes, self.store, self.capacity = shapes, store, host_cache_size
        self.max_rank, self.default_rank, self.default_alpha = max_rank, default_rank, default_alpha
        self.model_path = model_path
        self.counters = TierCounters()
        self._host: OrderedDict[str, HostAdapter] = OrderedDict()
        self._latest: dict[str, str] = {}            # name -> latest resident revision
        self._inflight: dict[str, Future] = {}
        self._lock = threading.RLock()
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="adapter-load")
        self.on_evict = None                         # optional callback(key) when the host drops a key

    # ---------------------------------------------------------------- resolution
    def resolve(self, adapter: str) -> str | None:
        """'name' -> 'name@rev' served now (resident latest, else the store's), None if unknown;
        'name@rev' -> that revision with a bare sequence number expanded."""
        name, rev = parse_ref(adapter)
        if rev is not None:
            return format_ref(name, self._expand_rev(name, rev))
        with self._lock:
            if name in self._latest:
                return format_ref(name, self._latest[name])
        latest = self.store.latest(name) if self.store is not None else None
        if latest is None:
            return None
        with self._lock:  # remembered: later bare-name lookups need no store round trip
            current = self._latest.setdefault(name, latest)
        return format_ref(name, current)

    def _expand_rev(self, name: str, rev: str) -> str:
        if not rev.isdigit():
            return rev
        with self._lock:
            known = [a.revision for a in self._host.values() if a.name == name and a.revision]
        if self.store is not None:
            known += self.store.list_revisions(name)
        for candidate in known:
            if revision_seq(candidate) == int(rev):
                return candidate
        raise RevisionNotFoundError(f"adapter {name!r} has no revision {rev}")

    # ---------------------------------------------------------------- host tier
    def get(self, key: str) -> HostAdapter | None:
        with self._lock:
            adapter = self._host.get(key)
            if adapter is not None:
                self._host.move_to_end(key)
            return adapter

    def resident(self) -> list[str]:
        with self._lock:
            return list(self._host)

    def _put(self, adapter: HostAdapter) -> None:
        """Insert into the host tier, evicting LRU stored entries first (never a pinned one)."""
        with self._lock:
            self._host.pop(adapter.key, None)
            self._evict_for(1)
            self._host[adapter.key] = adapter

    def _evict_for(self, room: int) -> None:
        for key in list(self._host):
            if len(self._host) + room <= self.capacity:
                return
            # Only a revision the store holds may leave memory: it can be read back.
            if self._host[key].stored and self.store is not None:
                self._evict(key)

    def _evict(self, key: str) -> None:
        """The one eviction hook of the host tier."""
        self._host.pop(key, None)
        self.counters.host_evictions += 1
        logger.debug("host tier evicted %s", key)
        if self.on_evict is not None:
            self.on_evict(key)

    # ---------------------------------------------------------------- loads
    def load(self, key: str) -> Future:
        """Future of the HostAdapter for 'name@rev'; concurrent callers share one store read."""
        with self._lock:
            adapter = self._host.get(key)
            if adapter is not None:
                self._host.move_to_end(key)
                self.counters.host_hits += 1
                done: Future = Future()
                done.set_result(adapter)
                return done
            self.counters.host_misses += 1
            if key in self._inflight:
                return self._inflight[key]
            future = self._pool.submit(self._read_store, key)
            self._inflight[key] = future
        future.add_done_callback(lambda _f, k=key: self._finish_load(k))
        return future

    def _finish_load(self, key: str) -> None:
        with self._lock:
            self._inflight.pop(key, None)

    def _read_store(self, key: str) -> HostAdapter:
        name, rev = parse_ref(key)
        if self.store is None:
            raise AdapterNotFoundError(f"adapter {key} is not resident and there is no store")
        self.counters.store_reads += 1
        # Serving needs no optimizer state; a learn reads it when it starts (optimizer_state_of).
        record = self.store.read(name, rev, with_optimizer=False)
        weights, rank = to_weights(record.tensors, self.shapes, self.max_rank, key)
        alpha, scale = scale_from_config(record.config, rank, self.default_alpha, key)
        if record.meta.get("model_path") not in (None, self.model_path):
            logger.warning("%s was trained on %s, serving it on %s", key, record.meta.get("model_path"),
                           self.model_path)
        adapter = HostAdapter(name=name, revision=record.revision, weights=weights, rank=rank,
                              alpha=alpha, scale=scale, stored=True,
                              optimizer_state=record.optimizer_state, meta=dict(record.meta),
                              use_rslora=bool((record.config or {}).get("use_rslora")))
        self._put(adapter)
        return adapter

    def load_sync(self, key: str) -> HostAdapter:
        return self.load(key).result()

    def optimizer_state_of(self, adapter: HostAdapter) -> dict[str, torch.Tensor] | None:
        """The optimizer state to resume a learn from `adapter`: its own, else the stored one (read
        now; host copies loaded for serving do not hold it)."""
        if adapter.optimizer_state is not None or not adapter.stored or self.store is None:
            return adapter.optimizer_state
        self.counters.store_reads += 1
        return self.store.read(adapter.name, adapter.revision, with_optimizer=True).optimizer_state

    # ---------------------------------------------------------------- install / delete
    def install(self, name: str, tensors: dict[str, torch.Tensor], *, revision: str | None = None,
                stored: bool | None = None, alpha: float | None = None, config: dict | None = None,
                optimizer_state: dict | None = None, meta: dict | None = None) -> HostAdapter:
        """Validate PEFT tensors and make them the resident latest revision of `name`."""
        validate_name(name)
        weights, rank = to_weights(tensors, self.shapes, self.max_rank, name)
        cfg = dict(config or {})
        cfg.setdefault("lora_alpha", alpha if alpha is not None else self.default_alpha)
        alpha_value, scale = scale_from_config(cfg, rank, self.default_alpha, name)
        return self.install_weights(name, weights, rank=rank, alpha=alpha_value, scale=scale,
                                    use_rslora=bool(cfg.get("use_rslora")), revision=revision, stored=stored,
                                    optimizer_state=optimizer_state, meta=meta, repack=False)

    def install_weights(self, name: str, weights: Weights, *, rank: int, alpha: float, scale: float,
                        revision: str | None, stored: bool | None, optimizer_state: dict | None = None,
                        meta: dict | None = None, repack: bool = True,
                        use_rslora: bool = False) -> HostAdapter:
        """Install already-validated weights; a memory-only revision id is made when none is given."""
        with self._lock:
            if revision is None:
                current = self._latest.get(name)
                revision = new_revision_id(revision_seq(current) + 1 if current else 1)
            is_stored = bool(stored) if stored is not None else self.store is not None
            weights = pack(weights) if repack else weights
            adapter = HostAdapter(name=name, revision=revision, weights=weights, rank=rank, alpha=alpha,
                                  scale=scale, stored=is_stored, optimizer_state=optimizer_state,
                                  meta=dict(meta or {}), use_rslora=use_rslora)
            self._put(adapter)
            current = self._latest.get(name)
            if current is None or revision_seq(revision) >= revision_seq(current):
                self._latest[name] = revision
                self._drop_superseded(name, revision)
            return adapter

    def _drop_superseded(self, name: str, latest: str) -> None:
        """Keep only the newest MEMORY_REVISIONS_KEPT memory-only revisions of `name`: older ones can
        never become latest again, and pinning them all would grow memory with every learn (the
        adapter itself lives on as `latest`; recent revisions stay selectable as name@rev). Older
        stored revisions drop their optimizer state: a learn from one reads it back from the store."""
        for adapter in self._host.values():
            if adapter.name == name and adapter.stored and adapter.revision != latest:
                adapter.optimizer_state = None
        unstored = sorted((revision_seq(a.revision), key) for key, a in self._host.items()
                          if a.name == name and not a.stored and a.revision != latest)
        for _, key in unstored[:max(0, len(unstored) - (MEMORY_REVISIONS_KEPT - 1))]:
            self._evict(key)

    def fresh(self, name: str, rank: int | None = None) -> HostAdapter:
        """A new adapter whose output equals the base model's (not installed anywhere)."""
        rank = rank or self.default_rank
        weights = fresh_weights(self.shapes, rank, seed=zlib.crc32(name.encode()))
        return HostAdapter(name=name, revision=None, weights=weights, rank=rank,
                           alpha=self.default_alpha, scale=self.default_alpha / rank, stored=False)

    def delete(self, name: str) -> bool:
        with self._lock:
            keys = [key for key, adapter in self._host.items() if adapter.name == name]
            existed = bool(keys) or name in self._latest
            for key in keys:
                self._evict(key)
            self._latest.pop(name, None)
            return existed

    def note_latest(self, name: str, revision: str) -> None:
        """The store says `revision` is the latest: remember it when newer than the cached one."""
        with self._lock:
            current = self._latest.get(name)
            if current is None or revision_seq(revision) > revision_seq(current):
                self._latest[name] = revision

    def forget_latest(self, name: str) -> None:
        """Drop the cached latest revision of `name` (stale: a commit conflicted); the next bare-name
        resolve asks the store again."""
        with self._lock:
            self._latest.pop(name, None)

    def latest_revision(self, name: str) -> str | None:
        with self._lock:
            return self._latest.get(name)

    def state(self, name: str) -> dict[str, torch.Tensor] | None:
        """PEFT-keyed CPU copy of the resident latest revision of `name`."""
        with self._lock:
            rev = self._latest.get(name)
            adapter = self._host.get(format_ref(name, rev)) if rev else None
        return to_peft(adapter.weights) if adapter is not None else None

    def stats(self) -> dict:
        with self._lock:
            return {"host_adapters": len(self._host), "host_capacity": self.capacity,
                    "host_bytes": sum(a.nbytes for a in self._host.values()),
                    "host_pinned": sum(not a.stored for a in self._host.values()),
                    "loads_in_flight": len(self._inflight), **vars(self.counters)}

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
