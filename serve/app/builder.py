"""The app builder that `serve run` / `serve deploy` take: `serve.app.builder:build_app` with `args`
validated as AppConfig. It sizes the worker deployment (one replica per GPU with num_gpus=1, or a
configured count on CPU), attaches the adapter-affinity request router and the bounded queues, and
wires Directory -> Workers -> Ingress. It checks at build time what cannot work (memory-only with more
than one worker). It builds nothing at import and runs no model itself.
"""
from __future__ import annotations

import logging

from ray import serve
from ray.serve.config import RequestRouterConfig

from serve.app.config import AppConfig, resolve_workers
from serve.app.directory import Directory
from serve.app.ingress import Ingress
from serve.app.worker import Worker

logger = logging.getLogger(__name__)

ROUTER_CLASS = "serve.app.router:AdapterAffinityRouter"


def _cluster_gpus() -> float:
    import ray

    return float(ray.cluster_resources().get("GPU", 0)) if ray.is_initialized() else 0.0


def worker_deployment(config: AppConfig, cluster_gpus: float):
    """The Worker deployment with its replica count, resources, router and queue limits."""
    count, use_gpu = resolve_workers(config, cluster_gpus)
    actor_options = {"num_cpus": config.worker_num_cpus}
    if use_gpu:
        actor_options["num_gpus"] = 1
    router = RequestRouterConfig(
        request_router_class=ROUTER_CLASS,
        request_router_kwargs={"spill_queue_threshold": config.routing.spill_queue_threshold,
                               "max_holders": config.routing.max_holders},
        request_routing_stats_period_s=config.routing.report_interval_s,
    )
    logger.info("workers: %d replica(s), %s", count, "one GPU each" if use_gpu else "CPU")
    return serve.deployment(Worker, name="Worker").options(
        num_replicas=count, ray_actor_options=actor_options, request_router_config=router,
        max_ongoing_requests=config.queues.worker_max_ongoing_requests,
        max_queued_requests=config.queues.worker_max_queued_requests,
        graceful_shutdown_timeout_s=config.graceful_shutdown_timeout_s,
        health_check_period_s=config.health_check_period_s, health_check_timeout_s=60,
    )


def ingress_deployment(config: AppConfig):
    return serve.deployment(Ingress, name="Ingress").options(
        num_replicas=config.ingress_replicas, ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=config.queues.ingress_max_ongoing_requests,
        max_queued_requests=config.queues.ingress_max_queued_requests,
    )


def build_app(args: dict):
    """Application for `serve run serve.app.builder:build_app key=value ...` or a config file's `args`
    (Serve requires a builder with exactly this one parameter)."""
    return make_app(AppConfig(**(args or {})))


def make_app(config: AppConfig, *, store_factory=None, cluster_gpus: float | None = None):
    """The application for a validated config; store_factory / cluster_gpus are injection points."""
    gpus = _cluster_gpus() if cluster_gpus is None else cluster_gpus
    plain = config.model_dump()
    directory = Directory.bind(plain, store_factory)
    workers = worker_deployment(config, gpus).bind(plain, directory, store_factory)
    return ingress_deployment(config).bind(plain, workers, directory, store_factory)
