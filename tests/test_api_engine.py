"""OnlineLLM / AsyncOnlineLLM end to end: the real Engine on the tiny local model, real stores.

Learning then greedy generation returns the taught answer; save/load/list/info/delete on a local
directory and on S3 (moto on loopback); a corrupted file and a read-only store are reported, not
raised; a new API object on the same store serves what the first one learned; the blocking API
works from a running event loop's executor; the model is loaded once per API object.
"""
from __future__ import annotations

import asyncio
import logging
import os

import pytest
import torch
from test_api_fakes import flip_bytes, read_only

from serve import AsyncOnlineLLM, OnlineLLM
from serve.errors import InvalidAdapterError

pytestmark = pytest.mark.timeout(120)
FACTS = [{"prompt": "What is the capital of France?", "response": "Paris is the capital."},
         {"prompt": "What color is the sky?", "response": "The sky is blue."}]
QUESTION, ANSWER = FACTS[0]["prompt"], FACTS[0]["response"]


@pytest.fixture(scope="module")
def llm(tiny_model_path, tmp_path_factory):
    """One API object (one model load) on a local store, shared by this module's local-store tests."""
    api = OnlineLLM(tiny_model_path, store=str(tmp_path_factory.mktemp("api") / "adapters"),
                    max_tokens=12)
    yield api
    api.close()


@pytest.fixture(scope="module")
def geo(llm):
    """The report of teaching FACTS to adapter 'geo'."""
    return llm.learn(FACTS, adapter="geo")


def test_learn_then_generate_returns_taught_answer(llm, geo):
    assert geo["adapter"] == "geo" and geo["committed"] and geo["steps"] > 0 and geo["tokens"] > 0
    assert geo["loss_after"] < geo["loss_before"]
    assert llm.store.latest("geo") == geo["revision"]      # auto-saved before learn returned
    assert llm.generate(QUESTION, adapter="geo") == ANSWER
    assert llm.generate(FACTS[1]["prompt"], adapter="geo") == FACTS[1]["response"]
    base = llm.generate(QUESTION)
    assert base != ANSWER
    assert llm.generate(QUESTION, adapter="stranger") == base  # unknown: like the base, nothing written
    assert "stranger" not in llm.list_adapters()
    assert not os.path.exists(os.path.join(llm.get_lora_save_path(), "stranger"))


def test_management_methods_on_a_local_store(llm, geo):
    info = llm.get_adapter_info("geo")
    assert info["in_memory"] and info["on_disk"] and info["revision"] == geo["revision"]
    assert info["metadata"]["lora_rank"] == 16 and "disk_error" not in info
    state = llm.engine.adapter_state("geo")
    assert info["param_count"] == sum(t.numel() for t in state.values()) > 0
    loaded = llm.load_lora_from_disk("geo")
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)
    assert all(t.device.type == "cpu" for t in loaded.values())
    assert llm.save_lora_to_disk("geo") is True                     # already committed: no new revision
    assert llm.store.list_revisions("geo") == [geo["revision"]]
    assert "geo" in llm.list_disk_adapters() and llm.list_adapters() == sorted(llm.list_adapters())
    assert llm.delete_adapter("geo") is True and not llm.get_adapter_info("geo")["in_memory"]
    assert llm.generate(QUESTION, adapter="geo") == ANSWER          # memory miss -> store
    assert llm.ensure_lora_adapter("geo") is True
    stats = llm.stats(show_detailed=False)
    assert stats["num_disk_adapters"] >= 1 and any(r.startswith("geo@") for r in stats["resident_adapters"])


def test_save_explicit_state_then_delete_from_disk(llm):
    llm.learn(["plain text to learn"], adapter="scratch", steps=2)
    first = llm.store.latest("scratch")
    zeros = {k: torch.zeros_like(v) for k, v in llm.load_lora_from_disk("scratch").items()}
    assert llm.save_lora_to_disk("scratch", lora_state=zeros) is True
    assert llm.store.read("scratch").meta["parent"] == first
    assert llm.generate(QUESTION, adapter="scratch") == llm.generate(QUESTION)  # B = 0: the base
    assert llm.delete_adapter("scratch", delete_from_disk=True) is True
    assert "scratch" not in llm.list_adapters() and llm.load_lora_from_disk("scratch") is None


