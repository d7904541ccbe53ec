"""Scenario 8: bytes of a committed revision are flipped in the store (S3). That revision is never
served, the error names the adapter and the revision, and the previous revision can still be selected
as "name@rev".
"""
from __future__ import annotations

import boto3
import httpx
import pytest

from .faults_support import post_with_retry, wait_for

pytestmark = [pytest.mark.ray, pytest.mark.s3, pytest.mark.timeout(120)]


def _learn(url: str, text: str) -> str:
    response, _ = post_with_retry(f"{url}/v1/adapters/reef/learn", {"examples": [text], "steps": 2})
    assert response.status_code == 200, response.text
    return response.json()["revision"]


def _complete(url: str, model: str) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", timeout=60,
                      json={"model": model, "prompt": "Where is the reef?", "max_tokens": 4, "temperature": 0})


def _flip_bytes(s3_server: str, store_url: str, key: str) -> None:
    bucket, _, prefix = store_url.removeprefix("s3://").partition("/")
    s3 = boto3.client("s3", endpoint_url=s3_server)
    data = bytearray(s3.get_object(Bucket=bucket, Key=f"{prefix}/{key}")["Body"].read())
    for offset in range(len(data) // 2, len(data) // 2 + 16):  # inside the tensor data, past the header
        data[offset] ^= 0xFF
    s3.put_object(Bucket=bucket, Key=f"{prefix}/{key}", Body=bytes(data))


def _nobody_holds(url: str, name: str) -> bool:
    workers = httpx.get(f"{url}/v1/stats", timeout=30).json()["workers"]
    return all(not ref.startswith(f"{name}@") for report in workers.values() for ref in report["resident"])


def test_corrupted_revision_is_not_served(app_url, s3_server, store_url, store):
    rev1 = _learn(app_url, "The reef is east.")
    rev2 = _learn(app_url, "The reef is west.")
    # Workers drop their resident copies (the store keeps both revisions), so the next use reads S3.
    dropped = httpx.delete(f"{app_url}/v1/adapters/reef", params={"delete_from_disk": "false"}, timeout=30)
    assert dropped.status_code == 200, dropped.text
    wait_for(lambda: _nobody_holds(app_url, "reef"), 20)
    _flip_bytes(s3_server, store_url, f"reef/{rev2}/adapter_model.safetensors")

    for model in ("reef", f"reef@{rev2}"):
        refused = _complete(app_url, model)
        assert refused.status_code == 500, refused.text
        assert refused.json()["error"]["code"] == "adapter_corrupted"
        message = refused.json()["error"]["message"]
        assert "reef" in message and rev2 in message and "adapter_model.safetensors" in message, message
    previous = _complete(app_url, f"reef@{rev1}")
    assert previous.status_code == 200, previous.text
    assert previous.json()["system_fingerprint"] == f"reef@{rev1}"
    rows = {row["revision"]: row for row in store.verify("reef")}
    assert rows[rev1]["ok"] and not rows[rev2]["ok"]
