"""OnlineLLM / AsyncOnlineLLM with an injected fake engine (tests/test_api_fakes.py) and a real store.

Covers the API's own logic: constructor options and store selection, return values and types of
every SEED_API method, memory-only mode, revisions chained by save, corrupted and read-only stores,
metadata mismatches, and the blocking twin called from plain code, threads and running loops.
"""
from __future__ import annotations

import asyncio
import io
import logging
import os
import subprocess
import sys
import threading

import pydantic
import pytest
import torch
from test_api_fakes import FakeEngine, flip_bytes, peft_tensors, read_only

from serve import AsyncOnlineLLM, OnlineLLM
from serve.errors import InvalidAdapterError, InvalidAdapterNameError

pytestmark = pytest.mark.timeout(60)
DATA = [{"prompt": "q", "response": "a"}]


@pytest.fixture
def store_dir(tmp_path) -> str:
    return str(tmp_path / "adapters")


@pytest.fixture
def llm(store_dir):
    api = OnlineLLM(engine_cls=FakeEngine, store=store_dir)
    yield api
    api.close()


@pytest.fixture
def mem_llm():
    api = OnlineLLM(engine_cls=FakeEngine, store=False)
    yield api
    api.close()


def test_import_serve_is_lazy_and_exports_api():
    code = ("import sys, serve; heavy = {'torch', 'ray', 'transformers'} & set(sys.modules); "
            "assert not heavy, heavy; from serve.errors import AdapterNotFoundError; "
            "from serve import errors, OnlineLLM, AsyncOnlineLLM, CorruptAdapterError; "
            "assert errors.AdapterNotFoundError is AdapterNotFoundError")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=os.path.dirname(os.path.dirname(__file__)))


def test_constructor_builds_one_engine_with_the_options():
    before = FakeEngine.constructed
    with OnlineLLM("some/model", temperature=0.5, max_tokens=7, lora_rank=8, lora_alpha=16.0,
                   store=False, engine_cls=FakeEngine, max_slots=4) as api:
        for _ in range(3):
            api.generate("hi")
        api.learn(DATA, adapter="a")
        assert FakeEngine.constructed == before + 1  # the model is not reloaded per call
        assert api.engine.overrides == {"model": "some/model", "temperature": 0.5, "max_tokens": 7,
                                        "lora_rank": 8, "lora_alpha": 16.0, "max_slots": 4}
        assert api.generate("hi") == "[base] hi (max_tokens=7,temperature=0.5)"
        assert api.generate("hi", temperature=0, max_tokens=3) == "[base] hi (max_tokens=3,temperature=0)"
    assert api.engine.shut_down


@pytest.mark.parametrize("bad", [{"temperature": -1}, {"max_tokens": 0}, {"lora_rank": 0},
                                 {"lora_alpha": 0}])
def test_constructor_rejects_bad_options(bad):
    before = FakeEngine.constructed
    with pytest.raises(pydantic.ValidationError):
        OnlineLLM(engine_cls=FakeEngine, store=False, **bad)
    assert FakeEngine.constructed == before


def test_store_from_lora_save_path(monkeypatch, store_dir):
    monkeypatch.setenv("LORA_SAVE_PATH", store_dir)
    with OnlineLLM(engine_cls=FakeEngine) as api:
        assert api.get_lora_save_path() == store_dir
        assert os.path.isdir(store_dir)  # a local directory is created
        assert api.engine.store is api.store
    with OnlineLLM(engine_cls=FakeEngine, store=False) as api:
        assert api.get_lora_save_path() is None
    monkeypatch.delenv("LORA_SAVE_PATH")
    with OnlineLLM(engine_cls=FakeEngine) as api:
        assert api.get_lora_save_path() is None and api.store is None


def test_store_that_cannot_be_opened_means_memory_only(tmp_path, caplog):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with OnlineLLM(engine_cls=FakeEngine, store=str(blocker / "adapters")) as api:
        assert api.get_lora_save_path() is None
        api.learn(DATA, adapter="a")
        with caplog.at_level(logging.WARNING, logger="serve.api"):
            assert api.save_lora_to_disk("a") is False
        assert "could not be opened" in caplog.text
        assert api.stats(show_detailed=False)["store_error"]


def test_memory_only_mode(mem_llm, caplog):
    report = mem_llm.learn(DATA, adapter="a", steps=2)
    assert report["adapter"] == "a" and report["committed"] is False and report["steps"] == 2
    assert {"revision", "tokens", "loss_before", "loss_after"} <= set(report)
    assert mem_llm.generate("q", adapter="a").startswith(f"[a@{report['revision']}]")
    with caplog.at_level(logging.WARNING, logger="serve.api"):
        assert mem_llm.save_lora_to_disk("a") is False
    assert "no adapter store" in caplog.text
    assert mem_llm.load_lora_from_disk("a") is None
    assert mem_llm.list_disk_adapters() == [] and mem_llm.list_adapters() == ["a"]
    info = mem_llm.get_adapter_info("a")
    assert info["in_memory"] and not info["on_disk"] and info["disk_path"] is None
    assert info["param_count"] == sum(t.numel() for t in peft_tensors(16).values())
    assert mem_llm.delete_adapter("a", delete_from_disk=True) is True
    assert mem_llm.list_adapters() == []


