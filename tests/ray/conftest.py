"""Ray fixtures for the Serve application tests: one local Ray per test module (num_cpus=2), with the
AWS environment of the loopback S3 server and this directory (for the fake engine) passed to every Ray
worker through the job's runtime_env, and Serve's HTTP proxy on a free loopback port.
"""
from __future__ import annotations

import pytest

from ray_helpers import free_port, worker_env


@pytest.fixture(scope="module")
def metrics_port() -> int:
    """Port of the module's Ray Prometheus export (http://127.0.0.1:<port>/metrics)."""
    return free_port()


@pytest.fixture(scope="module")
def ray_local(s3_server, tiny_model_path, metrics_port):
    """A local Ray (2 CPUs) for one test module, with Serve's HTTP proxy on a free loopback port."""
    import ray
    from ray import serve

    ray.init(address="local", num_cpus=2, include_dashboard=False, runtime_env={"env_vars": worker_env()},
             logging_level="WARNING", _metrics_export_port=metrics_port)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()
