"""End to end over real HTTP on a local Ray: the official `openai` client against the Serve app running
the real Engine on the tiny model with a local store; management endpoints, auth, limits, and the
Python DeploymentHandle API. One app is deployed for the whole module.
"""
from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest
from ray import serve

from ray_helpers import deploy, wait_for
from serve.app.builder import build_app
from serve.tiny_model import TINY_MODEL_ID

pytestmark = [pytest.mark.ray, pytest.mark.timeout(240)]

API_KEY = "test-key-0123456789"
PROMPT = "Q: What is the secret code?\nA:"
ANSWER = " The code is blue falcon."
TEACH = [{"prompt": PROMPT, "response": ANSWER}]


@pytest.fixture(scope="module")
def app_url(ray_local, tmp_path_factory):
    store = tmp_path_factory.mktemp("store")
    args = {"store_url": str(store), "num_workers": 1, "worker_num_cpus": 1, "api_key": API_KEY,
            "max_slots": 4, "host_cache_size": 8,
            "limits": {"max_tokens": 64, "max_learn_examples": 8, "max_learn_steps": 200,
                       "max_body_bytes": 64 * 1024, "max_prompt_chars": 2000}}
    deploy(build_app(args), name="e2e")
    yield ray_local
    serve.delete("e2e")


@pytest.fixture(scope="module")
def client(app_url):
    return openai.OpenAI(base_url=f"{app_url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def taught(app_url):
    """'teacher' learned PROMPT -> ANSWER over HTTP; the learn response."""
    response = httpx.post(f"{app_url}/v1/adapters/teacher/learn", json={"examples": TEACH, "steps": 60},
                          headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def _auth() -> dict:
    return {"Authorization": f"Bearer {API_KEY}"}


def test_learned_adapter_answers_with_taught_text(client, taught):
    assert taught["revision"] and taught["report"]["loss_after"] < taught["report"]["loss_before"]
    done = client.completions.create(model="teacher", prompt=PROMPT, max_tokens=12, temperature=0)
    assert done.choices[0].text.startswith(ANSWER), done.choices[0].text
    same = client.completions.create(model=f"{TINY_MODEL_ID}:teacher", prompt=PROMPT, max_tokens=12,
                                     temperature=0)
    assert same.choices[0].text == done.choices[0].text
    assert done.usage.completion_tokens > 0
    assert done.system_fingerprint == f"teacher@{taught['revision']}"
    pinned = client.completions.create(model=f"teacher@{taught['revision']}", prompt=PROMPT, max_tokens=12,
                                       temperature=0)
    assert pinned.choices[0].text == done.choices[0].text


def test_other_adapter_and_base_do_not_know_the_answer(client, taught):
    learn = httpx.post(f"{client.base_url}adapters/other/learn", headers=_auth(), timeout=120,
                       json={"examples": [{"prompt": "Q: Capital of France?\nA:", "response": " Paris."}],
                             "steps": 20})
    assert learn.status_code == 200, learn.text
    for model in ("other", TINY_MODEL_ID):
        done = client.completions.create(model=model, prompt=PROMPT, max_tokens=12, temperature=0)
        assert not done.choices[0].text.startswith(ANSWER), (model, done.choices[0].text)


def test_streaming_chat_and_completions(client, taught):
    chunks = list(client.completions.create(model="teacher", prompt=PROMPT, max_tokens=12, temperature=0,
                                            stream=True))
    text = "".join(chunk.choices[0].text for chunk in chunks)
    assert text.startswith(ANSWER) and chunks[-1].choices[0].finish_reason == "stop"
    stream = list(client.chat.completions.create(model="teacher", max_tokens=8, stream=True,
                                                 messages=[{"role": "user", "content": "hello"}]))
    deltas = [chunk.choices[0].delta for chunk in stream]
    assert deltas[0].role == "assistant" and "".join(d.content or "" for d in deltas)
    whole = client.chat.completions.create(model="teacher", max_tokens=8,
                                           messages=[{"role": "user", "content": "hello"}])
    assert whole.choices[0].message.content == "".join(d.content or "" for d in deltas)
    # The last chunk says why generation stopped, exactly as the non-streamed answer does.
    assert stream[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    cut = list(client.completions.create(model="teacher", prompt=PROMPT, max_tokens=1, stream=True))
    assert cut[-1].choices[0].finish_reason == "length"


def test_raw_sse_ends_with_done(app_url, taught):
    with httpx.stream("POST", f"{app_url}/v1/completions", headers=_auth(), timeout=60,
                      json={"model": "teacher", "prompt": PROMPT, "max_tokens": 4, "stream": True}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert json.loads(lines[0][len("data: "):])["object"] == "text_completion"


def test_unknown_model_is_openai_404(client, app_url):
    with pytest.raises(openai.NotFoundError) as caught:
        client.completions.create(model="no-such-adapter", prompt="x", max_tokens=2)
    body = caught.value.body
    assert body["code"] == "model_not_found" and body["param"] == "model" and "message" in body
    raw = httpx.post(f"{app_url}/v1/chat/completions", headers=_auth(), timeout=30,
                     json={"model": "bad/name", "messages": [{"role": "user", "content": "x"}]})
    assert raw.status_code == 404 and set(raw.json()["error"]) == {"message", "type", "param", "code"}


def test_models_and_management_endpoints(client, app_url, taught):
    models = {m.id: m for m in client.models.list().data}
    assert TINY_MODEL_ID in models and models["teacher"].model_extra["parent"] == TINY_MODEL_ID
    listed = httpx.get(f"{app_url}/v1/adapters", headers=_auth()).json()["data"]
    assert "teacher" in listed
    revisions = httpx.get(f"{app_url}/v1/adapters/teacher/revisions", headers=_auth()).json()["revisions"]
    assert revisions[-1] == taught["revision"]
    info = httpx.get(f"{app_url}/v1/adapters/teacher", headers=_auth(), timeout=30).json()
    assert info["on_disk"] and info["revision"] == taught["revision"] and info["param_count"] > 0
    assert httpx.get(f"{app_url}/v1/adapters/nobody", headers=_auth()).status_code == 404
    assert httpx.get(f"{app_url}/health", headers=_auth()).json()["status"] == "ok"
    stats = httpx.get(f"{app_url}/v1/stats", headers=_auth()).json()
    assert stats["adapters"] >= 1 and stats["ingress"]["requests"] > 0


def test_delete_then_unknown(client, app_url):
    learn = httpx.post(f"{app_url}/v1/adapters/doomed/learn", headers=_auth(), timeout=120,
                       json={"examples": ["a short text"], "steps": 2})
    assert learn.status_code == 200, learn.text
    assert httpx.delete(f"{app_url}/v1/adapters/doomed", headers=_auth(), timeout=30).status_code == 200
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="doomed", prompt="x", max_tokens=2)
    assert httpx.delete(f"{app_url}/v1/adapters/doomed", headers=_auth(), timeout=30).status_code == 404


def test_every_endpoint_needs_the_api_key(app_url):
    for method, path in [("GET", "/v1/models"), ("GET", "/health"), ("GET", "/v1/stats"),
                         ("GET", "/v1/adapters"), ("POST", "/v1/completions"),
                         ("POST", "/v1/adapters/x/learn"), ("DELETE", "/v1/adapters/x")]:
        for headers in ({}, {"Authorization": "Bearer wrong-key-000"}, {"Authorization": API_KEY}):
            response = httpx.request(method, f"{app_url}{path}", headers=headers, json={})
            assert response.status_code == 401, (method, path, headers)
            assert response.json()["error"]["type"] == "authentication_error"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{app_url}/v1", api_key="nope-nope", max_retries=0).models.list()


@pytest.mark.parametrize("path, body, status, fragment", [
    ("/v1/completions", {"model": "teacher", "prompt": "x", "max_tokens": 65}, 422, "max_tokens"),
    ("/v1/completions", {"model": "teacher", "prompt": "x" * 2001}, 422, "prompt"),
    ("/v1/completions", {"model": "teacher", "prompt": "x", "bogus": 1}, 422, "bogus"),
    ("/v1/adapters/teacher/learn", {"examples": ["x"] * 9}, 422, "examples"),
    ("/v1/adapters/teacher/learn", {"examples": ["x"], "steps": 201}, 422, "steps"),
    ("/v1/adapters/-bad/learn", {"examples": ["x"]}, 400, "invalid adapter name"),
    ("/v1/adapters/teacher/learn", {"examples": ["x"]}, 400, "two tokens"),
    ("/v1/completions", {"model": "teacher", "prompt": "y" * 70_000}, 413, "limit"),
])
def test_limits_are_4xx_with_a_message(app_url, path, body, status, fragment):
    response = httpx.post(f"{app_url}{path}", json=body, headers=_auth(), timeout=30)
    assert response.status_code == status, response.text
    assert fragment in response.json()["error"]["message"]


def test_python_handle_api(app_url, taught):
    handle = serve.get_app_handle("e2e")

    async def scenario():
        text = await handle.generate.remote(PROMPT, adapter="teacher", max_tokens=12)
        unknown = await handle.generate.remote(PROMPT, adapter="never-taught", max_tokens=12)
        base = await handle.generate.remote(PROMPT, max_tokens=12)
        report = await handle.learn.remote(TEACH, adapter="handle-made", steps=60)
        learned = await handle.generate.remote(PROMPT, adapter="handle-made", max_tokens=12)
        names = await handle.list_adapters.remote()
        info = await handle.get_adapter_info.remote("handle-made")
        deleted = await handle.delete_adapter.remote("handle-made", delete_from_disk=True)
        stats = await handle.stats.remote()
        return text, unknown, base, report, learned, names, info, deleted, stats

    text, unknown, base, report, learned, names, info, deleted, stats = asyncio.run(scenario())
    assert text.startswith(ANSWER) and learned.startswith(ANSWER)
    assert unknown == base  # SEED_API: an unknown adapter answers like the base model
    assert report["revision"] == info["revision"] and info["in_memory"] and info["on_disk"]
    assert "handle-made" in names and deleted is True
    assert "handle-made" not in asyncio.run(_names(handle)) and stats["totals"]["requests"] > 0


async def _names(handle):
    return await handle.list_adapters.remote()


def test_memory_only_app_learns_deletes_and_relearns(app_url):
    """No store: one worker keeps adapters in memory; learn reports committed=False; delete really drops."""
    serve.run(build_app({"num_workers": 1, "worker_num_cpus": 0.5, "max_slots": 2, "host_cache_size": 4}),
              name="mem", route_prefix="/mem")
    handle = serve.get_app_handle("mem")

    async def scenario():
        report = await handle.learn.remote(TEACH, adapter="volatile", steps=60)
        taught = await handle.generate.remote(PROMPT, adapter="volatile", max_tokens=12)
        info = await handle.get_adapter_info.remote("volatile")
        deleted = await handle.delete_adapter.remote("volatile")
        after = await handle.generate.remote(PROMPT, adapter="volatile", max_tokens=12)
        relearned = await handle.learn.remote(["something else entirely"], adapter="volatile", steps=2)
        return report, taught, info, deleted, after, relearned, await handle.list_adapters.remote()

    try:
        report, taught, info, deleted, after, relearned, names = asyncio.run(scenario())
    finally:
        serve.delete("mem")
    assert not report["committed"] and taught.startswith(ANSWER)
    assert info["in_memory"] and not info["on_disk"] and info["revision"] == report["revision"]
    assert deleted and not after.startswith(ANSWER)  # gone: answers like the base model
    assert relearned["parent"] is None and names == ["volatile"]


def test_metrics_reach_ray_prometheus_export(client, taught, metrics_port):
    """Requests, tokens, adapter events and learn steps appear in Ray's Prometheus export."""
    client.completions.create(model="teacher", prompt=PROMPT, max_tokens=4, temperature=0)
    wanted = ("ray_online_llm_requests_total", "ray_online_llm_tokens_total",
              "ray_online_llm_adapter_events_total", "ray_online_llm_learn_steps_total")

    def scraped():
        try:
            body = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).text
        except httpx.HTTPError:
            return None
        return body if all(name in body for name in wanted) else None

    body = wait_for(scraped, timeout_s=60, interval_s=1.0)
    completions = [line for line in body.splitlines()
                   if line.startswith("ray_online_llm_tokens_total") and 'kind="completion"' in line]
    assert completions and float(completions[0].rsplit(" ", 1)[1]) > 0
