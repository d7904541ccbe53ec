"""Helpers shared by the Ray tests (imported by module name: tests/ray is on sys.path, and a name other
than `conftest` cannot clash with tests/conftest.py): free ports, the Ray workers' environment, deploying
an app, polling for a condition.
"""
from __future__ import annotations

import os

from testkit import free_port, wait_for  # noqa: F401  (re-exported for the Ray tests)

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
AWS_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL")


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
