"""A multi-node Ray cluster (ray.cluster_utils.Cluster) whose worker nodes declare one GPU each gets
exactly one worker replica per GPU, one per node; overload is refused with 429/503 + Retry-After
instead of queueing without bound; a worker whose engine fails its health check is replaced; deleting
the app lets a running request finish. The fake engine keeps these nodes light (no model is loaded; on this
CPU-only machine the real engine would fall back to CPU anyway).
"""
from __future__ import annotations

import asyncio
import collections

import httpx
import pytest
import ray
from ray import serve
from ray.cluster_utils import Cluster

from ray_helpers import free_port, wait_for, worker_env
from serve.app.builder import build_app
from serve.tiny_model import TINY_MODEL_ID

pytestmark = [pytest.mark.ray, pytest.mark.timeout(240)]

FAKE = "fake_engine:FakeEngine"


@pytest.fixture(scope="module")
def gpu_cluster(tmp_path_factory):
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    for _ in range(2):
        cluster.add_node(num_cpus=1, num_gpus=1)
    ray.init(address=cluster.address, runtime_env={"env_vars": worker_env()}, logging_level="WARNING")
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield f"http://127.0.0.1:{port}", tmp_path_factory.mktemp("store")
    serve.shutdown()
    ray.shutdown()
    cluster.shutdown()


def test_one_worker_per_gpu(gpu_cluster):
    url, store = gpu_cluster
    args = {"engine_factory": FAKE, "store_url": str(store), "worker_num_cpus": 0.1}
    serve.run(build_app(args), name="gpu", route_prefix="/")
    try:
        _check_one_worker_per_gpu(url)
    finally:  # later tests deploy at the same route prefix
        serve.delete("gpu")


def _check_one_worker_per_gpu(url: str) -> None:
    workers = wait_for(lambda: len(w := httpx.get(f"{url}/v1/stats").json()["workers"]) == 2 and w)
    assert sorted(len(rep["gpu_ids"]) for rep in workers.values()) == [1, 1]
    assert len({rep["node_id"] for rep in workers.values()}) == 2
    head = ray.get_runtime_context().get_node_id()
    assert head not in {rep["node_id"] for rep in workers.values()}
    learned = httpx.post(f"{url}/v1/adapters/g/learn", timeout=30,
                         json={"examples": [{"prompt": "p", "response": "taught"}]})
    assert learned.status_code == 200, learned.text

    # The fake engine keeps what it learns in its own memory (no store copy), so only the worker that
    # learned can answer; routers hear of that worker within about a second (multiplexed ids and routing
    # stats), so a request sent before that may land on the other worker: retry until routed.
    def answered():
        answer = httpx.post(f"{url}/v1/completions", json={"model": "g", "prompt": "p"}, timeout=30).json()
        return answer.get("choices") and answer["choices"][0]["text"]
    assert wait_for(answered, timeout_s=15, interval_s=0.5) == "taught"


def _flood(url: str, count: int) -> collections.Counter:
    async def flood():
        async with httpx.AsyncClient(timeout=60) as client:
            return await asyncio.gather(*(client.post(f"{url}/v1/completions",
                                                      json={"model": TINY_MODEL_ID, "prompt": str(i)})
                                          for i in range(count)))
    responses = asyncio.run(flood())
    refused = [r for r in responses if r.status_code != 200]
    assert all(r.headers["retry-after"] == "3" and r.json()["error"]["message"] for r in refused)
    return collections.Counter(r.status_code for r in responses)


@pytest.mark.parametrize("queues, refusal", [
    ({"max_inflight": 3}, 429),  # the ingress's own admission limit
    ({"max_inflight": 100, "worker_max_ongoing_requests": 1, "worker_max_queued_requests": 1}, 503),
])
def test_overload_is_refused_with_retry_after(gpu_cluster, queues, refusal):
    url, store = gpu_cluster
    args = {"engine_factory": FAKE, "store_url": str(store), "worker_num_cpus": 0.1,
            "engine_options": {"delay_s": 2.0}, "queues": {**queues, "retry_after_s": 3}}
    serve.run(build_app(args), name="busy", route_prefix="/")
    try:
        statuses = _flood(url, 12)
    finally:
        serve.delete("busy")
    assert set(statuses) == {200, refusal} and statuses[refusal] >= 6, statuses


def _worker_ids(url: str) -> set[str]:
    return set(httpx.get(f"{url}/v1/stats", timeout=30).json()["workers"])


def test_health_check_replaces_a_broken_worker_and_shutdown_drains(gpu_cluster, tmp_path):
    url, store = gpu_cluster
    marker = tmp_path / "broken"
    args = {"engine_factory": FAKE, "store_url": str(store), "worker_num_cpus": 0.1, "num_workers": 1,
            "use_gpu": False, "health_check_period_s": 1,
            "engine_options": {"delay_s": 1.5, "broken_marker": str(marker)},
            "routing": {"report_interval_s": 0.2}}
    serve.run(build_app(args), name="life", route_prefix="/")
    first = wait_for(lambda: _worker_ids(url))
    marker.touch()  # the engine reports itself broken: Serve must replace the replica
    wait_for(lambda: serve.status().applications["life"].deployments["Worker"].status != "HEALTHY", 30)
    marker.unlink()
    wait_for(lambda: serve.status().applications["life"].deployments["Worker"].status == "HEALTHY", 60)
    assert wait_for(lambda: (ids := _worker_ids(url)) and not ids & first and ids, 30)

    async def request_during_shutdown():
        async with httpx.AsyncClient(timeout=60) as client:
            pending = asyncio.ensure_future(client.post(f"{url}/v1/completions",
                                                        json={"model": TINY_MODEL_ID, "prompt": "slow"}))
            await asyncio.sleep(0.5)  # the request is running on the worker (1.5 s)
            await asyncio.to_thread(serve.delete, "life")
            return await pending
    response = asyncio.run(request_during_shutdown())
    assert response.status_code == 200 and response.json()["choices"][0]["text"] == "echo:slow"