def test_corrupted_file_is_reported_not_raised(llm, caplog):
    rev = llm.learn(FACTS[:1], adapter="fragile", steps=2)["revision"]
    llm.delete_adapter("fragile")
    flip_bytes(os.path.join(llm.get_lora_save_path(), "fragile", rev, "adapter_model.safetensors"))
    with caplog.at_level(logging.ERROR):
        assert llm.load_lora_from_disk("fragile") is None
        assert llm.ensure_lora_adapter("fragile") is False
    info = llm.get_adapter_info("fragile")
    assert info["on_disk"] and not info["in_memory"] and info["disk_error"]
    assert llm.delete_adapter("fragile", delete_from_disk=True) is True


def test_read_only_store_save_returns_false(llm):
    llm.learn(FACTS[:1], adapter="frozen", steps=2)
    before = llm.store.list_revisions("frozen")
    with read_only(llm.get_lora_save_path()):
        assert llm.save_lora_to_disk("frozen", lora_state=llm.load_lora_from_disk("frozen")) is False
    assert llm.store.list_revisions("frozen") == before


def test_shape_mismatch_fails_clearly(llm):
    bad = {k: torch.zeros(v.shape[0], v.shape[1] + 1) if ".lora_A." in k else v
           for k, v in llm.load_lora_from_disk("geo").items()}
    config = {"r": 16, "lora_alpha": 32.0, "base_model_name_or_path": "other/model",
              "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
    llm.store.commit("misfit", bad, config=config, parent=None)
    with pytest.raises(InvalidAdapterError):
        llm.ensure_lora_adapter("misfit")


def test_new_api_object_serves_what_was_learned(llm, geo, tiny_model_path):
    with OnlineLLM(tiny_model_path, store=llm.get_lora_save_path(), lora_alpha=16.0,
                   max_tokens=12) as again:
        assert again.generate(QUESTION, adapter="geo") == ANSWER
        assert "geo" in again.list_adapters()
        assert again.get_adapter_info("geo")["metadata_warnings"]  # alpha 32 stored, 16 configured


async def test_blocking_api_from_a_running_loops_executor(llm, geo, monkeypatch):
    import transformers

    loads = []
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda *args, **kwargs: loads.append(args))
    loop = asyncio.get_running_loop()
    texts = await asyncio.gather(*(loop.run_in_executor(None, llm.generate, QUESTION, "geo")
                                   for _ in range(4)))
    report = await loop.run_in_executor(None, lambda: llm.learn(FACTS, adapter="geo", steps=1))
    assert texts == [ANSWER] * 4 and report["parent"] == geo["revision"]
    assert loads == []                      # no call reloads the model


@pytest.mark.s3
async def test_async_api_on_an_s3_store(tiny_model_path, s3_store_url):
    api = AsyncOnlineLLM(tiny_model_path, store=s3_store_url, max_tokens=12)
    try:
        report = await api.learn(FACTS, adapter="cloud")
        assert report["committed"]
        taught, base = await asyncio.gather(api.generate(QUESTION, adapter="cloud"), api.generate(QUESTION))
        assert taught == ANSWER != base
        assert "".join([piece async for piece in api.stream(QUESTION, adapter="cloud")]) == ANSWER
        assert api.list_disk_adapters() == ["cloud"] and api.get_lora_save_path() == s3_store_url
        info = api.get_adapter_info("cloud")
        assert info["on_disk"] and info["disk_path"].startswith("s3://") and "disk_error" not in info
        assert set(api.load_lora_from_disk("cloud")) == set(api.engine.adapter_state("cloud"))
        assert api.delete_adapter("cloud", delete_from_disk=True) is True
        assert api.list_adapters() == [] and await api.generate(QUESTION, adapter="cloud") != ANSWER
    finally:
        api.close()


def test_ensure_then_learn_with_a_store(llm):
    assert llm.ensure_lora_adapter("newcomer") is False
    report = llm.learn(FACTS[:1], adapter="newcomer", steps=2)
    assert report["committed"] and llm.store.latest("newcomer") == report["revision"]
