"""The AdapterStore contract, run unchanged on memory://, a local directory and S3 (moto on loopback)."""
from __future__ import annotations

import threading
import uuid

import fsspec
import pytest
import torch

from adapters_store import (
    AdapterNotFoundError, CommitConflictError, CorruptAdapterError, RevisionNotFoundError, open_store,
    parse_ref,
)
from adapters_store.names import revision_seq
from adapters_store.testing import lora_config, random_lora
from adapters_store.validate import MODEL_FILE, sha256_hex


@pytest.fixture(params=["memory", "local", "s3"])
def store(request, tmp_path):
    if request.param == "memory":
        url = f"memory://contract-{uuid.uuid4().hex[:8]}"
        request.addfinalizer(lambda: fsspec.filesystem("memory").rm(url[len("memory://"):],
                                                                    recursive=True))
    elif request.param == "local":
        url = str(tmp_path / "store")
    else:
        url = request.getfixturevalue("s3_store_url")
    return open_store(url)


def commit_chain(store, name: str, count: int) -> list[str]:
    revisions, parent = [], None
    for index in range(count):
        parent = store.commit(name, random_lora(seed=index), config=lora_config(), parent=parent)
        revisions.append(parent)
    return revisions


def test_commit_then_read_returns_the_same_tensors_config_and_meta(store):
    tensors = random_lora(seed=7)
    revision = store.commit("alpha", tensors, config=lora_config(rank=4, alpha=16.0), parent=None,
                            meta={"model_path": "toy", "train_loss": 0.5})
    assert revision.startswith("000001-") and store.latest("alpha") == revision
    loaded = store.read("alpha")
    assert loaded.revision == revision and loaded.name == "alpha"
    assert set(loaded.tensors) == set(tensors)
    for key, tensor in tensors.items():
        assert torch.equal(loaded.tensors[key], tensor)
    assert (loaded.rank, loaded.alpha, loaded.target_modules) == (4, 16.0, ["q_proj", "v_proj"])
    assert loaded.config["peft_type"] == "LORA" and loaded.config["task_type"] == "CAUSAL_LM"
    meta = loaded.meta
    assert meta["adapter_name"] == "alpha" and meta["parent"] is None and meta["lora_rank"] == 4
    assert meta["train_loss"] == 0.5 and meta["model_path"] == "toy" and meta["saved_at"] > 0
    assert set(meta["files"]) == {MODEL_FILE, "adapter_config.json"}
    assert loaded.optimizer_state is None


def test_bf16_tensors_are_saved_as_given(store):
    tensors = random_lora(seed=1, dtype=torch.bfloat16)
    store.commit("half", tensors, config=lora_config(), parent=None)
    loaded = store.read("half").tensors
    assert all(t.dtype == torch.bfloat16 for t in loaded.values())
    assert all(torch.equal(loaded[k], tensors[k]) for k in tensors)


def test_revisions_are_ordered_and_addressable_by_id_or_sequence(store):
    revisions = commit_chain(store, "chain", 3)
    assert [revision_seq(r) for r in revisions] == [1, 2, 3]
    assert store.list_revisions("chain") == revisions
    assert store.latest("chain") == revisions[-1]
    assert store.read("chain", revisions[0]).meta["parent"] is None
    assert store.read("chain", "2").revision == revisions[1]
    assert store.read("chain", "2").meta["parent"] == revisions[0]
    name, rev = parse_ref(f"chain@{revisions[1]}")
    assert torch.equal(store.read(name, rev).tensors[next(iter(random_lora(seed=1)))],
                       next(iter(random_lora(seed=1).values())))


def test_list_adapters_is_sorted_and_only_committed(store):
    for name in ("zeta", "alpha", "mid.v2"):
        store.commit(name, random_lora(), config=lora_config(), parent=None)
    store.backend.write_bytes("orphan/000001-deadbeef/adapter_model.safetensors", b"x")
    assert store.list_adapters() == ["alpha", "mid.v2", "zeta"]


def test_stale_parent_is_refused_and_writes_nothing(store):
    first, second = commit_chain(store, "stale", 2)
    with pytest.raises(CommitConflictError, match="not the latest"):
        store.commit("stale", random_lora(seed=9), config=lora_config(), parent=first)
    with pytest.raises(CommitConflictError):
        store.commit("stale", random_lora(seed=9), config=lora_config(), parent=None)
    assert store.list_revisions("stale") == [first, second] and store.latest("stale") == second
    entries = [e for e in store.backend.list_dir("stale") if e[0].isdigit()]
    assert sorted(entries) == [first, second]


