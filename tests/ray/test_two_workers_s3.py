"""Two CPU workers sharing one S3 store (moto server on loopback, AWS env passed to Ray workers through
the job's runtime_env): a learn on one worker is served by the other, requests for an adapter go to a
worker that holds it (hit/miss counters), concurrent learns on one adapter land as a chain.
"""
from __future__ import annotations

import asyncio

import httpx
import pytest
from ray import serve

from adapters_store import open_store
from ray_helpers import deploy, wait_for
from testkit import new_s3_bucket
from serve.app.builder import build_app

pytestmark = [pytest.mark.ray, pytest.mark.s3, pytest.mark.timeout(300)]

PROMPT = "Q: Which planet is the shared one?\nA:"
ANSWER = " It is the ringed planet."


@pytest.fixture(scope="module")
def store_url(s3_server):
    return f"s3://{new_s3_bucket(s3_server, 'two')}/adapters"


@pytest.fixture(scope="module")
def app(ray_local, store_url):
    args = {"store_url": store_url, "num_workers": 2, "ingress_replicas": 2, "worker_num_cpus": 0.5,
            "max_slots": 4,
            "host_cache_size": 8, "routing": {"spill_queue_threshold": 1, "report_interval_s": 0.5}}
    deploy(build_app(args), name="two")
    yield ray_local, serve.get_app_handle("two")
    serve.delete("two")


def _stats(url: str) -> dict:
    return httpx.get(f"{url}/v1/stats", timeout=30).json()


def _complete(url: str, model: str, max_tokens: int = 16) -> str:
    response = httpx.post(f"{url}/v1/completions", timeout=120, json={
        "model": model, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0})
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


@pytest.fixture(scope="module")
def learned(app, store_url):
    url, handle = app
    report = asyncio.run(_learn(handle, "shared", [{"prompt": PROMPT, "response": ANSWER}], 60))
    assert report["committed"]
    return report


async def _learn(handle, name, data, steps):
    return await handle.learn.remote(data, adapter=name, steps=steps)


def test_learn_is_committed_to_s3(app, store_url, learned):
    store = open_store(store_url)
    assert store.latest("shared") == learned["revision"]
    assert store.read("shared").meta["adapter_name"] == "shared"


def test_learn_on_one_worker_is_served_by_the_other(app, learned):
    url, _ = app
    ref = f"shared@{learned['revision']}"
    # With a spill threshold of 1, concurrent requests overflow the learner onto the second worker,
    # which has to read the revision from S3.
    for _ in range(4):
        async def burst():
            async with httpx.AsyncClient(timeout=120) as client:
                return await asyncio.gather(*(client.post(f"{url}/v1/completions", json={
                    "model": "shared", "prompt": PROMPT, "max_tokens": 16, "temperature": 0})
                    for _ in range(8)))
        texts = [r.json()["choices"][0]["text"] for r in asyncio.run(burst())]
        assert all(text.startswith(ANSWER) for text in texts), texts
        holders = [w for w, rep in _stats(url)["workers"].items() if ref in rep["resident"]]
        if len(holders) == 2:
            break
    assert len(holders) == 2, _stats(url)["workers"]
    assert _stats(url)["totals"]["store_reads"] >= 1


def test_repeated_requests_hit_a_holder(app):
    url, handle = app
    report = asyncio.run(_learn(handle, "affine", [{"prompt": PROMPT, "response": " Affinity."}], 30))
    ref = f"affine@{report['revision']}"
    for _ in range(3):  # warm-up: Serve's routers learn where the ref lives
        _complete(url, "affine")
    wait_for(lambda: any(ref in rep["resident"] for rep in _stats(url)["workers"].values()))
    before = _stats(url)["totals"]
    for _ in range(10):
        assert _complete(url, "affine", 4)
    after = wait_for(lambda: (s := _stats(url)["totals"])["requests"] >= before["requests"] + 10 and s)
    assert after["misses"] == before["misses"], (before, after)
    assert after["hits"] >= before["hits"] + 10


def test_concurrent_learns_form_a_chain(app, store_url):
    _, handle = app

    async def three():
        return await asyncio.gather(*(_learn(handle, "chain", [f"chain text number {i} is here"], 2)
                                      for i in range(3)))
    reports = asyncio.run(three())
    by_parent = {report["parent"]: report["revision"] for report in reports}
    assert None in by_parent and len(by_parent) == 3
    chain = [by_parent[None]]
    while chain[-1] in by_parent:
        chain.append(by_parent[chain[-1]])
    assert open_store(store_url).list_revisions("chain") == chain


def test_read_your_writes_through_every_ingress(app):
    url, handle = app
    for round_ in range(3):
        report = asyncio.run(_learn(handle, "ryw", [f"read your writes, round {round_} of three"], 2))
        served = set()
        for _ in range(6):  # the proxy spreads these over both ingress replicas
            response = httpx.post(f"{url}/v1/completions", timeout=60,
                                  json={"model": "ryw", "prompt": "read", "max_tokens": 2})
            served.add(response.json()["system_fingerprint"])
        assert served == {f"ryw@{report['revision']}"}