def test_learn_autosaves_and_management_methods(llm):
    report = llm.learn(DATA, adapter="beta")
    llm.learn(DATA, adapter="alpha")
    assert report["committed"] and llm.store.latest("beta") == report["revision"]
    assert llm.list_disk_adapters() == ["alpha", "beta"] == llm.list_adapters()
    info = llm.get_adapter_info("beta")
    assert info["in_memory"] and info["on_disk"] and info["revision"] == report["revision"]
    assert info["metadata"]["revision"] == report["revision"] and "disk_error" not in info
    assert os.path.isfile(os.path.join(info["disk_path"], "adapter_model.safetensors"))
    loaded = llm.load_lora_from_disk("beta")
    assert all(torch.equal(loaded[k], v) for k, v in llm.engine.adapter_state("beta").items())
    assert llm.save_lora_to_disk("beta") is True          # already the latest: nothing new
    assert llm.store.list_revisions("beta") == [report["revision"]]


def test_save_with_lora_state_chains_revisions_and_serves_them(llm):
    first = llm.learn(DATA, adapter="a")["revision"]
    state = peft_tensors(16, fill=0.25)
    assert llm.save_lora_to_disk("a", lora_state=state) is True
    revisions = llm.store.list_revisions("a")
    assert revisions[0] == first and len(revisions) == 2
    assert llm.store.read("a").meta["parent"] == first
    assert torch.equal(llm.engine.adapter_state("a")[next(iter(state))], next(iter(state.values())))
    assert llm.generate("q", adapter="a").startswith(f"[a@{revisions[1]}]")  # read your writes
    assert llm.save_lora_to_disk("a", lora_state={"junk": torch.ones(2)}) is False
    assert llm.save_lora_to_disk("a", lora_state={"k": "not a tensor"}) is False
    assert llm.store.list_revisions("a") == revisions


def test_delete_memory_then_disk(llm):
    llm.learn(DATA, adapter="a")
    assert llm.delete_adapter("a") is True
    info = llm.get_adapter_info("a")
    assert not info["in_memory"] and info["on_disk"] and info["param_count"] > 0
    assert llm.list_adapters() == ["a"]
    assert llm.delete_adapter("a") is False                 # nothing left in memory to drop
    assert llm.delete_adapter("a", delete_from_disk=True) is True
    assert llm.list_adapters() == [] and llm.load_lora_from_disk("a") is None
    assert llm.delete_adapter("nowhere", delete_from_disk=True) is False


def test_unknown_adapter_answers_like_base_and_writes_nothing(llm):
    assert llm.generate("q", adapter="stranger").startswith("[base]")
    assert llm.list_adapters() == [] and os.listdir(llm.get_lora_save_path()) == []


def test_ensure_memory_then_store_then_fresh(llm):
    assert llm.ensure_lora_adapter("fresh") is False
    assert llm.get_adapter_info("fresh")["in_memory"] and not llm.get_adapter_info("fresh")["on_disk"]
    assert llm.ensure_lora_adapter("fresh") is True
    llm.learn(DATA, adapter="kept")
    llm.delete_adapter("kept")
    assert llm.ensure_lora_adapter("kept") is True
    assert llm.get_adapter_info("kept")["in_memory"]


def test_resident_copy_takes_precedence_over_stored(llm):
    first = llm.learn(DATA, adapter="a")["revision"]
    newer = llm.store.commit("a", peft_tensors(16, fill=2.0), parent=first,
                             config={"r": 16, "lora_alpha": 32.0, "target_modules": ["q_proj", "down_proj"],
                                     "base_model_name_or_path": "fake/model"})
    assert llm.generate("q", adapter="a").startswith(f"[a@{first}]")
    assert llm.get_adapter_info("a")["revision"] == first
    assert llm.get_adapter_info("a")["disk_revision"] == newer


def test_corrupted_file_never_crashes(llm, caplog):
    rev = llm.learn(DATA, adapter="a")["revision"]
    llm.delete_adapter("a")
    flip_bytes(os.path.join(llm.get_lora_save_path(), "a", rev, "adapter_model.safetensors"))
    with caplog.at_level(logging.ERROR, logger="serve.api"):
        assert llm.load_lora_from_disk("a") is None
        assert llm.ensure_lora_adapter("a") is False
    assert "a" in caplog.text
    info = llm.get_adapter_info("a")
    assert info["on_disk"] and "disk_error" in info and "sha256" in info["disk_error"].lower()
    assert info["metadata"]["revision"] == rev  # meta.json itself is still readable


