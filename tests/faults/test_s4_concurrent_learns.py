"""Scenarios 4 and 5: many concurrent learns on one adapter through two ingress replicas form one chain
of revisions (none lost, each response names its revision), and clients that learn then generate
under load always see their revision or a later one.
"""
from __future__ import annotations

import asyncio

import httpx
import pytest

pytestmark = [pytest.mark.ray, pytest.mark.s3, pytest.mark.timeout(180)]


def _seq(rev: str) -> int:
    return int(rev.split("-", 1)[0])


async def _learn(client: httpx.AsyncClient, url: str, name: str, text: str) -> httpx.Response:
    return await client.post(f"{url}/v1/adapters/{name}/learn", json={"examples": [text], "steps": 2})


def test_twenty_concurrent_learns_form_one_chain(app_url, store):
    async def twenty():
        async with httpx.AsyncClient(timeout=150) as client:
            return await asyncio.gather(*(_learn(client, app_url, "chain20", f"chain example number {i}")
                                          for i in range(20)))
    responses = asyncio.run(twenty())
    assert [r.status_code for r in responses] == [200] * 20, [r.text for r in responses if r.status_code >= 300]
    bodies = [r.json() for r in responses]
    assert all(b["revision"] == b["report"]["revision"] and b["report"]["committed"] for b in bodies)
    by_parent = {b["report"]["parent"]: b["revision"] for b in bodies}
    assert len(by_parent) == 20 and None in by_parent, by_parent  # no two learns started from one parent
    chain = [by_parent[None]]
    while chain[-1] in by_parent:
        chain.append(by_parent[chain[-1]])
    assert len(chain) == 20
    assert store.list_revisions("chain20") == chain and store.latest("chain20") == chain[-1]
    assert [_seq(rev) for rev in chain] == list(range(1, 21))


async def _learner(client, url: str, name: str, rounds: int) -> list[tuple[str, str]]:
    """Learn, then generate at once; (acknowledged revision, revision served) per round."""
    seen = []
    for round_ in range(rounds):
        learned = await _learn(client, url, name, f"{name} round {round_} text to remember")
        assert learned.status_code == 200, learned.text
        served = await client.post(f"{url}/v1/completions",
                                   json={"model": name, "prompt": "remember", "max_tokens": 2})
        assert served.status_code == 200, served.text
        seen.append((learned.json()["revision"], served.json()["system_fingerprint"].partition("@")[2]))
    return seen


async def _background_load(client, url: str, stop: asyncio.Event) -> int:
    done = 0
    while not stop.is_set():
        response = await client.post(f"{url}/v1/completions",
                                     json={"model": "ryw-shared", "prompt": "load", "max_tokens": 8})
        assert response.status_code in (200, 429), response.text
        done += 1
    return done


def test_read_your_writes_under_load(app_url):
    async def scenario():
        async with httpx.AsyncClient(timeout=150) as client:
            first = await _learn(client, app_url, "ryw-shared", "shared adapter for load")
            assert first.status_code == 200, first.text
            stop = asyncio.Event()
            load = [asyncio.create_task(_background_load(client, app_url, stop)) for _ in range(6)]
            # Two clients share one adapter (their learns interleave), two have their own.
            names = ["ryw-shared", "ryw-shared", "ryw-a", "ryw-b"]
            results = await asyncio.gather(*(_learner(client, app_url, n, 3) for n in names))
            stop.set()
            return results, sum(await asyncio.gather(*load))
    results, background = asyncio.run(scenario())
    assert background > 0
    for rounds in results:
        for acknowledged, served in rounds:
            assert _seq(served) >= _seq(acknowledged), (acknowledged, served)


def test_commit_the_directory_never_heard_of_does_not_wedge_learns(app_url, store):
    """A revision committed behind the app's back (a learn whose answer was lost when its worker died
    after the commit, or an `adapters import`) must not make every later learn a 409 conflict."""
    with httpx.Client(timeout=150) as client:
        learn_url = f"{app_url}/v1/adapters/out-of-band/learn"
        first = client.post(learn_url, json={"examples": ["first example text"], "steps": 2})
        assert first.status_code == 200, first.text
        current = store.read("out-of-band")
        behind_its_back = store.commit("out-of-band", current.tensors, config=current.config,
                                       parent=current.revision, meta={"note": "committed out of band"})
        learned = client.post(learn_url, json={"examples": ["next example text"], "steps": 2})
        assert learned.status_code == 200, learned.text
        assert learned.json()["report"]["parent"] == behind_its_back
        served = client.post(f"{app_url}/v1/completions", json={"model": "out-of-band", "prompt": "x",
                                                                "max_tokens": 2})
    assert served.json()["system_fingerprint"] == f"out-of-band@{learned.json()['revision']}"
    assert store.list_revisions("out-of-band") == [first.json()["revision"], behind_its_back,
                                                   learned.json()["revision"]]
