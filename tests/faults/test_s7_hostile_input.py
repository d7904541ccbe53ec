"""Scenario 7: hostile HTTP input (path traversal and oversized names, malformed JSON, wrong types, huge
max_tokens and prompts, thousands of examples, options that do not exist such as a rank) and a
hypothesis fuzz of the request schemas: every one is answered with a 4xx and a message, never a 5xx,
the app keeps serving, and nothing lands in S3 outside the store prefix.

There is no upload/import endpoint over HTTP, so bad safetensors headers, a pickle that runs code and a
rank above the maximum are driven through the `adapters import` CLI (adapters_store.cli.main) into a
local store, checking that no file appears outside its root.
"""
from __future__ import annotations

import json
import os
import pickle
import re
from urllib.parse import quote

import boto3
import httpx
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from adapters_store.cli import main as adapters_cli
from serve.tiny_model import TINY_MODEL_ID

pytestmark = [pytest.mark.ray, pytest.mark.s3, pytest.mark.timeout(200)]

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
FUZZ = settings(max_examples=50, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

HOSTILE = [  # (method, path, body (dict = JSON, bytes = raw), expected status)
    ("POST", "/v1/adapters/%2E%2E/learn", {"examples": ["x y z"], "steps": 1}, 400),
    ("POST", "/v1/adapters/..%5C..%5Cetc/learn", {"examples": ["x y z"], "steps": 1}, 400),
    ("POST", f"/v1/adapters/{'a' * 200}/learn", {"examples": ["x y z"], "steps": 1}, 400),
    ("GET", "/v1/adapters/%2E%2E", None, 400),
    ("DELETE", "/v1/adapters/%2E", None, 400),
    ("POST", "/v1/completions", {"model": "../../etc/passwd", "prompt": "x"}, 404),
    ("POST", "/v1/completions", {"model": "a" * 290, "prompt": "x"}, 404),
    ("POST", "/v1/completions", {"model": "x" * 400, "prompt": "x"}, 422),
    ("POST", "/v1/completions", b"{not json", 400),
    ("POST", "/v1/completions", b"\xff\xfe\x00garbage", 400),
    ("POST", "/v1/completions", [1, 2, 3], 422),
    ("POST", "/v1/completions", {"model": 5, "prompt": ["x"]}, 422),
    ("POST", "/v1/completions", {"model": TINY_MODEL_ID, "prompt": "x", "max_tokens": "many"}, 422),
    ("POST", "/v1/completions", {"model": TINY_MODEL_ID, "prompt": "x", "max_tokens": 10**12}, 422),
    ("POST", "/v1/completions", {"model": TINY_MODEL_ID, "prompt": "x" * 100_000}, 422),
    ("POST", "/v1/completions", {"model": TINY_MODEL_ID, "prompt": "x" * 400_000}, 413),
    ("POST", "/v1/chat/completions", {"model": TINY_MODEL_ID, "messages": [{"role": "root", "content": "x"}]},
     422),
    ("POST", "/v1/adapters/hostile/learn", {"examples": ["x y z"] * 5000, "steps": 1}, 422),
    ("POST", "/v1/adapters/hostile/learn", {"examples": ["x y z"], "steps": 1, "rank": 100_000}, 422),
    ("POST", "/v1/adapters/hostile/learn", {"examples": ["x y z"], "steps": 10**9}, 422),
    ("POST", "/v1/adapters/hostile/learn", {"examples": [{"prompt": 5}], "steps": 1}, 400),
    ("POST", "/v1/adapters/hostile/learn", {"examples": [{"messages": [{"role": "evil", "content": "x"}]}],
                                            "steps": 1}, 400),
    ("POST", "/v1/adapters/hostile/learn", {"examples": [], "steps": 1}, 422),
]


def _send(url: str, method: str, path: str, body) -> httpx.Response:
    kwargs = {"content": body} if isinstance(body, bytes) else ({"json": body} if body is not None else {})
    if isinstance(body, bytes):
        kwargs["headers"] = {"content-type": "application/json"}
    return httpx.request(method, f"{url}{path}", timeout=60, **kwargs)


def _message(response: httpx.Response) -> str:
    body = response.json()
    return body["error"]["message"] if "error" in body else str(body.get("detail", ""))


@pytest.mark.parametrize("method, path, body, status", HOSTILE)
def test_hostile_request_is_4xx_with_a_message(app_url, method, path, body, status):
    response = _send(app_url, method, path, body)
    assert response.status_code == status, (response.status_code, response.text[:300])
    assert _message(response), response.text


FINITE = st.floats(allow_nan=False, allow_infinity=False)  # JSON has no NaN/Infinity
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | FINITE | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12)
MODELS = st.sampled_from([TINY_MODEL_ID, "tide", f"{TINY_MODEL_ID}:tide", "../x", "tide@999", "a/b", ""]) \
    | st.text(max_size=40) | JSON_VALUES
COMPLETION = st.fixed_dictionaries(
    {"model": MODELS, "prompt": st.text(max_size=80) | JSON_VALUES},
    optional={"max_tokens": st.integers(-5, 80) | JSON_VALUES, "temperature": FINITE | JSON_VALUES,
              "stop": JSON_VALUES, "top_p": FINITE, "seed": st.integers(-2, 2**64), "stream": st.booleans(),
              "extra": JSON_VALUES})
