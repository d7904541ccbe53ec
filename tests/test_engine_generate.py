"""Generation through the Engine's public methods: sampling options, stop strings, streaming,
continuous batching, chat prompts, threads and event loops, and bad-request errors."""
from __future__ import annotations

import asyncio
import threading

import pytest

from adapters_store.errors import AdapterNotFoundError, InvalidAdapterNameError, OnlineLLMError
from serve.engine import Engine, InvalidRequestError, PromptTooLongError
from serve.engine.errors import EngineStoppedError

PROMPT = "the capital of france is"


@pytest.fixture(scope="module")
def engine(tiny_model_path):
    eng = Engine(model=tiny_model_path, cpu_threads=1, max_slots=4, batch_window_ms=5.0)
    yield eng
    eng.shutdown()


async def test_max_tokens_and_finish_reason(engine):
    result = await engine.generate(PROMPT, max_tokens=5)
    assert result.completion_tokens == 5 == len(result.token_ids)
    assert result.finish_reason == "length"
    assert result.prompt_tokens == len(engine.tokenizer(PROMPT)["input_ids"])
    assert result.adapter is None
    assert result.text == engine.tokenizer.decode(result.token_ids, skip_special_tokens=True)


async def test_stop_string_cuts_text(engine):
    full = await engine.generate(PROMPT, max_tokens=12)
    assert len(full.text) > 4
    stop = full.text[2:4]
    cut = await engine.generate(PROMPT, max_tokens=12, stop=[stop, "never-there"])
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[:full.text.index(stop)]


async def test_seed_reproducible_and_sampling_varies(engine):
    opts = dict(max_tokens=16, temperature=1.5, top_p=0.95, top_k=200)
    first = await engine.generate(PROMPT, seed=7, **opts)
    again = await engine.generate(PROMPT, seed=7, **opts)
    others = [await engine.generate(PROMPT, seed=s, **opts) for s in (1, 2, 3)]
    assert first.token_ids == again.token_ids
    assert any(o.token_ids != first.token_ids for o in others)


async def test_top_k_one_is_greedy(engine):
    greedy = await engine.generate(PROMPT, max_tokens=10, temperature=0)
    sampled = await engine.generate(PROMPT, max_tokens=10, temperature=2.0, top_k=1, seed=3)
    assert sampled.token_ids == greedy.token_ids


async def test_stream_deltas_join_to_text(engine):
    deltas = [d async for d in engine.stream(PROMPT, max_tokens=12)]
    result = await engine.generate(PROMPT, max_tokens=12)
    assert len(deltas) > 1
    assert "".join(deltas) == result.text
    stop = result.text[3:6]
    stopped = [d async for d in engine.stream(PROMPT, max_tokens=12, stop=stop)]
    assert "".join(stopped) == result.text[:result.text.index(stop)]


async def test_batch_answers_equal_single_answers(engine):
    prompts = ["hello world", PROMPT, "a", "blue green red yellow color sky"]
    singles = [await engine.generate(p, max_tokens=8) for p in prompts]
    batch = await engine.generate_batch(prompts, max_tokens=8)
    assert [r.token_ids for r in batch] == [r.token_ids for r in singles]


async def test_requests_join_a_running_batch(engine):
    """A request sent while a long one decodes joins it (continuous batching) and finishes first."""
    steps_before = engine.stats()["decode_steps"]
    long_task = asyncio.ensure_future(engine.generate("blue sky", max_tokens=200, stop=None))
    await asyncio.sleep(0.05)
    short = await engine.generate("hello world", max_tokens=4)
    assert not long_task.done()
    long = await long_task
    assert short.completion_tokens == 4 and long.completion_tokens == 200
    # both shared decode steps: fewer steps than running them one after the other
    assert engine.stats()["decode_steps"] - steps_before < 200 + 4


async def test_chat_messages_use_template(engine):
    messages = [{"role": "user", "content": "what is the capital of france?"}]
    result = await engine.generate(messages, max_tokens=6)
    text = engine.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert result.prompt_tokens == len(engine.tokenizer(text, add_special_tokens=False)["input_ids"])
    same = await engine.generate(text, max_tokens=6)
    assert same.token_ids == result.token_ids


def test_blocking_use_from_threads_and_other_loops(engine):
    expected = asyncio.run(engine.generate(PROMPT, max_tokens=6)).token_ids
    results = []

    def worker():
        results.append(engine.submit_generate(PROMPT, max_tokens=6).result(timeout=60).token_ids)
        results.append(asyncio.run(engine.generate(PROMPT, max_tokens=6)).token_ids)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert results == [expected] * 6


async def test_unknown_adapter_answers_like_base_and_writes_nothing(engine):
    base = await engine.generate(PROMPT, max_tokens=8)
    unknown = await engine.generate(PROMPT, adapter="never-made", max_tokens=8)
    assert unknown.token_ids == base.token_ids and unknown.adapter is None
    assert not any(ref.startswith("never-made@") for ref in engine.resident())
    assert engine.resolve("never-made") is None
    with pytest.raises(AdapterNotFoundError):
        await engine.generate(PROMPT, adapter="never-made@000001-deadbeef")


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0), dict(max_tokens=0),
                                 dict(top_k=-2), dict(stop=[""]), dict(nonsense=1)])
async def test_bad_sampling_values_are_clear_errors(engine, bad):
    with pytest.raises(InvalidRequestError) as info:
        await engine.generate(PROMPT, **bad)
    assert isinstance(info.value, (OnlineLLMError, ValueError))


async def test_bad_prompts_are_clear_errors(engine):
    with pytest.raises(PromptTooLongError):
        await engine.generate("word " * 2000, max_tokens=4)
    for bad in ("", [], [{"role": "user"}], 42):
        with pytest.raises(InvalidRequestError):
            await engine.generate(bad)
    with pytest.raises(InvalidAdapterNameError):
        await engine.generate(PROMPT, adapter="../etc")


async def test_max_tokens_capped_by_context(tiny_model_path):
    eng = Engine(model=tiny_model_path, cpu_threads=1, max_model_len=16, max_slots=1)
    try:
        prompt = "the capital of france is blue green"
        n = len(eng.tokenizer(prompt)["input_ids"])
        result = await eng.generate(prompt, max_tokens=100)
        assert result.finish_reason == "length" and result.completion_tokens == 16 - n
        eng.check_health()
    finally:
        eng.shutdown()
    with pytest.raises(EngineStoppedError):
        eng.check_health()
    with pytest.raises(EngineStoppedError):
        await eng.generate(prompt)


async def test_a_failed_decode_step_fails_its_rows_and_serving_goes_on(engine, monkeypatch):
    real_decode = engine.scheduler.batch.decode
    calls = {"n": 0}

    def decode_failing_once(tokens):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("simulated device error")
        return real_decode(tokens)

    monkeypatch.setattr(engine.scheduler.batch, "decode", decode_failing_once)
    with pytest.raises(RuntimeError, match="simulated device error"):
        await engine.generate(PROMPT, max_tokens=5)
    after = await engine.generate(PROMPT, max_tokens=5)
    assert after.completion_tokens == 5
    engine.check_health()
    assert engine.stats()["slots_busy"] == 0 and engine.stats()["running"] == 0
