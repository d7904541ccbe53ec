"""Scenarios 1 and 2: a worker replica dies with requests in flight, and the Directory actor dies.

Requests on the dead worker fail fast with a retryable 503 (never hang), Serve brings a replacement up,
the adapters the dead worker held are served again from the store, and a retrying client gets its
answer. A dead Directory is rebuilt from the store, routing goes on, and no learn lease stays stuck.
"""
from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from .conftest import APP
from .fault_hooks import HOLD_S, SLOW_MARK
from .faults_support import kill_replica, post_with_retry, replica_actor_names, running_replicas, wait_for

pytestmark = [pytest.mark.ray, pytest.mark.s3, pytest.mark.timeout(180)]

PROMPT = "Q: Who keeps the lighthouse?\nA:"


def _learn(url: str, name: str, text: str, steps: int = 3) -> dict:
    response, _ = post_with_retry(f"{url}/v1/adapters/{name}/learn", {"examples": [text], "steps": steps})
    assert response.status_code == 200, response.text
    return response.json()


def _complete(url: str, model: str, prompt: str = PROMPT) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", timeout=60,
                      json={"model": model, "prompt": prompt, "max_tokens": 8, "temperature": 0})


def _holder_of(url: str, ref: str) -> str:
    workers = httpx.get(f"{url}/v1/stats", timeout=30).json()["workers"]
    return next(wid for wid, report in workers.items() if ref in report["resident"])


async def _in_flight_burst(url: str, count: int) -> list[tuple[int, float, dict]]:
    """`count` held requests at once; (status, seconds, headers) each."""
    async def one(i: int):
        started = time.monotonic()
        async with httpx.AsyncClient(timeout=60) as client:
            response = await client.post(f"{url}/v1/completions", json={
                "model": "lighthouse", "prompt": f"{SLOW_MARK} request {i}", "max_tokens": 4})
        return response.status_code, time.monotonic() - started, dict(response.headers), response.text
    return await asyncio.gather(*(one(i) for i in range(count)))


def test_worker_death_mid_request(app_url, store):
    learned = _learn(app_url, "lighthouse", "The keeper is Ada.")
    before = _complete(app_url, "lighthouse")
    assert before.status_code == 200, before.text
    ref = f"lighthouse@{learned['revision']}"
    holder = wait_for(lambda: _holder_of(app_url, ref), 10)
    victim = next(i for i, name in enumerate(replica_actor_names(APP, "Worker")) if name.endswith(holder))

    async def scenario():
        burst = asyncio.create_task(_in_flight_burst(app_url, 8))
        await asyncio.sleep(HOLD_S / 3)  # every request of the burst is now inside a worker
        kill_replica(APP, "Worker", victim)
        return await burst
    results = asyncio.run(scenario())
    failed = [r for r in results if r[0] != 200]
    assert failed, "no request was in flight on the killed worker"
    for status, seconds, headers, text in failed:
        assert status == 503 and "Retry-After" in {k.title() for k in headers}, (status, text)
        assert seconds < HOLD_S + 10, f"a request on the dead worker took {seconds:.1f} s"
    assert all(seconds < HOLD_S + 10 for _, seconds, _, _ in results)

    wait_for(lambda: running_replicas(APP, "Worker") == 2, 90, 0.5)
    retried, _ = post_with_retry(f"{app_url}/v1/completions",
                                 {"model": "lighthouse", "prompt": PROMPT, "max_tokens": 8, "temperature": 0})
    assert retried.status_code == 200, retried.text
    assert retried.json()["choices"][0]["text"] == before.json()["choices"][0]["text"]
    assert retried.json()["system_fingerprint"] == ref
    assert store.latest("lighthouse") == learned["revision"]


def test_directory_death_rebuilds_and_frees_leases(app_url, store):
    first = _learn(app_url, "beacon", "The beacon is green.")

    async def learn_while_directory_dies():
        async with httpx.AsyncClient(timeout=90) as client:
            slow = asyncio.create_task(client.post(f"{app_url}/v1/adapters/beacon/learn", json={
                "examples": [f"{SLOW_MARK} the beacon turns red"], "steps": 2}))
            await asyncio.sleep(HOLD_S / 3)  # the slow learn holds beacon's lease now
            kill_replica(APP, "Directory")
            return await slow
    during = asyncio.run(learn_while_directory_dies())
    assert during.status_code in (200, 503), during.text
    # Routing continues (a retry covers the moment the Directory is being replaced).
    served, _ = post_with_retry(f"{app_url}/v1/completions",
                                {"model": "beacon", "prompt": "x", "max_tokens": 2})
    assert served.status_code == 200, served.text
    stats = httpx.get(f"{app_url}/v1/stats", timeout=30).json()
    assert stats["latest"]["beacon"] == store.latest("beacon")  # rebuilt from the store
    assert stats["latest"]["lighthouse"] == store.latest("lighthouse")
    started = time.monotonic()
    after = _learn(app_url, "beacon", "The beacon is blue.", steps=2)
    assert time.monotonic() - started < 30, "the next learn waited for a stuck lease"
    revisions = store.list_revisions("beacon")
    acknowledged = [first["revision"], after["revision"]]
    if during.status_code == 200:
        acknowledged.insert(1, during.json()["revision"])
    assert set(acknowledged) <= set(revisions) and revisions[-1] == after["revision"]
    assert wait_for(lambda: httpx.get(f"{app_url}/v1/stats", timeout=30).json()["leases"] == {}, 20)


def test_lease_of_a_dead_ingress_expires(app_url, store):
    """The ingress holding an adapter's learn lease dies mid-learn: the lease expires (lease_ttl_s), the
    next learn on that adapter gets it and lands on top of whatever the dead one committed."""
    from .conftest import APP_ARGS
    from .faults_support import replica_pids

    first = _learn(app_url, "keeper", "The keeper sleeps at noon.")

    async def kill_the_holder():
        async with httpx.AsyncClient(timeout=90) as client:
            slow = asyncio.create_task(client.post(f"{app_url}/v1/adapters/keeper/learn", json={
                "examples": [f"{SLOW_MARK} the keeper wakes"], "steps": 2}))
            holder = await asyncio.to_thread(wait_for, lambda: httpx.get(
                f"{app_url}/v1/stats", timeout=30).json()["leases"].get("keeper"), 10, 0.1)
            pid = int(holder["holder"].rsplit(":", 1)[1])
            victim = next(name for name, p in replica_pids(APP).items() if p == pid)
            index = replica_actor_names(APP, "Ingress").index(victim)
            await asyncio.to_thread(kill_replica, APP, "Ingress", index)
            return await slow
    dead = asyncio.run(kill_the_holder())
    assert dead.status_code >= 500, dead.text  # its client never got an acknowledgement
    started = time.monotonic()
    after = _learn(app_url, "keeper", "The keeper sleeps at one.", steps=2)
    assert time.monotonic() - started < APP_ARGS["routing"]["lease_ttl_s"] + 20
    revisions = store.list_revisions("keeper")
    assert revisions[0] == first["revision"] and revisions[-1] == after["revision"]
    assert after["report"]["parent"] == revisions[-2]  # on top of the latest, whoever committed it
    wait_for(lambda: running_replicas(APP, "Ingress") == 2, 60, 0.5)
