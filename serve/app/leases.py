"""Learn leases: at most one trainer per adapter, waiters served first come first served, and a lease
whose holder stops renewing it (the holder died) expires so the next waiter gets it.

Pure asyncio, no Ray: the Directory actor owns one `LeaseTable`. It knows nothing about revisions or
workers; a holder is just a string naming who asked (for stats and logs).
"""
from __future__ import annotations

import asyncio
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Callable


@dataclass
class Lease:
    token: str
    holder: str
    ttl_s: float
    deadline: float  # monotonic seconds; renewals push it forward


@dataclass
class _Waiter:
    holder: str
    ttl_s: float
    granted: asyncio.Future = field(repr=False)


class LeaseTable:
    """FIFO leases keyed by adapter name."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._held: dict[str, Lease] = {}
        self._waiting: dict[str, deque[_Waiter]] = {}
        self.expired_count = 0

    async def acquire(self, name: str, holder: str, ttl_s: float, wait_s: float) -> str:
        """The lease token once `name` is ours; TimeoutError after wait_s seconds in the queue."""
        self.expire()
        if name not in self._held and not self._waiting.get(name):
            return self._grant(name, holder, ttl_s).token
        waiter = _Waiter(holder, ttl_s, asyncio.get_running_loop().create_future())
        self._waiting.setdefault(name, deque()).append(waiter)
        try:
            return await asyncio.wait_for(asyncio.shield(waiter.granted), timeout=wait_s)
        except (asyncio.TimeoutError, asyncio.CancelledError):
            self._abandon(name, waiter)
            raise

    def renew(self, name: str, token: str) -> bool:
        """Extend a held lease by its ttl; False if it is not held by `token` any more."""
        lease = self._held.get(name)
        if lease is None or lease.token != token:
            return False
        lease.deadline = self._clock() + lease.ttl_s
        return True

    def release(self, name: str, token: str) -> bool:
        lease = self._held.get(name)
        if lease is None or lease.token != token:
            return False
        del self._held[name]
        self._grant_next(name)
        return True

    def expire(self) -> list[str]:
        """Drop leases past their deadline (their holder stopped renewing); names whose lease expired."""
        now = self._clock()
        expired = [name for name, lease in self._held.items() if lease.deadline < now]
        for name in expired:
            del self._held[name]
            self.expired_count += 1
            self._grant_next(name)
        return expired

    def snapshot(self) -> dict:
        return {name: {"holder": lease.holder, "waiting": len(self._waiting.get(name, ()))}
                for name, lease in self._held.items()}

    def _grant(self, name: str, holder: str, ttl_s: float) -> Lease:
        lease = Lease(uuid.uuid4().hex, holder, ttl_s, self._clock() + ttl_s)
        self._held[name] = lease
        return lease

    def _grant_next(self, name: str) -> None:
        queue = self._waiting.get(name)
        while queue:
            waiter = queue.popleft()
            if not waiter.granted.done():
                waiter.granted.set_result(self._grant(name, waiter.holder, waiter.ttl_s).token)
                break
        if queue is not None and not queue:
            del self._waiting[name]

    def _abandon(self, name: str, waiter: _Waiter) -> None:
        # A waiter that gave up: if the grant raced with the timeout/cancel, hand the lease on.
        queue = self._waiting.get(name)
        if queue is not None and waiter in queue:
            queue.remove(waiter)
            if not queue:
                del self._waiting[name]
        if waiter.granted.done() and not waiter.granted.cancelled():
            self.release(name, waiter.granted.result())
        else:
            waiter.granted.cancel()
