"""The worker deployment's request router: Serve's custom RequestRouter that ranks replicas with the
project's adapter-affinity policy (serve/routing.py).

For each request it builds a `ReplicaView` per running replica: the queue length from Serve's
queue-length cache (refreshed by Serve's probes), free slots and resident refs from the worker's
`record_routing_stats`, plus the refs Serve's multiplexing reports (fresher: pushed within 0.1 s of a
load). It returns one replica per rank, best first; Serve then probes them in that order and sends the
request to the first that accepts (so a full replica is skipped, never queued without bound).
It does not resolve revisions or load adapters.
"""
from __future__ import annotations

import logging
from typing import List, Optional

from ray.serve.request_router import (
    FIFOMixin, MultiplexMixin, PendingRequest, RequestRouter, RunningReplica,
)

from serve.routing import AffinityPolicy, ReplicaView

logger = logging.getLogger(__name__)


def replica_view(replica: RunningReplica, queue_len: Optional[int]) -> ReplicaView:
    """The policy's snapshot of one Serve replica."""
    stats = replica.routing_stats or {}
    resident = frozenset(stats.get("resident", ())) | frozenset(replica.multiplexed_model_ids)
    queue = queue_len if queue_len is not None else int(stats.get("queue", 0))
    return ReplicaView(replica_id=replica.replica_id.unique_id, queue_len=queue,
                       free_slots=int(stats.get("free_slots", 1)), resident=resident)


class AdapterAffinityRouter(FIFOMixin, MultiplexMixin, RequestRouter):
    """Affinity to holders of `name@rev`, spill of hot adapters, free slots for first loads."""

    def initialize_state(self, spill_queue_threshold: int = 8, max_holders: int | None = None,
                         seed: int | None = None):
        self.policy = AffinityPolicy(spill_queue_threshold=spill_queue_threshold, max_holders=max_holders,
                                     seed=seed)

    async def choose_replicas(self, candidate_replicas: List[RunningReplica],
                              pending_request: Optional[PendingRequest] = None) -> List[List[RunningReplica]]:
        if not candidate_replicas:
            return []
        if not hasattr(self, "policy"):  # initialize_state is only called when kwargs were configured
            self.initialize_state()
        ref = None
        if pending_request is not None:
            ref = pending_request.metadata.multiplexed_model_id or None
        by_id = {replica.replica_id.unique_id: replica for replica in candidate_replicas}
        views = [replica_view(replica, self._replica_queue_len_cache.get(replica.replica_id))
                 for replica in candidate_replicas]
        return [[by_id[replica_id]] for replica_id in self.policy.rank(ref, views)]
