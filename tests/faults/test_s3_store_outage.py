"""Scenario 3: the S3 endpoint goes away (the proxy in front of moto resets every connection) while
adapters are served and while a learn runs. Resident adapters keep serving; the learn answers 503,
acknowledges no revision and says exactly what was not saved; when S3 is back everything works again
without a restart, and nothing acknowledged was lost.
"""
from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from .fault_hooks import HOLD_S, SLOW_MARK
from .faults_support import post_with_retry

pytestmark = [pytest.mark.ray, pytest.mark.s3, pytest.mark.timeout(240)]

PROMPT = "Q: When is high tide?\nA:"


def _complete(url: str, model: str) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", timeout=60,
                      json={"model": model, "prompt": PROMPT, "max_tokens": 6, "temperature": 0})


def _learn_body(text: str) -> dict:
    return {"examples": [text], "steps": 2}


async def _learn_while_s3_goes_down(url: str, proxy) -> httpx.Response:
    async with httpx.AsyncClient(timeout=180) as client:
        learn = asyncio.create_task(client.post(f"{url}/v1/adapters/tide/learn",
                                                json=_learn_body(f"{SLOW_MARK} tide at noon")))
        await asyncio.sleep(HOLD_S / 3)  # the learn is running on a worker now
        proxy.down()
        return await learn


def test_s3_outage_keeps_serving_and_loses_nothing(app_url, s3_proxy, store):
    first, _ = post_with_retry(f"{app_url}/v1/adapters/tide/learn", _learn_body("High tide is at six."))
    assert first.status_code == 200, first.text
    rev1 = first.json()["revision"]
    baseline = _complete(app_url, "tide")
    assert baseline.status_code == 200, baseline.text
    try:
        started = time.monotonic()
        failed = asyncio.run(_learn_while_s3_goes_down(app_url, s3_proxy))
        elapsed = time.monotonic() - started
        assert failed.status_code == 503 and failed.headers.get("Retry-After"), failed.text
        message = failed.json()["error"]["message"]
        assert "not saved" in message and "tide" in message and rev1 in message, message
        assert elapsed < HOLD_S + 60, f"the failed learn took {elapsed:.0f} s"
        for _ in range(4):  # the resident adapter keeps serving while S3 is away
            during = _complete(app_url, "tide")
            assert during.status_code == 200, during.text
            assert during.json()["choices"][0]["text"] == baseline.json()["choices"][0]["text"]
            assert during.json()["system_fingerprint"] == f"tide@{rev1}"
        again = httpx.post(f"{app_url}/v1/adapters/tide/learn", json=_learn_body("tide again"), timeout=180)
        assert again.status_code == 503, again.text
    finally:
        s3_proxy.up()
    assert store.list_revisions("tide") == [rev1]  # nothing half-done became a revision
    back, _ = post_with_retry(f"{app_url}/v1/adapters/tide/learn", _learn_body("Tide is at seven now."))
    assert back.status_code == 200, back.text
    assert back.json()["report"]["parent"] == rev1
    fresh, _ = post_with_retry(f"{app_url}/v1/adapters/tide-new/learn", _learn_body("a new adapter"))
    assert fresh.status_code == 200, fresh.text
    after = _complete(app_url, "tide")
    assert after.status_code == 200 and after.json()["system_fingerprint"] == f"tide@{back.json()['revision']}"
    assert store.list_revisions("tide") == [rev1, back.json()["revision"]]
