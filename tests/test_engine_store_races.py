"""Learning when another writer shares the store: a learn from a fresh adapter never takes a revision
its weights did not see as parent; a learn starts from the store's latest revision, not from this
engine's cached one; a conflicting commit makes the bare name re-read the store; an rsLoRA adapter
keeps its alpha / sqrt(r) scale in the revisions a learn commits."""
from __future__ import annotations

import uuid

import pytest
import torch

from adapters_store import open_store
from adapters_store.errors import CommitConflictError
from serve.engine import Engine
from serve.engine.validate import fresh_weights, to_peft

pytestmark = pytest.mark.timeout(120)
DATA = [{"prompt": "Q: colour?", "response": "A: blue"}]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class HookedStore:
    """A real store; `before_commit` (set by a test) runs once just before the engine's next commit,
    as another process committing while this engine finishes a learn."""

    def __init__(self, store):
        self.inner, self.before_commit = store, None

    def commit(self, *args, **kwargs):
        hook, self.before_commit = self.before_commit, None
        if hook is not None:
            hook()
        return self.inner.commit(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.inner, name)


@pytest.fixture(scope="module")
def shared(tiny_model_path):
    """(engine, hooked store, the raw store another writer uses)."""
    raw = open_store(f"memory://races-{uuid.uuid4().hex}")
    hooked = HookedStore(raw)
    eng = Engine(model=tiny_model_path, cpu_threads=1, store=hooked, batch_window_ms=0)
    yield eng, hooked, raw
    eng.shutdown()


def _while_training(engine: Engine, monkeypatch, hook) -> None:
    """Run `hook` once when the engine's next learn job starts training (after it chose where to
    start from, before it commits)."""
    add_job = engine.scheduler.add_learn_job

    def add_learn_job(job):
        monkeypatch.setattr(engine.scheduler, "add_learn_job", add_job)
        hook()
        return add_job(job)
    monkeypatch.setattr(engine.scheduler, "add_learn_job", add_learn_job)


def _other_writer_commits(engine: Engine, raw, name: str, fill: float = 0.01) -> str:
    """Commit a revision of `name` on the store's latest, as another process would."""
    shapes = {p: (m.in_features, m.out_features) for p, m in engine.modules.items()}
    weights = {p: (a, torch.full_like(b, fill)) for p, (a, b) in fresh_weights(shapes, 4, seed=7).items()}
    config = {"r": 4, "lora_alpha": 8.0, "target_modules": TARGETS, "base_model_name_or_path": "tiny"}
    return raw.commit(name, to_peft(weights), config=config, parent=raw.latest(name))


def test_fresh_learn_conflicts_instead_of_dropping_a_concurrent_commit(shared, monkeypatch):
    engine, _hooked, raw = shared
    other = []
    _while_training(engine, monkeypatch, lambda: other.append(_other_writer_commits(engine, raw, "fresh")))
    with pytest.raises(CommitConflictError):
        engine.submit_learn(DATA, "fresh", steps=1).result(timeout=60)
    assert raw.list_revisions("fresh") == other              # the other writer's update is kept
    report = engine.submit_learn(DATA, "fresh", steps=1).result(timeout=60)
    assert report.parent == other[0]                         # retried on top of it


def test_learn_starts_from_the_stores_latest_revision(shared):
    engine, _hooked, raw = shared
    first = engine.submit_learn(DATA, "moved", steps=1).result(timeout=60)
    theirs = _other_writer_commits(engine, raw, "moved")
    assert engine.resolve("moved") == f"moved@{first.revision}"   # bare names stay cheap (cached)
    report = engine.submit_learn(DATA, "moved", steps=1).result(timeout=60)
    assert report.parent == theirs and raw.read_meta("moved", report.revision)["parent"] == theirs
    assert engine.submit_generate("hi", "moved", max_tokens=1).result(timeout=60).adapter \
        == f"moved@{report.revision}"


def test_commit_conflict_makes_the_bare_name_reread_the_store(shared):
    engine, hooked, raw = shared
    engine.submit_learn(DATA, "stale", steps=1).result(timeout=60)
    other = []
    hooked.before_commit = lambda: other.append(_other_writer_commits(engine, raw, "stale"))
    with pytest.raises(CommitConflictError):
        engine.submit_learn(DATA, "stale", steps=1).result(timeout=60)
    assert engine.resolve("stale") == f"stale@{other[0]}"
    assert engine.submit_generate("hi", "stale", max_tokens=1).result(timeout=60).adapter \
        == f"stale@{other[0]}"


def test_rslora_scale_survives_a_learn(shared, tiny_model_path):
    engine, _hooked, raw = shared
    shapes = {p: (m.in_features, m.out_features) for p, m in engine.modules.items()}
    weights = {p: (a, torch.randn(b.shape, generator=torch.Generator().manual_seed(3)) * 0.05)
               for p, (a, b) in fresh_weights(shapes, 16, seed=1).items()}
    config = {"r": 16, "lora_alpha": 32, "use_rslora": True, "target_modules": TARGETS,
              "base_model_name_or_path": engine.model_id}
    raw.commit("rs", to_peft(weights), config=config, parent=None)
    report = engine.submit_learn(DATA, "rs", steps=1).result(timeout=60)
    key = f"rs@{report.revision}"
    assert raw.read("rs", report.revision).config["use_rslora"] is True
    assert engine.adapters.get(key).scale == pytest.approx(32 / 16 ** 0.5)
    reader = Engine(model=tiny_model_path, cpu_threads=1, store=open_store(raw.url), batch_window_ms=0)
    try:
        assert reader.adapters.load_sync(key).scale == pytest.approx(32 / 16 ** 0.5)
        ours, theirs = engine.prompt_logits(["hello world"], [key])[0], reader.prompt_logits(
            ["hello world"], [key])[0]
        assert torch.allclose(ours, theirs, atol=1e-5)
    finally:
        reader.shutdown()


def test_optimizer_state_is_read_for_learning_not_kept_for_serving(shared, tiny_model_path):
    engine, _hooked, raw = shared
    first = engine.submit_learn(DATA, "opt", steps=1).result(timeout=60)
    second = engine.submit_learn(DATA, "opt", steps=1).result(timeout=60)
    assert engine.adapters.get(f"opt@{second.revision}").optimizer_state is not None
    old = engine.adapters.get(f"opt@{first.revision}")
    assert old is None or old.optimizer_state is None      # superseded: no optimizer state held
    reader = Engine(model=tiny_model_path, cpu_threads=1, store=open_store(raw.url), batch_window_ms=0)
    try:
        served = reader.submit_generate("hi", "opt", max_tokens=1).result(timeout=60).adapter
        host = reader.adapters.get(served)
        assert host.optimizer_state is None                 # loaded to serve only
        stored = raw.read("opt", second.revision, with_optimizer=True).optimizer_state
        resumed = reader.adapters.optimizer_state_of(host)  # what a learn from it starts with
        assert resumed.keys() == stored.keys()
        assert all(torch.equal(resumed[k], stored[k]) for k in stored)
        assert reader.submit_learn(DATA, "opt", steps=1).result(timeout=60).parent == second.revision
    finally:
        reader.shutdown()
