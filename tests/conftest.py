"""Shared pytest fixtures: the tiny local model, a moto S3 server on loopback, store URLs.

Ray fixtures live next to the Ray tests (they cost ~10 s and only those tests need them).
"""
from __future__ import annotations

import os

import pytest

from testkit import free_port, new_s3_bucket

# Every test process (and every Ray worker it starts, which inherits the environment) builds the tiny
# model into one cache directory, never into the user's home.
os.environ.setdefault("ONLINE_LLM_CACHE", os.path.join(os.path.dirname(__file__), "..", ".cache"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One torch thread per test process: the suite runs on 2 cores next to Ray workers, and oversubscribed
# threads made small learn steps 10-40x slower there.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.pop("LORA_SAVE_PATH", None)  # tests choose their store explicitly


@pytest.fixture(scope="session")
def tiny_model_path() -> str:
    """Local directory of the embedded tiny Qwen3 model (built once per cache)."""
    from serve.tiny_model import build_tiny_model

    return str(build_tiny_model())


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 endpoint (moto's ThreadedMotoServer) on 127.0.0.1; yields its URL.

    Sets the AWS environment so that s3fs/boto3 (and Ray workers started later) reach it with no
    storage options; credentials are fake and local.
    """
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                            "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL")}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                      AWS_DEFAULT_REGION="us-east-1", AWS_ENDPOINT_URL=endpoint)
    yield endpoint
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture
def s3_bucket(s3_server) -> str:
    """A fresh, empty bucket on the moto server; s3fs's instance cache is cleared around the test."""
    import s3fs

    name = new_s3_bucket(s3_server)
    s3fs.S3FileSystem.clear_instance_cache()
    yield name
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture
def s3_store_url(s3_bucket) -> str:
    return f"s3://{s3_bucket}/adapters"
