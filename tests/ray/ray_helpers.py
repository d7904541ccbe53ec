"""Helpers shared by the Ray tests (imported by module name: tests/ray is on sys.path, and a name other
than `conftest` cannot clash with tests/conftest.py): free ports, the Ray workers' environment, deploying
an app, polling for a condition.
"""
from __future__ import annotations

import os
import socket
import time

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
