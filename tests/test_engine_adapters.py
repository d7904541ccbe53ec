"""The engine's adapter tiers: single-flight loads, device-slot and host-tier eviction, pinning of
memory-only adapters, exact revisions, validation of adapter tensors, install/state/delete."""
from __future__ import annotations

import asyncio
import threading
import time
import uuid

import pytest
import torch

from adapters_store import open_store
from adapters_store.errors import InvalidAdapterError, RevisionNotFoundError
from adapters_store.testing import random_lora
from serve.engine import Engine

PROMPT = "the capital of france is"


class CountingStore:
    """A real memory:// store whose reads are counted and slowed, so concurrent loads overlap."""

    def __init__(self, store, delay_s: float = 0.3):
        self._store, self.delay_s, self.reads = store, delay_s, 0
        self._lock = threading.Lock()

    def read(self, *args, **kwargs):
        with self._lock:
            self.reads += 1
        time.sleep(self.delay_s)
        return self._store.read(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._store, name)


def _shapes(engine: Engine) -> dict:
    return {path: (m.in_features, m.out_features) for path, m in engine.modules.items()}


ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _config(rank: int, targets: list[str] | None = None) -> dict:
    return {"r": rank, "lora_alpha": 32.0, "target_modules": targets or ALL_TARGETS,
            "base_model_name_or_path": "tiny"}


@pytest.fixture(scope="module")
def engine(tiny_model_path):
    eng = Engine(model=tiny_model_path, cpu_threads=1, max_slots=2, host_cache_size=2)
    yield eng
    eng.shutdown()


async def test_single_flight_three_requests_one_store_read(tiny_model_path):
    store = CountingStore(open_store(f"memory://engine-{uuid.uuid4().hex}"))
    eng = Engine(model=tiny_model_path, cpu_threads=1, store=store, max_slots=2)
    try:
        rev = store.commit("shared", random_lora(_shapes(eng), 4, seed=3, scale=0.3), config=_config(4),
                           parent=None)
        results = await asyncio.gather(*(eng.generate(PROMPT, adapter="shared", max_tokens=6)
                                         for _ in range(3)))
        assert store.reads == 1
        assert {r.adapter for r in results} == {f"shared@{rev}"}
        assert len({tuple(r.token_ids) for r in results}) == 1
        assert await eng.load("shared") == f"shared@{rev}" and store.reads == 1
    finally:
        eng.shutdown()


async def test_slot_eviction_keeps_answers_right(engine):
    names = [f"slot{i}" for i in range(3)]
    for i, name in enumerate(names):
        engine.install(name, random_lora(_shapes(engine), 4, seed=10 + i, scale=0.3))
    base = await engine.generate(PROMPT, max_tokens=8)
    alone = [await engine.generate(PROMPT, adapter=n, max_tokens=8) for n in names]
    evictions = engine.stats()["slot_evictions"]
    together = await engine.generate_batch([PROMPT] * 3, names, max_tokens=8)  # 3 adapters, 2 slots
    assert [r.token_ids for r in together] == [r.token_ids for r in alone]
    assert all(r.token_ids != base.token_ids for r in alone)
    assert engine.stats()["slot_evictions"] > evictions
    assert engine.stats()["slots_used"] <= 2


async def test_memory_only_adapters_are_pinned(engine):
    """host_cache_size=2 but no store: every installed adapter stays, or it would be lost."""
    names = [f"pin{i}" for i in range(4)]
    expected = {}
    for i, name in enumerate(names):
        expected[name] = engine.install(name, random_lora(_shapes(engine), 2, seed=20 + i, scale=0.3))
    assert set(expected.values()) <= set(engine.resident())
    for name in names:
        result = await engine.generate(PROMPT, adapter=name, max_tokens=4)
        assert result.adapter == expected[name]
    assert engine.stats()["host_pinned"] >= 4


async def test_host_tier_evicts_stored_adapters_and_reloads(tiny_model_path):
    store = CountingStore(open_store(f"memory://engine-{uuid.uuid4().hex}"), delay_s=0.0)
    eng = Engine(model=tiny_model_path, cpu_threads=1, store=store, max_slots=1, host_cache_size=2)
    try:
        shapes = _shapes(eng)
        for i in range(4):
            store.commit(f"h{i}", random_lora(shapes, 4, seed=30 + i, scale=0.3), config=_config(4),
                         parent=None)
        first = [await eng.generate(PROMPT, adapter=f"h{i}", max_tokens=6) for i in range(4)]
        stats = eng.stats()
        assert stats["host_adapters"] <= 2 and stats["host_evictions"] >= 2
        reads = store.reads
        again = await eng.generate(PROMPT, adapter="h0", max_tokens=6)
        assert store.reads == reads + 1  # evicted from both tiers, read back from the store
        assert again.token_ids == first[0].token_ids and again.adapter == first[0].adapter
    finally:
        eng.shutdown()


