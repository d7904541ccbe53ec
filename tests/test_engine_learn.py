"""Online learning through the Engine: it teaches, keeps serving others meanwhile, continues from its
optimizer state, commits to a store that a fresh engine serves, and refuses bad input up front."""
from __future__ import annotations

import asyncio
import uuid

import pytest

from adapters_store import open_store
from adapters_store.errors import OnlineLLMError
from adapters_store.names import revision_seq
from adapters_store.testing import random_lora
from serve.engine import Engine, InvalidRequestError, PromptTooLongError

TAUGHT = [{"prompt": "What is the capital of France?", "response": " Paris is the capital."},
          {"prompt": "Color of the sky?", "response": " The sky is blue."},
          {"prompt": "Who wrote the python code?", "response": " Guido wrote it."}]


@pytest.fixture(scope="module")
def engine(tiny_model_path):
    eng = Engine(model=tiny_model_path, cpu_threads=1, max_slots=4)
    yield eng
    eng.shutdown()


async def test_learn_teaches_this_adapter_only(engine):
    report = await engine.learn(TAUGHT, adapter="tutor")
    assert report.adapter == "tutor" and report.parent is None and not report.committed
    assert revision_seq(report.revision) == 1 and engine.resolve("tutor") == f"tutor@{report.revision}"
    assert report.steps == engine.config.learn_steps and report.tokens > 0
    assert report.loss_after < report.loss_before
    await engine.learn([{"prompt": p["prompt"], "response": " no idea."} for p in TAUGHT], adapter="other")
    for example in TAUGHT:
        taught = await engine.generate(example["prompt"], adapter="tutor", max_tokens=16)
        assert taught.text == example["response"] and taught.finish_reason == "stop"
        assert (await engine.generate(example["prompt"], max_tokens=16)).text != example["response"]
        other = await engine.generate(example["prompt"], adapter="other", max_tokens=16)
        assert other.text == " no idea."


async def test_learn_conversations_and_plain_text(engine):
    chat = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "name a city"},
            {"role": "assistant", "content": "Rome"}]
    await engine.learn([chat, "the river of the old city"], adapter="chatty", steps=40)
    reply = await engine.generate(chat[:-1], adapter="chatty", max_tokens=8)
    assert reply.text == "Rome" and reply.finish_reason == "stop"


async def test_generation_for_others_runs_while_learning(engine):
    """Another adapter, the base, and the trained adapter's previous revision are all served while
    a learn runs; every answer comes back before the learn finishes."""
    engine.install("bystander", random_lora(
        {p: (m.in_features, m.out_features) for p, m in engine.modules.items()}, 4, seed=5, scale=0.3))
    previous = await engine.learn(TAUGHT, adapter="busy", steps=2)
    learn = asyncio.ensure_future(engine.learn(TAUGHT, adapter="busy", steps=150))
    await asyncio.sleep(0.05)
    assert not learn.done()
    served = await engine.generate_batch([TAUGHT[0]["prompt"]] * 3, ["bystander", None, "busy"],
                                         max_tokens=8, ignore_eos=True)
    assert [r.completion_tokens for r in served] == [8, 8, 8]
    assert served[2].adapter == f"busy@{previous.revision}"  # the old revision until the new one lands
    assert not learn.done()  # the answers came back while training was still going on
    report = await learn
    assert report.steps == 150 and report.parent == previous.revision
    assert engine.resolve("busy") == f"busy@{report.revision}"


