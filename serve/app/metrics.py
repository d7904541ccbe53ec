"""Prometheus metrics of the application through ray.util.metrics (exported by Ray's metrics agent).

One `AppMetrics` per process, created lazily (Ray metrics need a connected Ray worker). It only counts
what callers tell it; it does not read engines or stores.
"""
from __future__ import annotations

from functools import lru_cache

from ray.util import metrics


class AppMetrics:
    """Counters and gauges; tag `worker` is the Serve replica id, `route` the HTTP/handle method."""

    def __init__(self):
        self.requests = metrics.Counter("online_llm_requests_total", "Requests by route and outcome.",
                                        tag_keys=("route", "status"))
        self.tokens = metrics.Counter("online_llm_tokens_total", "Prompt and completion tokens.",
                                      tag_keys=("kind",))
        self.adapter_events = metrics.Counter("online_llm_adapter_events_total", "Adapter loads, evictions, "
                                              "hits and misses per worker.", tag_keys=("worker", "event"))
        self.learn_steps = metrics.Counter("online_llm_learn_steps_total", "Optimizer steps of learn calls.",
                                           tag_keys=("worker",))
        self.learn_seconds = metrics.Histogram("online_llm_learn_duration_s", "Duration of learn calls.",
                                               boundaries=[0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300],
                                               tag_keys=("worker",))
        self.queue_depth = metrics.Gauge("online_llm_queue_depth", "Requests running or waiting on a worker.",
                                         tag_keys=("worker",))
        self.inflight = metrics.Gauge("online_llm_ingress_inflight", "Admitted requests in one ingress.",
                                      tag_keys=("ingress",))

    def request(self, route: str, status: int) -> None:
        self.requests.inc(1, tags={"route": route, "status": str(status)})

    def token_counts(self, prompt_tokens: int, completion_tokens: int) -> None:
        if prompt_tokens:
            self.tokens.inc(prompt_tokens, tags={"kind": "prompt"})
        if completion_tokens:
            self.tokens.inc(completion_tokens, tags={"kind": "completion"})

    def adapter_event(self, worker: str, event: str, count: int = 1) -> None:
        if count > 0:
            self.adapter_events.inc(count, tags={"worker": worker, "event": event})

    def learned(self, worker: str, steps: int, seconds: float) -> None:
        if steps > 0:
            self.learn_steps.inc(steps, tags={"worker": worker})
        self.learn_seconds.observe(seconds, tags={"worker": worker})


@lru_cache(maxsize=1)
def app_metrics() -> AppMetrics:
    return AppMetrics()
