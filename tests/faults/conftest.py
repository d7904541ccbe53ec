"""Fixtures of the fault-injection suite: ONE local Ray and ONE deployed app for the whole package.

The app runs the real Engine on the tiny model with two CPU workers and two ingress replicas, and an
S3 store (the session's moto server) reached through a TcpProxy, so a test can cut S3 off and bring it
back with moto's data intact. The driver checks the store directly (not through the proxy).
Tests use their own adapter names, so their order does not matter; the redeploy test runs last.
"""
from __future__ import annotations

from urllib.parse import urlsplit

import pytest

from testkit import new_s3_bucket

from .faults_support import TcpProxy, free_port, worker_env

APP = "faults"
APP_ARGS = {
    "num_workers": 2, "ingress_replicas": 2, "worker_num_cpus": 0.5, "max_slots": 4, "host_cache_size": 8,
    # The real Engine plus a hold-in-flight hook that only marked inputs trigger (fault_hooks.py).
    "engine_factory": "fault_hooks:HookedEngine",
    "health_check_period_s": 1.0, "graceful_shutdown_timeout_s": 20.0,
    "limits": {"max_tokens": 64, "max_prompt_chars": 4000, "max_learn_examples": 64, "max_learn_steps": 20,
               "max_body_bytes": 256 * 1024},
    "queues": {"max_inflight": 24, "retry_after_s": 1},
    "routing": {"report_interval_s": 0.5, "lease_ttl_s": 6.0},
}


@pytest.fixture(scope="package")
def s3_proxy(s3_server):
    parts = urlsplit(s3_server)
    proxy = TcpProxy(parts.hostname, parts.port)
    yield proxy
    proxy.close()


@pytest.fixture(scope="package")
def store_url(s3_server):
    return f"s3://{new_s3_bucket(s3_server, 'faults')}/adapters"


@pytest.fixture(scope="package")
def fault_ray(s3_proxy, tiny_model_path):
    """Local Ray (2 CPUs) whose workers reach S3 only through the proxy; Serve HTTP on a free port."""
    import ray
    from ray import serve

    # address="local": always a new cluster of our own, even if another Ray runs on this machine.
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING",
             runtime_env={"env_vars": worker_env(s3_proxy.url)})
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="package")
def app_args(store_url):
    return dict(APP_ARGS, store_url=store_url)


@pytest.fixture(scope="package")
def app_url(fault_ray, app_args):
    """The deployed app's base URL."""
    from ray import serve

    from serve.app.builder import build_app

    serve.run(build_app(app_args), name=APP, route_prefix="/")
    yield fault_ray
    serve.delete(APP)


@pytest.fixture
def store(store_url):
    """A fresh view of the store from the driver (direct to moto, no listing cache)."""
    import s3fs

    from adapters_store import open_store

    s3fs.S3FileSystem.clear_instance_cache()
    return open_store(store_url)
