"""Adapter-affinity routing policy: which worker replica should serve a request for `name@rev`.

Pure Python, no Ray and no torch. It is used twice: by the Ray Serve request router (serve/app/router.py),
which turns Serve's running replicas into `ReplicaView`s and calls `AffinityPolicy.rank`, and by the
routing simulation in benchmarks/bench_routing.py, which keeps a `ResidentLRU` per simulated worker.

Rules (a "holder" is a replica whose device slots already hold the ref):
  1. base model (ref None): least-loaded replica first.
  2. affinity: the least-loaded holder whose queue is under the queue limit goes first. The limit is
     `spill_queue_threshold`, lowered to ceil(balance x mean queue) (mean counting this request) when
     `balance` is set: "consistent hashing with bounded loads" (Mirrokni et al., 2016), so that
     affinity never lets one replica's queue run far above the average.
  3. spill: when every holder is at or over the limit (a hot adapter), non-holders whose queue is at
     least `spill_margin` shorter than the best holder's go first, preferring free slots, then short
     queues; that replica loads the adapter and becomes a holder. The margin is there because a spill
     costs a load (and evicts someone's adapter), so it must save more than one request of waiting.
     With `max_holders` set and reached, spilling needs the best holder at twice the limit.
  4. first load (no holder): replicas under the limit with free slots, then under the limit without
     free slots, then the rest; least-loaded first within each group.
Ties break by a seeded random number, so a fixed seed and the same calls give the same rankings.

It does not know how replicas load or evict adapters, how queue lengths are measured, or which
revision of an adapter is the latest: callers pass a resolved `name@rev` and a snapshot of each replica.
"""
from __future__ import annotations

import math
import random
from collections import OrderedDict
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import Sequence

__all__ = ["ReplicaView", "AffinityPolicy", "ResidentLRU"]


@dataclass(frozen=True)
class ReplicaView:
    """A snapshot of one worker replica, as the router sees it when a request arrives."""

    replica_id: str
    queue_len: int  # requests ongoing + queued at that replica
    free_slots: int  # device adapter slots not in use
    resident: AbstractSet[str]  # "name@rev" refs loaded on that replica (device slots); a frozenset


class AffinityPolicy:
    """Ranks replicas for one request: affinity to holders, spill when hot, free slots for first loads."""

    def __init__(self, *, spill_queue_threshold: int = 8, max_holders: int | None = None,
                 balance: float | None = 1.5, spill_margin: int = 2, seed: int | None = None):
        if spill_queue_threshold < 1:
            raise ValueError(f"spill_queue_threshold must be >= 1, got {spill_queue_threshold}")
        if max_holders is not None and max_holders < 1:
            raise ValueError(f"max_holders must be >= 1 or None, got {max_holders}")
        if balance is not None and balance < 1.0:
            raise ValueError(f"balance must be >= 1.0 or None, got {balance}")
        if spill_margin < 1:
            raise ValueError(f"spill_margin must be >= 1, got {spill_margin}")
        self.spill_queue_threshold = spill_queue_threshold
        self.max_holders = max_holders
        self.balance = balance
        self.spill_margin = spill_margin
        self._rng = random.Random(seed)

    def rank(self, ref: str | None, replicas: Sequence[ReplicaView]) -> list[str]:
        """Replica ids, best first, for a request for `ref` (None = base model)."""
        if not replicas:
            return []
        # One random tie-breaker per replica per call: equal keys are ordered randomly but reproducibly.
        tiebreak = {view.replica_id: self._rng.random() for view in replicas}
        by_queue = lambda view: (view.queue_len, tiebreak[view.replica_id])  # noqa: E731
        if ref is None:
            return _ids(sorted(replicas, key=by_queue))
        limit = self.queue_limit(replicas)
        holders = sorted((view for view in replicas if ref in view.resident), key=by_queue)
        others = sorted((view for view in replicas if ref not in view.resident),
                        key=lambda view: self._first_load_key(view, limit, tiebreak[view.replica_id]))
        if not holders:
            return _ids(others)
        best_queue = holders[0].queue_len
        if best_queue < limit or not self._may_spill(best_queue, len(holders), limit):
            return _ids(holders + others)
        # Hot: spill targets are non-holders that wait clearly less than the best holder.
        spill = [view for view in others if view.queue_len <= best_queue - self.spill_margin]
        rest = [view for view in others if view.queue_len > best_queue - self.spill_margin]
        return _ids(spill + holders + rest)

    def choose(self, ref: str | None, replicas: Sequence[ReplicaView]) -> str:
        """The best replica id for `ref` (the head of `rank`); ValueError when there is no replica."""
        ranked = self.rank(ref, replicas)
        if not ranked:
            raise ValueError("no replicas to route to")
        return ranked[0]

    def queue_limit(self, replicas: Sequence[ReplicaView]) -> int:
        """Queue length at which a holder counts as full for this request (>= 1)."""
        if self.balance is None:
            return self.spill_queue_threshold
        total = sum(view.queue_len for view in replicas) + 1  # + 1: the request being routed
        bounded = math.ceil(self.balance * total / len(replicas))
        return max(1, min(self.spill_queue_threshold, bounded))

    def _may_spill(self, best_queue: int, holder_count: int, limit: int) -> bool:
        # Past max_holders, copy the adapter once more only under heavy overload (twice the limit).
        if self.max_holders is None or holder_count < self.max_holders:
            return True
        return best_queue >= 2 * limit

    @staticmethod
    def _first_load_key(view: ReplicaView, limit: int, tiebreak: float) -> tuple:
        # Under-limit replicas first; among them a free slot avoids evicting another adapter.
        return (view.queue_len >= limit, view.free_slots <= 0, view.queue_len, tiebreak)


def _ids(views: list[ReplicaView]) -> list[str]:
    return [view.replica_id for view in views]


class ResidentLRU:
    """The device slots of one (simulated) replica: an LRU set of refs with a fixed capacity.

    `serve(ref)` marks `ref` as just used, loading it (and evicting the least recently used ref when
    full) if it was not resident. `loads` and `evictions` count what happened so far.
    """

    def __init__(self, slots: int):
        if slots < 1:
            raise ValueError(f"slots must be >= 1, got {slots}")
        self.slots = slots
        self._refs: OrderedDict[str, None] = OrderedDict()
        self.loads = 0
        self.evictions = 0

    def serve(self, ref: str) -> tuple[bool, str | None]:
        """Use `ref`; returns (loaded, evicted): whether it had to be loaded, and which ref it displaced."""
        if ref in self._refs:
            self._refs.move_to_end(ref)
            return False, None
        evicted = None
        if len(self._refs) >= self.slots:
            evicted, _ = self._refs.popitem(last=False)
            self.evictions += 1
        self._refs[ref] = None
        self.loads += 1
        return True, evicted

    @property
    def resident(self) -> AbstractSet[str]:
        """A live read-only view of the resident refs (it changes as the LRU changes)."""
        return self._refs.keys()

    @property
    def free_slots(self) -> int:
        return self.slots - len(self._refs)

    def __contains__(self, ref: object) -> bool:
        return ref in self._refs

    def __len__(self) -> int:
        return len(self._refs)

    def snapshot(self) -> frozenset[str]:
        """The resident refs as an immutable set (for a `ReplicaView` that outlives this moment)."""
        return frozenset(self._refs)