def test_racing_writers_on_one_parent_exactly_one_wins(store):
    (parent,) = commit_chain(store, "race", 1)
    barrier, claim = threading.Barrier(2, timeout=30), store.log.claim

    def claim_together(name, revision):  # both writers passed the parent check before claiming
        barrier.wait()
        return claim(name, revision)

    store.log.claim = claim_together
    outcomes = []

    def writer(seed):
        try:
            outcomes.append(store.commit("race", random_lora(seed=seed), config=lora_config(),
                                         parent=parent))
        except CommitConflictError as exc:
            outcomes.append(exc)

    threads = [threading.Thread(target=writer, args=(seed,)) for seed in (1, 2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    winners = [o for o in outcomes if isinstance(o, str)]
    assert len(winners) == 1 and sum(isinstance(o, CommitConflictError) for o in outcomes) == 1
    assert store.latest("race") == winners[0] and store.list_revisions("race") == [parent, winners[0]]
    assert sorted(e for e in store.backend.list_dir("race") if e[0].isdigit()) == [parent, winners[0]]
    store.read("race")


def test_optimizer_state_roundtrip(store):
    optimizer = {"exp_avg.0": torch.randn(4, 16), "step": torch.tensor(12, dtype=torch.int64)}
    store.commit("opt", random_lora(), config=lora_config(), parent=None, optimizer_state=optimizer)
    assert store.read("opt").optimizer_state is None
    loaded = store.read("opt", with_optimizer=True).optimizer_state
    assert torch.equal(loaded["exp_avg.0"], optimizer["exp_avg.0"]) and int(loaded["step"]) == 12


def test_info_reports_latest_revisions_meta_and_size(store):
    revisions = commit_chain(store, "inf", 2)
    info = store.info("inf")
    assert info["name"] == "inf" and info["latest"] == revisions[-1]
    assert info["revisions"] == revisions and info["meta"]["revision"] == revisions[-1]
    model_bytes = store.backend.read_bytes(f"inf/{revisions[0]}/{MODEL_FILE}")
    assert info["size_bytes"] > 2 * len(model_bytes)
    assert revisions[-1] in info["path"]
    with pytest.raises(AdapterNotFoundError):
        store.info("nobody")


def test_delete_removes_every_revision(store):
    commit_chain(store, "gone", 2)
    assert store.delete("gone") is True
    assert store.delete("gone") is False
    assert store.list_adapters() == [] and store.latest("gone") is None
    with pytest.raises(AdapterNotFoundError):
        store.read("gone")
    assert store.commit("gone", random_lora(), config=lora_config(), parent=None).startswith("000001-")


def test_prune_keeps_the_newest_and_the_chain_goes_on(store):
    revisions = commit_chain(store, "pr", 4)
    assert store.prune("pr", keep=2) == revisions[:2]
    assert store.list_revisions("pr") == revisions[2:]
    with pytest.raises(RevisionNotFoundError):
        store.read("pr", revisions[0])
    assert store.read("pr").revision == revisions[-1]
    following = store.commit("pr", random_lora(), config=lora_config(), parent=revisions[-1])
    assert revision_seq(following) == 5 and store.prune("pr") == []
    with pytest.raises(ValueError):
        store.prune("pr", keep=0)
    with pytest.raises(AdapterNotFoundError):
        store.prune("nobody")


def test_verify_flags_a_bit_flip_and_reads_refuse_it(store):
    good, bad = commit_chain(store, "ver", 2)
    path = f"ver/{bad}/{MODEL_FILE}"
    data = bytearray(store.backend.read_bytes(path))
    data[-3] ^= 0x10
    store.backend.write_bytes(path, data)
    rows = store.verify()
    assert [(r["revision"], r["ok"]) for r in rows] == [(good, True), (bad, False)]
    assert rows[1]["file"] == MODEL_FILE and "sha256" in rows[1]["error"]
    with pytest.raises(CorruptAdapterError) as caught:
        store.read("ver")
    assert (caught.value.adapter, caught.value.revision, caught.value.file) == ("ver", bad, MODEL_FILE)
    assert store.read("ver", good).meta["files"][MODEL_FILE] == sha256_hex(
        store.backend.read_bytes(f"ver/{good}/{MODEL_FILE}"))


def test_unknown_adapter_and_revision(store):
    commit_chain(store, "known", 1)
    with pytest.raises(AdapterNotFoundError):
        store.read("unknown")
    with pytest.raises(RevisionNotFoundError):
        store.read("known", "7")
    with pytest.raises(RevisionNotFoundError):
        store.read("known", "000001-00000000")
    assert store.latest("unknown") is None and store.list_revisions("unknown") == []


def test_gc_keeps_committed_and_removes_unclaimed(store):
    (committed,) = commit_chain(store, "gcx", 1)
    orphan = "000002-0badf00d"
    store.backend.write_bytes(f"gcx/{orphan}/{MODEL_FILE}", b"partial")
    assert store.gc(grace_s=3600) == []  # a writer may still be working on it
    assert store.gc(grace_s=0) == [f"gcx/{orphan}"]
    assert store.list_revisions("gcx") == [committed] and store.read("gcx").revision == committed
    assert store.gc(grace_s=0) == []


def test_gc_spares_a_fresh_empty_revision_directory(tmp_path):
    store = open_store(str(tmp_path / "store"))
    commit_chain(store, "fresh", 1)
    (tmp_path / "store" / "fresh" / "000002-12345678").mkdir()  # a writer that just started
    assert store.gc(grace_s=3600) == []
    assert store.gc(grace_s=0) == ["fresh/000002-12345678"]