def test_read_only_store_save_returns_false(llm, caplog):
    rev = llm.learn(DATA, adapter="a")["revision"]
    llm.ensure_lora_adapter("b")
    with read_only(llm.get_lora_save_path()), caplog.at_level(logging.ERROR, logger="serve.api"):
        assert llm.save_lora_to_disk("a", lora_state=peft_tensors(16, fill=3.0)) is False
        assert llm.save_lora_to_disk("b") is False
        assert llm.delete_adapter("a", delete_from_disk=True) is True  # memory copy dropped
        assert llm.list_disk_adapters() == ["a"]
    assert "refused" in caplog.text or "Permission" in caplog.text
    assert llm.store.latest("a") == rev


def test_metadata_mismatch_warns_and_shape_mismatch_fails(llm, caplog):
    config = {"r": 4, "lora_alpha": 8.0, "target_modules": ["q_proj", "down_proj"],
              "base_model_name_or_path": "other/model"}
    llm.store.commit("odd", peft_tensors(4), config=config, parent=None, meta={"model_path": "other/model"})
    with caplog.at_level(logging.WARNING, logger="serve.api"):
        assert llm.ensure_lora_adapter("odd") is True
    assert "other/model" in caplog.text and "lora_rank 4" in caplog.text
    assert len(llm.get_adapter_info("odd")["metadata_warnings"]) == 3
    bad = {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.ones(4, 5),
           "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.ones(8, 4)}
    llm.store.commit("misfit", bad, config=config, parent=None)
    with pytest.raises(InvalidAdapterError, match="does not fit"):
        llm.ensure_lora_adapter("misfit")


def test_invalid_names_raise(llm):
    for call in (lambda: llm.save_lora_to_disk("../x"), lambda: llm.get_adapter_info("a b"),
                 lambda: llm.generate("q", adapter="bad/name"), lambda: llm.learn(DATA, adapter="")):
        with pytest.raises(InvalidAdapterNameError):
            call()


def test_stats_table(llm, capsys):
    llm.learn(DATA, adapter="a")
    out = io.StringIO()
    stats = llm.stats(stream=out)
    assert stats["num_resident"] == 1 and stats["num_disk_adapters"] == 1
    assert stats["store"] == llm.get_lora_save_path() and stats["cache"] == {"hits": 3, "misses": 1}
    assert stats["memory"]["process_rss_bytes"] > 0
    table = out.getvalue()
    assert "num_resident" in table and "engine.memory.host_bytes" in table
    llm.stats(show_detailed=False)
    assert capsys.readouterr().out == ""
    llm.stats()
    assert "resident_adapters" in capsys.readouterr().out


async def test_blocking_api_from_a_running_loop(mem_llm):
    loop = asyncio.get_running_loop()
    texts = await asyncio.gather(*(loop.run_in_executor(None, mem_llm.generate, f"p{i}")
                                   for i in range(8)))
    assert texts == [f"[base] p{i} (max_tokens=64,temperature=0.0)" for i in range(8)]
    report = await loop.run_in_executor(None, lambda: mem_llm.learn(DATA, adapter="a"))
    assert report["adapter"] == "a"
    assert mem_llm.generate("inline").startswith("[base] inline")  # even on the loop's own thread


def test_blocking_api_from_many_threads(mem_llm):
    results: dict[int, str] = {}
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, mem_llm.generate(str(i))))
               for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(results[i].startswith(f"[base] {i} ") for i in range(6))


def test_async_api_from_several_event_loops(store_dir):
    api = AsyncOnlineLLM(engine_cls=FakeEngine, store=store_dir, max_tokens=5)

    async def teach_and_ask():
        report = await api.learn(DATA, adapter="a")
        text = await api.generate("q", adapter="a")
        batch = await api.generate_batch(["x", "y"], adapters=["a", None])
        pieces = [piece async for piece in api.stream("s")]
        return report, text, batch, "".join(pieces).strip()

    first = asyncio.run(teach_and_ask())
    second = asyncio.run(teach_and_ask())   # a second loop: nothing bound to the first one
    assert first[1].startswith(f"[a@{first[0]['revision']}] q")
    assert second[0]["parent"] == first[0]["revision"]
    assert second[2][1] == "[base] y (max_tokens=5,temperature=0.0)"
    assert second[3] == "[base] s (max_tokens=5,temperature=0.0)"
    assert api.list_adapters() == ["a"] and api.save_lora_to_disk("a") is True
    api.close()
