"""Small helpers shared by every test directory (tests/, tests/ray, tests/faults): free loopback ports,
polling for a condition, fresh buckets on the loopback S3 server. Importable as `testkit` because
pytest puts tests/ on sys.path for tests/conftest.py. It starts nothing by itself.
"""
from __future__ import annotations

import socket
import time
import uuid


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(predicate, timeout_s: float = 60.0, interval_s: float = 0.2):
    """Poll `predicate` until it returns a truthy value; that value, or AssertionError on timeout."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(f"condition not met within {timeout_s} s")


def new_s3_bucket(endpoint_url: str, prefix: str = "t") -> str:
    """Create an empty, uniquely named bucket on the S3 endpoint; returns its name."""
    import boto3

    name = f"{prefix}-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=endpoint_url).create_bucket(Bucket=name)
    return name
