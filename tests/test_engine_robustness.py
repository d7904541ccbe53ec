"""The engine keeps serving when one request, one call or the caller goes wrong: an adapter whose
logits overflow fails only its own request; a failed prompt_logits gives its device slots back;
shutdown resolves generate futures still waiting for their adapter; bad learn options are refused
before training and diverged weights are never installed; an abandoned stream or a cancelled generate
stops decoding."""
from __future__ import annotations

import asyncio
import time

import pytest
import torch

from adapters_store.errors import StoreUnavailableError
from serve.engine import Engine
from serve.engine.errors import EngineStoppedError, InvalidRequestError
from serve.engine.lora import peft_key

pytestmark = pytest.mark.timeout(120)
PROMPT = "hello world"


@pytest.fixture(scope="module")
def engine(tiny_model_path):
    eng = Engine(model=tiny_model_path, cpu_threads=1, max_slots=2, batch_window_ms=20)
    yield eng
    eng.shutdown()


def _huge_tensors(engine: Engine) -> dict[str, torch.Tensor]:
    """Finite (so they pass validation) but so large that the model's logits overflow."""
    tensors = {}
    for path, module in engine.modules.items():
        tensors[peft_key(path, "A")] = torch.full((4, module.in_features), 1e15)
        tensors[peft_key(path, "B")] = torch.full((module.out_features, 4), 1e15)
    return tensors


def _wait_idle(engine: Engine, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while engine.scheduler.rows and time.monotonic() < deadline:
        time.sleep(0.02)


def test_overflowing_adapter_fails_only_its_request(engine):
    engine.install("huge", _huge_tensors(engine))
    bad = engine.submit_generate(PROMPT, "huge", temperature=1.0, max_tokens=4)
    good = engine.submit_generate(PROMPT, None, max_tokens=4, ignore_eos=True)  # same batch
    with pytest.raises(InvalidRequestError, match="NaN/Inf"):
        bad.result(timeout=60)
    assert good.result(timeout=60).completion_tokens == 4
    assert engine.scheduler.alive
    later = engine.submit_generate(PROMPT, None, temperature=1.0, seed=1, max_tokens=3, ignore_eos=True)
    assert later.result(timeout=60).completion_tokens == 3
    engine.delete("huge")


def test_failed_prompt_logits_gives_its_slots_back(tiny_model_path):
    eng = Engine(model=tiny_model_path, cpu_threads=1, max_slots=1, batch_window_ms=0)
    try:
        for name in ("a", "b", "c"):
            eng.ensure(name)
        with pytest.raises(InvalidRequestError, match="slots"):
            eng.prompt_logits([PROMPT, PROMPT], ["a", "b"])
        # the one slot is free again: another adapter can be served
        result = eng.submit_generate(PROMPT, "c", max_tokens=2).result(timeout=20)
        assert result.adapter.startswith("c@")
    finally:
        eng.shutdown()


class SlowFailingStore:
    """Knows every adapter but every read is slow and fails: generate futures wait on preparation."""

    url = "slow://"

    def latest(self, name):
        return "000001-aaaaaaaa"

    def list_revisions(self, name):
        return ["000001-aaaaaaaa"]

    def read(self, name, rev=None, *, with_optimizer=False):
        time.sleep(0.5)
        raise StoreUnavailableError("slow store")


def test_shutdown_resolves_generates_still_being_prepared(tiny_model_path):
    eng = Engine(model=tiny_model_path, cpu_threads=1, store=SlowFailingStore(), batch_window_ms=0)
    futures = [eng.submit_generate(PROMPT, f"ad{i}", max_tokens=2) for i in range(12)]  # > 8 workers
    time.sleep(0.1)
    eng.shutdown()
    errors = [f.exception(timeout=10) for f in futures]  # TimeoutError here = a caller hangs forever
    assert all(isinstance(e, (EngineStoppedError, StoreUnavailableError)) for e in errors), errors
    assert any(isinstance(e, EngineStoppedError) for e in errors)


@pytest.mark.parametrize("bad", [{"max_grad_norm": float("nan")}, {"max_grad_norm": 0.0},
                                 {"batch_size": 0}, {"batch_size": 1.5}, {"weight_decay": -1.0},
                                 {"weight_decay": 2.0}])
def test_learn_refuses_bad_options_before_training(engine, bad):
    with pytest.raises(InvalidRequestError):
        engine.submit_learn([{"prompt": "a", "response": "b"}], "opts", steps=1, **bad)
    assert engine.adapters.latest_revision("opts") is None


def test_diverged_learn_installs_nothing(engine):
    key = engine.install("diverge", _huge_tensors(engine))
    future = engine.submit_learn([{"prompt": "a", "response": "b"}], "diverge", steps=1)
    with pytest.raises(InvalidRequestError, match="NaN/Inf"):
        future.result(timeout=60)
    assert engine.resolve("diverge") == key       # the latest is still the one installed
    assert engine.scheduler.alive
    engine.delete("diverge")


async def test_abandoned_stream_stops_decoding(engine):
    before = engine.scheduler.tokens_out
    stream = engine.stream(PROMPT, None, max_tokens=400, ignore_eos=True)
    async for _delta in stream:
        break
    await stream.aclose()                                   # the consumer is gone
    await asyncio.to_thread(_wait_idle, engine)
    assert not engine.scheduler.rows
    assert engine.scheduler.tokens_out - before < 200       # not decoded on to max_tokens


async def test_cancelled_generate_stops_decoding(engine):
    before = engine.scheduler.tokens_out
    task = asyncio.ensure_future(engine.generate(PROMPT, None, max_tokens=400, ignore_eos=True))
    while engine.scheduler.tokens_out == before:            # it is decoding
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.to_thread(_wait_idle, engine)
    assert engine.scheduler.tokens_out - before < 200


def test_cancelled_submit_generate_future_stops_decoding(engine):
    before = engine.scheduler.tokens_out
    future = engine.submit_generate(PROMPT, None, max_tokens=400, ignore_eos=True)
    deadline = time.monotonic() + 30
    while engine.scheduler.tokens_out == before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert future.cancel()                                  # cancellable while its row decodes
    _wait_idle(engine)
    assert not engine.scheduler.rows
    assert engine.scheduler.tokens_out - before < 200


def test_delete_forgets_the_adapters_learn_lock(engine):
    engine.submit_learn([{"prompt": "a", "response": "b"}], "gone", steps=1).result(timeout=60)
    assert "gone" in engine.trainer._locks
    assert engine.delete("gone")
    assert "gone" not in engine.trainer._locks and engine.resolve("gone") is None
