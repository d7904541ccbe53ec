"""Ray fixtures for the Serve application tests: one local Ray per test module (num_cpus=2), the AWS
environment of the loopback S3 server and this directory (for the fake engine) passed to every Ray
worker through the job's runtime_env, and helpers to deploy an app on a free HTTP port.
"""
from __future__ import annotations

import os
import socket
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
AWS_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def worker_env() -> dict:
    """Environment every Ray worker needs: the fake engine's directory, the model cache, S3 settings."""
    env = {"PYTHONPATH": os.pathsep.join([HERE, REPO]), "TOKENIZERS_PARALLELISM": "false",
           "ONLINE_LLM_CACHE": os.environ["ONLINE_LLM_CACHE"], "OMP_NUM_THREADS": "1"}
    env.update({key: os.environ[key] for key in AWS_KEYS if key in os.environ})
    return env


@pytest.fixture(scope="module")
def ray_local(s3_server, tiny_model_path):
    """A local Ray (2 CPUs) for one test module, with Serve's HTTP proxy on a free loopback port."""
    import ray
    from ray import serve

    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": worker_env()},
             logging_level="WARNING")
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()


def deploy(app, name: str):
    """serve.run the app under `name` at route prefix /; returns the ingress handle once it is running."""
    from ray import serve

    return serve.run(app, name=name, route_prefix="/")


def wait_for(predicate, timeout_s: float = 30.0, interval_s: float = 0.2):
    """Poll `predicate` until it returns a truthy value; that value, or AssertionError on timeout."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(f"condition not met within {timeout_s} s")
