"""Bad input of issue 2: names, damaged safetensors, huge headers, NaN/Inf, bad ranks, stray tensors.

Each case must raise a typed error that names what is wrong, and leave the store as it was.
"""
from __future__ import annotations

import json
import struct
import tracemalloc

import pytest
import torch

from adapters_store import (
    CorruptAdapterError, InvalidAdapterError, InvalidAdapterNameError, open_store, parse_ref,
)
from adapters_store.interop import import_peft_dir
from adapters_store.names import validate_name
from adapters_store.safetensors_io import encode
from adapters_store.testing import lora_config, lora_key, random_lora
from adapters_store.validate import MODEL_FILE, sha256_hex

BAD_NAMES = ["..", "../x", "/etc/passwd", "a/b", "", "x" * 200, "a\x00b", "\u0430dapter",
             "ad\uff41pter", ".", ".hidden", "a b", "a@b", "-lead", "a\\b", "x" * 129]


@pytest.fixture
def store(tmp_path):
    return open_store(str(tmp_path / "store"), max_rank=64)


def store_entries(store) -> list[str]:
    return store.backend.list_dir("")


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_names_are_refused_everywhere(store, name):
    with pytest.raises(InvalidAdapterNameError):
        validate_name(name)
    with pytest.raises(InvalidAdapterNameError):
        store.commit(name, random_lora(), config=lora_config(), parent=None)
    for operation in (store.latest, store.read, store.delete, store.list_revisions):
        with pytest.raises(InvalidAdapterNameError):
            operation(name)
    assert store_entries(store) == []


def test_good_names_and_references():
    for name in ("a", "A-1", "my_expert.v2", "x" * 128, "0"):
        assert validate_name(name) == name
    assert parse_ref("exp") == ("exp", None)
    assert parse_ref("exp@3") == ("exp", "3")
    assert parse_ref("exp@000003-1f2e3d4c") == ("exp", "000003-1f2e3d4c")
    for ref in ("exp@", "exp@0", "exp@x", "exp@000003-XYZ", "../exp@1", "exp@1@2"):
        with pytest.raises(InvalidAdapterNameError):
            parse_ref(ref)


def committed_model_file(store):
    revision = store.commit("victim", random_lora(), config=lora_config(), parent=None)
    return revision, f"victim/{revision}/{MODEL_FILE}"


def rewrite(store, path: str, data: bytes, *, fix_checksum: bool) -> None:
    """Replace a stored file; optionally also its manifest entry, to reach the format checks."""
    store.backend.write_bytes(path, data)
    if fix_checksum:
        meta_path = path.rsplit("/", 1)[0] + "/meta.json"
        meta = json.loads(bytes(store.backend.read_bytes(meta_path)))
        meta["files"][MODEL_FILE] = sha256_hex(data)
        store.backend.write_bytes(meta_path, json.dumps(meta).encode())