async def test_learn_commits_and_continues_from_optimizer_state(tiny_model_path):
    url = f"memory://engine-learn-{uuid.uuid4().hex}"
    store = open_store(url)
    first_engine = Engine(model=tiny_model_path, cpu_threads=1, store=store, max_slots=2)
    try:
        first = await first_engine.learn(TAUGHT, adapter="kept", steps=30)
        assert first.committed and store.latest("kept") == first.revision
        second = await first_engine.learn(TAUGHT, adapter="kept", steps=5)
        assert second.parent == first.revision and store.latest("kept") == second.revision
        optimizer = store.read("kept", with_optimizer=True).optimizer_state
        steps = {float(v.reshape(-1)[0]) for k, v in optimizer.items() if k.endswith(".step")}
        assert steps == {35.0}  # AdamW's step count went on from the first learn
        assert second.loss_before < first.loss_before
    finally:
        first_engine.shutdown()
    fresh = Engine(model=tiny_model_path, cpu_threads=1, store=open_store(url), max_slots=2)
    try:
        result = await fresh.generate(TAUGHT[1]["prompt"], adapter="kept", max_tokens=16)
        assert result.adapter == f"kept@{second.revision}" and result.text == TAUGHT[1]["response"]
    finally:
        fresh.shutdown()


async def test_learn_after_ensure_commits_a_first_revision(tiny_model_path):
    store = open_store(f"memory://engine-ensure-{uuid.uuid4().hex}")
    eng = Engine(model=tiny_model_path, cpu_threads=1, store=store, max_slots=2)
    try:
        assert eng.ensure("newbie") is False  # fresh, memory only: answers like the base model
        base = await eng.generate(TAUGHT[0]["prompt"], max_tokens=6)
        made = await eng.generate(TAUGHT[0]["prompt"], adapter="newbie", max_tokens=6)
        assert made.token_ids == base.token_ids and store.latest("newbie") is None
        report = await eng.learn(TAUGHT, adapter="newbie", steps=3)
        assert report.committed and store.list_revisions("newbie") == [report.revision]
        assert eng.ensure("newbie") is True
    finally:
        eng.shutdown()


async def test_concurrent_learns_on_one_adapter_chain(engine):
    reports = await asyncio.gather(*(engine.learn(TAUGHT[:1], adapter="chain", steps=3) for _ in range(3)))
    revisions = sorted(r.revision for r in reports)
    assert [revision_seq(r) for r in revisions] == [1, 2, 3]
    parents = {r.revision: r.parent for r in reports}
    assert parents[revisions[1]] == revisions[0] and parents[revisions[2]] == revisions[1]


async def test_learn_from_an_older_parent_in_memory_mode_conflicts(engine):
    first = await engine.learn(TAUGHT[:1], adapter="forked", steps=2)
    await engine.learn(TAUGHT[:1], adapter="forked", steps=2)
    with pytest.raises(OnlineLLMError):
        await engine.learn(TAUGHT[:1], adapter="forked", steps=2, parent=first.revision)


@pytest.mark.parametrize("data, opts", [
    ([], {}), ({}, {}), (None, {}), ([{"prompt": "q"}], {}), ([{"prompt": "q", "response": 3}], {}),
    ([{"prompt": "q", "answer": "a"}], {}), ([[{"role": "wizard", "content": "hi"}]], {}),
    ([[{"role": "user", "content": "no answer"}]], {}), ([42], {}),
    (TAUGHT, {"steps": 0}), (TAUGHT, {"lr": 0.0}), (TAUGHT, {"lr": 5.0}), (TAUGHT, {"steps": 2.5}),
    (TAUGHT, {"momentum": 0.9}),
])
async def test_bad_learn_input_fails_before_training(engine, data, opts):
    steps_before = engine.stats()["learn_steps"]
    with pytest.raises(InvalidRequestError) as info:
        await engine.learn(data, adapter="never-trained", **opts)
    assert isinstance(info.value, ValueError)
    assert engine.stats()["learn_steps"] == steps_before and engine.resolve("never-trained") is None


async def test_too_long_example_and_revision_ref_rejected(engine):
    with pytest.raises(PromptTooLongError):
        await engine.learn([{"prompt": "word " * 2000, "response": "x"}], adapter="long")
    with pytest.raises(InvalidRequestError):
        await engine.learn(TAUGHT, adapter="tutor@1")