EXAMPLE = st.text(max_size=60) | JSON_VALUES | st.fixed_dictionaries(
    {"prompt": st.text(max_size=30) | JSON_VALUES, "response": st.text(max_size=30) | JSON_VALUES})
LEARN = st.fixed_dictionaries({"examples": st.lists(EXAMPLE, max_size=4) | JSON_VALUES,
                               "steps": st.integers(-2, 2) | JSON_VALUES},
                              optional={"lr": FINITE | JSON_VALUES, "rank": st.integers()})


def _check_answer(response: httpx.Response) -> None:
    assert response.status_code < 500, (response.status_code, response.text[:300])
    if response.status_code >= 400:
        assert _message(response), response.text


def test_fuzzed_completions_never_5xx(app_url):
    @FUZZ
    @given(body=COMPLETION)
    def fuzz(body):
        _check_answer(httpx.post(f"{app_url}/v1/completions", json=body, timeout=60))
    fuzz()


def test_fuzzed_learns_never_5xx_and_store_stays_inside_its_prefix(app_url, s3_server, store_url):
    valid = httpx.post(f"{app_url}/v1/adapters/fuzz-ok/learn", timeout=90,
                       json={"examples": ["a valid example"], "steps": 1})
    assert valid.status_code == 200, valid.text
    @FUZZ
    @given(name=st.text(max_size=140) | st.sampled_from(["..", ".", "fuzz-ok", "a" * 129]), body=LEARN)
    def fuzz(name, body):
        _check_answer(httpx.post(f"{app_url}/v1/adapters/{quote(name, safe='')}/learn", json=body, timeout=90))
    fuzz()
    assert httpx.get(f"{app_url}/health", timeout=30).status_code == 200
    bucket, _, prefix = store_url.removeprefix("s3://").partition("/")
    keys = [obj["Key"] for page in boto3.client("s3", endpoint_url=s3_server).get_paginator(
        "list_objects_v2").paginate(Bucket=bucket) for obj in page.get("Contents", [])]
    assert keys and all(key.startswith(f"{prefix}/") for key in keys), keys[:5]
    assert all(NAME_PATTERN.match(key.split("/")[1]) for key in keys)


# -- the import path (CLI) -------------------------------------------------------------------------

def _peft_dir(root, name: str, *, rank: int = 4, model_bytes: bytes | None = None) -> str:
    path = os.path.join(root, name)
    os.makedirs(path)
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 8, "target_modules": ["q_proj"],
              "base_model_name_or_path": TINY_MODEL_ID}
    with open(os.path.join(path, "adapter_config.json"), "w") as handle:
        json.dump(config, handle)
    model_file = os.path.join(path, "adapter_model.safetensors")
    if model_bytes is None:
        key = "base_model.model.model.layers.0.self_attn.q_proj"
        save_file({f"{key}.lora_A.weight": torch.zeros(rank, 8), f"{key}.lora_B.weight": torch.zeros(8, rank)},
                  model_file)
    else:
        with open(model_file, "wb") as handle:
            handle.write(model_bytes)
    return path


class _RunsCode:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _hostile_imports(root) -> list[tuple[str, str, str]]:
    """(path, name, fragment expected in the error) for each hostile import."""
    marker = os.path.join(root, "pwned")
    evil = os.path.join(root, "evil.pt")
    with open(evil, "wb") as handle:
        pickle.dump({"lora_state": _RunsCode(marker), "metadata": {}}, handle)
    huge_header = (2**62).to_bytes(8, "little") + b"{}"
    return [
        (_peft_dir(root, "bad-header", model_bytes=huge_header), "bad-header", "adapter_model.safetensors"),
        (_peft_dir(root, "not-json", model_bytes=b"\x10\x00\x00\x00\x00\x00\x00\x00{not json header}"),
         "not-json", "adapter_model.safetensors"),
        (evil, "evil", "evil"),
        (_peft_dir(root, "too-big", rank=300), "too-big", "rank"),
        (_peft_dir(root, "traversal"), "../escaped", "name"),
        (_peft_dir(root, "long-name"), "n" * 200, "name"),
    ]


def test_hostile_imports_are_refused_and_stay_data(tmp_path, capsys):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    store_root = tmp_path / "store"
    cases = _hostile_imports(str(inputs))
    before = {p for p in tmp_path.rglob("*")}
    for path, name, fragment in cases:
        code = adapters_cli(["--store", str(store_root), "import", path, name])
        # Only the CLI's own line: Ray's log forwarding from the running app also writes to stderr.
        lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("adapters: ")]
        assert code != 0 and len(lines) == 1, (name, lines)
        assert lines[0].startswith("adapters: error:") and fragment in lines[0], (name, lines)
    assert not (inputs / "pwned").exists(), "the pickle ran code"
    created = {p for p in tmp_path.rglob("*")} - before
    assert all(store_root in p.parents or p == store_root for p in created), created
    assert adapters_cli(["--store", str(store_root), "ls"]) == 0
    assert not [line for line in capsys.readouterr().out.splitlines() if not line.startswith("\x1b")]
