"""The application's pure parts, without Ray: learn leases (FIFO, expiry), the Directory's rules
(rebuild from a real store, monotonic revisions, deletions), config checks done at build time, and the
request schemas' limits.
"""
from __future__ import annotations

import asyncio
import logging

import pytest
from pydantic import ValidationError

from adapters_store import open_store
from adapters_store.testing import TOY_MODULES, random_lora
from serve.app.config import AppConfig, LimitsConfig, resolve_workers, warn_if_local_store_on_cluster
from serve.app.directory import DirectoryCore
from serve.app.leases import LeaseTable
from serve.app.schemas import ChatCompletionRequest, CompletionRequest, LearnRequest


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def test_leases_are_fifo_and_exclusive():
    table = LeaseTable()
    first = await table.acquire("a", "h1", ttl_s=10, wait_s=1)
    order = []

    async def wait(holder):
        token = await table.acquire("a", holder, ttl_s=10, wait_s=5)
        order.append(holder)
        return token
    second, third = asyncio.create_task(wait("h2")), asyncio.create_task(wait("h3"))
    await asyncio.sleep(0.01)
    assert order == [] and (await table.acquire("b", "other", ttl_s=10, wait_s=1))  # other names free
    assert table.release("a", first) and not table.release("a", first)
    token2 = await second
    assert order == ["h2"] and not third.done()
    table.release("a", token2)
    await third
    assert order == ["h2", "h3"]


async def test_lease_of_a_silent_holder_expires():
    clock = FakeClock()
    table = LeaseTable(clock=clock)
    dead = await table.acquire("a", "dead", ttl_s=5, wait_s=1)
    waiter = asyncio.create_task(table.acquire("a", "next", ttl_s=5, wait_s=5))
    await asyncio.sleep(0.01)
    clock.now = 4.0
    assert table.renew("a", dead) and table.expire() == []
    clock.now = 9.5  # renewed at 4 -> deadline 9
    assert table.expire() == ["a"]
    token = await waiter
    assert not table.renew("a", dead) and table.renew("a", token) and table.expired_count == 1


async def test_lease_wait_times_out_and_leaves_the_queue():
    table = LeaseTable()
    held = await table.acquire("a", "h1", ttl_s=10, wait_s=1)
    with pytest.raises(asyncio.TimeoutError):
        await table.acquire("a", "h2", ttl_s=10, wait_s=0.05)
    table.release("a", held)
    assert await table.acquire("a", "h3", ttl_s=10, wait_s=0.05)


def _commit(store, name, parent=None):
    config = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"],
              "base_model_name_or_path": "toy"}
    return store.commit(name, random_lora(TOY_MODULES, 4), config=config, parent=parent)


def test_directory_rebuilds_from_the_store(tmp_path):
    store = open_store(str(tmp_path))
    first = _commit(store, "alpha")
    second = _commit(store, "alpha", parent=first)
    beta = _commit(store, "beta")
    directory = DirectoryCore(store)  # a restarted Directory sees every committed revision
    assert directory.latest == {"alpha": second, "beta": beta}
    gamma = _commit(store, "gamma")  # committed behind the Directory's back (CLI import)
    assert directory.resolve("gamma") == gamma and directory.resolve("nobody") is None


def test_directory_revisions_never_move_backwards_and_deletions_reach_workers():
    directory = DirectoryCore(None)
    directory.set_latest("a", "000002-aaaaaaaa")
    assert directory.set_latest("a", "000001-bbbbbbbb") == "000002-aaaaaaaa"
    assert directory.report("w1", {"resident": ["a@000002-aaaaaaaa"], "hits": 3}, 0) == {"deletions": [],
                                                                                          "seen": 0}
    assert directory.holders("a@000002-aaaaaaaa") == ["w1"]
    assert directory.drop("a", forget=True) and directory.resolve("a") is None
    assert directory.report("w1", {"resident": []}, 0) == {"deletions": ["a"], "seen": 1}
    assert directory.report("w1", {"resident": []}, 1)["deletions"] == []
    assert not directory.drop("never", forget=True)


def test_memory_only_with_several_workers_fails_at_build_time():
    with pytest.raises(ValueError, match="memory-only"):
        resolve_workers(AppConfig(num_workers=2), cluster_gpus=0)
    with pytest.raises(ValueError, match="memory-only"):
        resolve_workers(AppConfig(), cluster_gpus=4)  # auto: one per GPU
    assert resolve_workers(AppConfig(), cluster_gpus=0) == (1, False)
    assert resolve_workers(AppConfig(store_url="s3://b/p"), cluster_gpus=3) == (3, True)
    assert resolve_workers(AppConfig(store_url="/x", num_workers=2, use_gpu=False), 8) == (2, False)
    with pytest.raises(ValidationError):
        AppConfig(unknown_field=1)


def test_local_store_on_a_multinode_cluster_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="serve.app.config"):
        assert warn_if_local_store_on_cluster("/data/adapters", alive_nodes=3)
        assert not warn_if_local_store_on_cluster("s3://bucket/adapters", alive_nodes=3)
        assert not warn_if_local_store_on_cluster("/data/adapters", alive_nodes=1)
    assert "local path" in caplog.text


def test_schema_limits_come_from_the_config():
    limits = {"limits": LimitsConfig(max_tokens=8, max_prompt_chars=10, max_learn_examples=2,
                                     max_learn_steps=5)}
    ok = CompletionRequest.model_validate({"model": "m", "prompt": "short", "max_tokens": 8}, context=limits)
    assert ok.sampling() == {"max_tokens": 8}
    cases = [(CompletionRequest, {"model": "m", "prompt": "x", "max_tokens": 9}, "max_tokens"),
             (CompletionRequest, {"model": "m", "prompt": "x" * 11}, "limit of 10"),
             (ChatCompletionRequest, {"model": "m", "messages": [{"role": "user", "content": "y" * 11}]},
              "limit of 10"),
             (ChatCompletionRequest, {"model": "m", "messages": [{"role": "robot", "content": "y"}]}, "role"),
             (LearnRequest, {"examples": ["a", "b", "c"]}, "limit of 2"),
             (LearnRequest, {"examples": ["a"], "steps": 6}, "limit of 5"),
             (LearnRequest, {"examples": []}, "examples")]
    for schema, body, fragment in cases:
        with pytest.raises(ValidationError, match=fragment):
            schema.model_validate(body, context=limits)