async def test_exact_revisions_and_latest(engine):
    old = engine.install("versioned", random_lora(_shapes(engine), 4, seed=40, scale=0.3))
    new = engine.install("versioned", random_lora(_shapes(engine), 4, seed=41, scale=0.3))
    assert old != new and engine.resolve("versioned") == new
    latest = await engine.generate(PROMPT, adapter="versioned", max_tokens=6)
    pinned = await engine.generate(PROMPT, adapter=old, max_tokens=6)
    by_seq = await engine.generate(PROMPT, adapter="versioned@1", max_tokens=6)
    assert latest.adapter == new and pinned.adapter == old and by_seq.adapter == old
    assert pinned.token_ids == by_seq.token_ids != latest.token_ids
    with pytest.raises(RevisionNotFoundError):
        await engine.generate(PROMPT, adapter="versioned@9")


def test_install_state_roundtrip_and_delete(engine):
    tensors = random_lora(_shapes(engine), 8, seed=50, scale=0.3)
    key = engine.install("roundtrip", tensors)
    state = engine.adapter_state("roundtrip")
    assert state.keys() == tensors.keys()
    for k, v in tensors.items():
        torch.testing.assert_close(state[k], v)
        assert state[k].device.type == "cpu"
    assert key in engine.resident()
    assert engine.delete("roundtrip") is True
    assert engine.resolve("roundtrip") is None and engine.adapter_state("roundtrip") is None
    assert engine.delete("roundtrip") is False
    assert key not in engine.resident()


def _bad_adapters(shapes: dict) -> dict:
    good = random_lora(shapes, 4, seed=60)
    first = next(iter(shapes))
    a_key = f"base_model.model.{first}.lora_A.weight"
    return {
        "unknown module": {**good, "base_model.model.lm_head.lora_A.weight": torch.zeros(4, 64),
                           "base_model.model.lm_head.lora_B.weight": torch.zeros(1024, 4)},
        "not a peft key": {**good, "model.layers.0.weight": torch.zeros(2, 2)},
        "wrong shape": {**good, a_key: torch.zeros(4, 7)},
        "rank too high": random_lora(shapes, 65, seed=61),
        "nan": {**good, a_key: torch.full_like(good[a_key], float("nan"))},
        "missing B": {k: v for k, v in good.items() if not k.endswith(f"{first}.lora_B.weight")},
        "integer": {**good, a_key: good[a_key].to(torch.int64)},
        "empty": {},
    }


@pytest.mark.parametrize("case", list(_bad_adapters({"model.layers.0.self_attn.q_proj": (64, 64)})))
def test_invalid_adapters_rejected_before_device(engine, case):
    tensors = _bad_adapters(_shapes(engine))[case]
    with pytest.raises(InvalidAdapterError):
        engine.install(f"bad-{case.replace(' ', '-')}", tensors)
    assert engine.resolve(f"bad-{case.replace(' ', '-')}") is None


async def test_store_adapter_with_unknown_module_is_an_error_not_base(tiny_model_path):
    store = open_store(f"memory://engine-{uuid.uuid4().hex}")
    eng = Engine(model=tiny_model_path, cpu_threads=1, store=store, max_slots=1, target_modules=["q_proj"])
    try:  # the store accepts a v_proj adapter; this engine adapts q_proj only
        shapes = {p.replace("q_proj", "v_proj"): (64, 32) for p in _shapes(eng)}
        store.commit("elsewhere", random_lora(shapes, 4, seed=70), config=_config(4, ["v_proj"]),
                     parent=None)
        with pytest.raises(InvalidAdapterError):
            await eng.generate(PROMPT, adapter="elsewhere")
    finally:
        eng.shutdown()


async def test_loading_an_old_revision_first_does_not_hide_the_latest(tiny_model_path):
    store = open_store(f"memory://engine-{uuid.uuid4().hex}")
    eng = Engine(model=tiny_model_path, cpu_threads=1, store=store, max_slots=2)
    try:
        shapes = _shapes(eng)
        first = store.commit("x", random_lora(shapes, 4, seed=80, scale=0.3), config=_config(4), parent=None)
        second = store.commit("x", random_lora(shapes, 4, seed=81, scale=0.3), config=_config(4),
                              parent=first)
        old = await eng.generate(PROMPT, adapter="x@1", max_tokens=4)
        latest = await eng.generate(PROMPT, adapter="x", max_tokens=4)
        assert old.adapter == f"x@{first}" and latest.adapter == f"x@{second}"
    finally:
        eng.shutdown()


def test_memory_only_revisions_are_bounded(engine):
    """Repeated installs without a store keep the newest few revisions, not every one (no leak)."""
    keys = [engine.install("churn", random_lora(_shapes(engine), 4, seed=60 + i, scale=0.3))
            for i in range(6)]
    resident = [key for key in engine.resident() if key.startswith("churn@")]
    assert sorted(resident) == sorted(keys[-3:])
    assert engine.resolve("churn") == keys[-1]
