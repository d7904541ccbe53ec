"""Scenario 9: the app is redeployed (serve.run with a changed config, what `serve deploy` does) while
requests run. Requests already running complete; the new config takes effect; adapters learned before
are still served. Runs last in the package (file order): it leaves the changed config deployed.
"""
from __future__ import annotations

import asyncio
import threading

import httpx
import pytest

from .conftest import APP
from .fault_hooks import HOLD_S, SLOW_MARK
from .faults_support import post_with_retry

pytestmark = [pytest.mark.ray, pytest.mark.s3, pytest.mark.timeout(180)]

NEW_MAX_TOKENS = 48


async def _running_requests(url: str, count: int) -> list[httpx.Response]:
    async with httpx.AsyncClient(timeout=120) as client:
        return await asyncio.gather(*(client.post(f"{url}/v1/completions", json={
            "model": "harbor", "prompt": f"{SLOW_MARK} request {i}", "max_tokens": 4}) for i in range(count)))


def test_redeploy_lets_running_requests_complete(app_url, app_args):
    from ray import serve

    from serve.app.builder import build_app

    learned, _ = post_with_retry(f"{app_url}/v1/adapters/harbor/learn",
                                 {"examples": ["harbor text"], "steps": 2})
    assert learned.status_code == 200, learned.text
    results: list = []
    runner = threading.Thread(target=lambda: results.extend(asyncio.run(_running_requests(app_url, 6))))
    runner.start()
    threading.Event().wait(HOLD_S / 3)  # the requests are inside the workers now
    changed = dict(app_args, limits=dict(app_args["limits"], max_tokens=NEW_MAX_TOKENS))
    serve.run(build_app(changed), name=APP, route_prefix="/")
    runner.join(120)
    assert not runner.is_alive() and len(results) == 6
    assert [r.status_code for r in results] == [200] * 6, [r.text for r in results if r.status_code != 200]
    assert all(r.json()["system_fingerprint"] == f"harbor@{learned.json()['revision']}" for r in results)

    over, _ = post_with_retry(f"{app_url}/v1/completions",
                              {"model": "harbor", "prompt": "x", "max_tokens": NEW_MAX_TOKENS + 1})
    assert over.status_code == 422 and "max_tokens" in over.json()["error"]["message"], over.text
    again, _ = post_with_retry(f"{app_url}/v1/completions", {"model": "harbor", "prompt": "x", "max_tokens": 2})
    assert again.status_code == 200, again.text
    assert again.json()["system_fingerprint"] == f"harbor@{learned.json()['revision']}"