@pytest.mark.parametrize("damage, fix_checksum, message", [
    ("truncate", False, "sha256 mismatch"),
    ("truncate", True, "truncated"),
    ("bitflip", False, "sha256 mismatch"),
    ("empty", False, "sha256 mismatch"),
    ("empty", True, "too short"),
    ("header_garbage", True, "not valid JSON"),
])
def test_damaged_safetensors_are_reported_with_adapter_revision_and_file(store, damage, fix_checksum,
                                                                          message):
    revision, path = committed_model_file(store)
    data = bytearray(store.backend.read_bytes(path))
    if damage == "truncate":
        data = data[: len(data) - 40]
    elif damage == "bitflip":
        data[len(data) // 2] ^= 0x01
    elif damage == "empty":
        data = bytearray()
    else:
        data[9:13] = b"\xff\xfe{{"
    rewrite(store, path, bytes(data), fix_checksum=fix_checksum)
    with pytest.raises(CorruptAdapterError, match=message) as caught:
        store.read("victim")
    error = caught.value
    assert (error.adapter, error.revision, error.file) == ("victim", revision, MODEL_FILE)
    assert "victim" in str(error) and revision in str(error) and MODEL_FILE in str(error)


def test_header_claiming_gigabytes_is_refused_without_allocating(store):
    revision, path = committed_model_file(store)
    data = struct.pack("<Q", 8 * 2**30) + b"{}" + b" " * 6
    rewrite(store, path, data, fix_checksum=True)
    tracemalloc.start()
    try:
        with pytest.raises(CorruptAdapterError, match="header claims 8589934592 bytes"):
            store.read("victim")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 * 2**20


def test_tensor_larger_than_the_file_is_refused(store):
    revision, path = committed_model_file(store)
    header = json.dumps({lora_key("m.q_proj", "A"): {"dtype": "F32", "shape": [2**20, 2**20],
                                                     "data_offsets": [0, 4 * 2**40]}}).encode()
    rewrite(store, path, struct.pack("<Q", len(header)) + header + b"\0" * 64, fix_checksum=True)
    with pytest.raises(CorruptAdapterError, match="truncated"):
        store.read("victim")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_values_are_refused_on_commit_and_on_read(store, tmp_path, value):
    tensors = random_lora()
    tensors[lora_key("model.layers.1.self_attn.v_proj", "B")][3, 1] = value
    with pytest.raises(InvalidAdapterError, match="NaN or Inf"):
        store.commit("nan", tensors, config=lora_config(), parent=None)
    assert store_entries(store) == []
    peft_dir = tmp_path / "peft"
    peft_dir.mkdir()
    (peft_dir / MODEL_FILE).write_bytes(encode(tensors))
    (peft_dir / "adapter_config.json").write_text(json.dumps({**lora_config(), "peft_type": "LORA"}))
    with pytest.raises(InvalidAdapterError, match="v_proj.lora_B.weight.*NaN or Inf"):
        import_peft_dir(store, str(peft_dir), "nan")
    assert store_entries(store) == []


@pytest.mark.parametrize("rank", [0, -1, 65, 10_000, True, 2.0, "4", None])
def test_bad_ranks_are_refused(store, rank):
    with pytest.raises(InvalidAdapterError, match="rank") as caught:
        store.commit("rk", random_lora(), config={**lora_config(), "r": rank}, parent=None)
    assert caught.value.file == "adapter_config.json"
    assert store_entries(store) == []


def test_rank_above_the_store_maximum_is_refused_even_if_tensors_fit(store):
    modules = {"model.layers.0.self_attn.q_proj": (128, 128)}
    tensors = random_lora(modules, rank=96)
    with pytest.raises(InvalidAdapterError, match="outside 1..64"):
        store.commit("big", tensors, config=lora_config(rank=96, targets=["q_proj"]), parent=None)


@pytest.mark.parametrize("mutate, message", [
    (lambda t: t.update({lora_key("model.layers.0.mlp.gate_proj", "A"): torch.zeros(4, 16),
                         lora_key("model.layers.0.mlp.gate_proj", "B"): torch.zeros(16, 4)}),
     "matches no target module"),
    (lambda t: t.update({"model.layers.0.self_attn.q_proj.weight": torch.zeros(16, 16)}),
     "not a PEFT LoRA key"),
    (lambda t: t.pop(lora_key("model.layers.0.self_attn.q_proj", "B")), "has no lora_B"),
    (lambda t: t.update({lora_key("model.layers.0.self_attn.q_proj", "A"): torch.zeros(5, 16)}),
     "do not fit rank 4"),
    (lambda t: t.update({lora_key("model.layers.0.self_attn.q_proj", "B"): torch.zeros(16, 4, 1)}),
     "expected 2-D"),
    (lambda t: t.update({lora_key("model.layers.0.self_attn.q_proj", "A"):
                         torch.zeros(4, 16, dtype=torch.int32)}), "expected a float"),
    (lambda t: t.clear(), "no tensors"),
])
def test_tensors_that_do_not_fit_the_config_are_refused(store, mutate, message):
    tensors = random_lora()
    mutate(tensors)
    with pytest.raises(InvalidAdapterError, match=message) as caught:
        store.commit("fit", tensors, config=lora_config(), parent=None)
    assert caught.value.adapter == "fit" and caught.value.file == MODEL_FILE
    assert store_entries(store) == []


@pytest.mark.parametrize("config_change, message", [
    ({"peft_type": "PREFIX_TUNING"}, "not LORA"),
    ({"target_modules": []}, "target_modules"),
    ({"target_modules": "q_proj|v_proj"}, "target_modules"),
    ({"target_modules": ["../q"]}, "target_modules"),
    ({"lora_alpha": float("nan")}, "lora_alpha"),
    ({"lora_alpha": 0}, "lora_alpha"),
])
def test_bad_configs_are_refused(store, config_change, message):
    with pytest.raises(InvalidAdapterError, match=message):
        store.commit("cfg", random_lora(), config={**lora_config(), **config_change}, parent=None)
    assert store_entries(store) == []


def test_a_failed_commit_leaves_the_previous_revision(store):
    revision = store.commit("keep", random_lora(), config=lora_config(), parent=None)
    with pytest.raises(InvalidAdapterError):
        store.commit("keep", random_lora(), config={**lora_config(), "r": 0}, parent=revision)
    assert store.list_revisions("keep") == [revision] and store.read("keep").revision == revision


@pytest.mark.parametrize("optimizer, message", [
    ({"step": 3}, "not a named tensor"),
    ({"exp_avg": torch.tensor([1.0, float("nan")])}, "NaN or Inf"),
])
def test_bad_optimizer_state_is_refused(store, optimizer, message):
    with pytest.raises(InvalidAdapterError, match=message) as caught:
        store.commit("opt", random_lora(), config=lora_config(), parent=None,
                     optimizer_state=optimizer)
    assert caught.value.file == "optimizer.safetensors" and store_entries(store) == []
