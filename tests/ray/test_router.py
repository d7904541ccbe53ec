"""The Serve request router (serve/app/router.py) on hand-made replica snapshots: it turns Serve's
replica info (queue-length cache, routing stats, multiplexed ids) into the affinity policy's ranking.
No Ray cluster is needed: RequestRouter can be built directly, and replicas are plain objects.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
from ray.serve._private.common import DeploymentHandleSource, DeploymentID, ReplicaID

from serve.app.router import AdapterAffinityRouter

DEPLOYMENT = DeploymentID(name="Worker", app_name="app")


def _replica(uid: str, *, resident=(), multiplexed=(), free_slots=1):
    return SimpleNamespace(replica_id=ReplicaID(unique_id=uid, deployment_id=DEPLOYMENT),
                           routing_stats={"resident": list(resident), "free_slots": free_slots},
                           multiplexed_model_ids=set(multiplexed))


def _request(ref: str | None):
    return SimpleNamespace(metadata=SimpleNamespace(multiplexed_model_id=ref or ""))


@pytest.fixture
def router():
    router = AdapterAffinityRouter(deployment_id=DEPLOYMENT, handle_source=DeploymentHandleSource.UNKNOWN)
    router.initialize_state(spill_queue_threshold=2, max_holders=4, seed=0)
    return router


def _queues(router, **lengths):
    for uid, length in lengths.items():
        router._replica_queue_len_cache.update(ReplicaID(unique_id=uid, deployment_id=DEPLOYMENT), length)


async def _ranked(router, replicas, ref) -> list[str]:
    ranks = await router.choose_replicas(replicas, _request(ref))
    assert all(len(rank) == 1 for rank in ranks)
    return [rank[0].replica_id.unique_id for rank in ranks]


async def test_holders_come_first_whether_reported_by_stats_or_multiplexing(router):
    replicas = [_replica("a"), _replica("b", resident=["x@1"]), _replica("c", multiplexed=["y@1"])]
    _queues(router, a=0, b=1, c=1)
    assert (await _ranked(router, replicas, "x@1"))[0] == "b"
    assert (await _ranked(router, replicas, "y@1"))[0] == "c"
    assert (await _ranked(router, replicas, None))[0] == "a"  # base model: least loaded


async def test_a_hot_adapter_spills_to_a_worker_with_free_slots(router):
    replicas = [_replica("hot", resident=["x@1"]), _replica("full", free_slots=0), _replica("free")]
    _queues(router, hot=5, full=0, free=0)
    assert await _ranked(router, replicas, "x@1") == ["free", "full", "hot"]
    _queues(router, hot=1)  # under the threshold again: back to the holder
    assert (await _ranked(router, replicas, "x@1"))[0] == "hot"


async def test_first_loads_prefer_free_slots(router):
    replicas = [_replica("full", free_slots=0), _replica("free", free_slots=3)]
    _queues(router, full=0, free=1)
    assert await _ranked(router, replicas, "new@1") == ["free", "full"]
    assert await router.choose_replicas([], _request("new@1")) == []
