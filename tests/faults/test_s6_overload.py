"""Scenario 6: more concurrent requests than the ingress admission limit. The excess is refused at once
with 429 and Retry-After, every admitted request finishes, and the replicas' memory stays bounded
(resident set size of every replica process measured before and after two overload rounds).
"""
from __future__ import annotations

import asyncio
import logging
import time

import httpx
import pytest

from serve.tiny_model import TINY_MODEL_ID

from .conftest import APP, APP_ARGS
from .fault_hooks import HOLD_S, SLOW_MARK
from .faults_support import replica_pids, rss_bytes

logger = logging.getLogger(__name__)

pytestmark = [pytest.mark.ray, pytest.mark.s3, pytest.mark.timeout(120)]

ADMITTED_AT_MOST = APP_ARGS["queues"]["max_inflight"] * APP_ARGS["ingress_replicas"]
BURST = ADMITTED_AT_MOST + 40
GROWTH_LIMIT = 200 * 2**20  # bytes a replica may grow over two overload rounds


async def _overload(url: str) -> list[tuple[int, float, str | None]]:
    async def one(i: int, client: httpx.AsyncClient):
        started = time.monotonic()
        response = await client.post(f"{url}/v1/completions", json={
            "model": TINY_MODEL_ID, "prompt": f"{SLOW_MARK} {i}", "max_tokens": 4})
        return response.status_code, time.monotonic() - started, response.headers.get("Retry-After")
    limits = httpx.Limits(max_connections=BURST + 10)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        return await asyncio.gather(*(one(i, client) for i in range(BURST)))


def test_overload_refuses_excess_quickly_and_memory_stays_bounded(app_url):
    pids = replica_pids(APP)
    assert len(pids) >= 5, pids  # 2 workers, 2 ingress, 1 directory
    before = rss_bytes(pids)
    for _ in range(2):
        results = asyncio.run(_overload(app_url))
        refused = [r for r in results if r[0] == 429]
        accepted = [r for r in results if r[0] == 200]
        assert len(refused) + len(accepted) == BURST, sorted({r[0] for r in results})
        assert len(refused) >= BURST - ADMITTED_AT_MOST and accepted
        assert all(retry_after for _, _, retry_after in refused)
        assert max(seconds for _, seconds, _ in refused) < HOLD_S, "a refusal waited for admitted work"
        assert min(seconds for _, seconds, _ in accepted) >= HOLD_S  # they really ran
    after = rss_bytes(pids)
    growth = {name: after[name] - before[name] for name in before if name in after}
    logger.info("replica RSS MiB before/after: %s",
                {name.split("#", 1)[1]: (before[name] >> 20, after[name] >> 20) for name in growth})
    assert len(growth) == len(before), "a replica died under overload"
    assert max(growth.values()) < GROWTH_LIMIT, growth
    served = httpx.post(f"{app_url}/v1/completions", timeout=60,
                        json={"model": TINY_MODEL_ID, "prompt": "ok?", "max_tokens": 2})
    assert served.status_code == 200, served.text
