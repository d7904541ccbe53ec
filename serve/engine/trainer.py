"""The engine's learn flow around a LearnJob: validate input and options, serialise learns per adapter,
pick the starting revision (parent, else the store's latest, else the resident one, else fresh), train
on the scheduler thread, refuse non-finite results, commit to the store with that parent (a commit
that conflicts makes the bare name re-read the store), install the new revision, report.

Knows the engine's parts (adapters, scheduler, store) but not how training steps are computed.
"""
from __future__ import annotations

import logging
import math
import threading
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from adapters_store.errors import CommitConflictError, StoreUnavailableError
from adapters_store.names import format_ref, parse_ref
from serve.engine.adapters import HostAdapter
from serve.engine.data import build_examples
from serve.engine.errors import InvalidRequestError
from serve.engine.learn import LearnJob, LearnResult
from serve.engine.types import LearnReport
from serve.engine.validate import to_peft

logger = logging.getLogger(__name__)
LEARN_OPTIONS = {"batch_size", "max_grad_norm", "weight_decay"}


class Trainer:
    def __init__(self, engine):
        self.engine = engine
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="engine-learn")
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()

    def submit(self, data, adapter: str, *, steps, lr, parent, **opts) -> Future:
        """Validate now (errors raise here, before any training); train and commit in the background."""
        name, rev = parse_ref(adapter)
        if rev is not None:
            raise InvalidRequestError("learn takes an adapter name; pass a revision as parent=")
        config = self.engine.config
        steps = config.learn_steps if steps is None else steps
        lr = config.learn_lr if lr is None else lr
        if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= 100_000:
            raise InvalidRequestError(f"steps must be an integer in 1..100000, got {steps!r}")
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (0 < lr <= 1.0) or math.isnan(lr):
            raise InvalidRequestError(f"lr must be in (0, 1], got {lr!r}")
        _check_options(opts)
        examples = build_examples(self.engine.tokenizer, data, eos_id=self._eos_id(),
                                  max_len=self.engine.loaded.max_len)
        return self._pool.submit(self._run, name, examples, steps, float(lr), parent, opts)

    def _eos_id(self) -> int:
        tokenizer = self.engine.tokenizer
        if tokenizer.eos_token_id is not None:
            return int(tokenizer.eos_token_id)
        return min(self.engine.loaded.eos_ids)

    def _lock(self, name: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(name, threading.Lock())

    def _run(self, name: str, examples, steps: int, lr: float, parent: str | None, opts: dict) -> LearnReport:
        with self._lock(name):  # one trainer per adapter: learns on a name run one after another
            start = self._starting_point(name, parent)
            result = self._train(start, examples, steps, lr, opts)
            key, committed = self._commit(name, start, result, lr)
        logger.info("learned %s in %d steps (loss %.3f -> %.3f)", key, result.steps, result.loss_before,
                    result.loss_after)
        return LearnReport(adapter=name, revision=key.partition("@")[2], parent=start.revision,
                           steps=result.steps, tokens=result.tokens, loss_before=result.loss_before,
                           loss_after=result.loss_after, duration_s=result.duration_s, committed=committed)

    def _starting_point(self, name: str, parent: str | None) -> HostAdapter:
        """The revision to train from: `parent`, else the store's latest (read now: another process
        may have committed since this engine cached it), else the resident one, else a fresh one."""
        adapters, store = self.engine.adapters, self.engine.store
        if parent is not None:
            key = adapters.resolve(format_ref(name, parent))
            return adapters.load_sync(key)
        if store is not None:
            try:
                latest = store.latest(name)
            except StoreUnavailableError as exc:
                raise StoreUnavailableError(f"learn on adapter {name!r} not started: the adapter store is "
                                            f"unavailable, nothing was trained or saved ({exc})") from exc
            if latest is not None:
                adapters.note_latest(name, latest)
                return adapters.load_sync(format_ref(name, latest))
            resident = adapters.latest_revision(name)  # memory-only (ensure()) or nothing
            key = format_ref(name, resident) if resident is not None else None
        else:
            key = adapters.resolve(name)
        return adapters.load_sync(key) if key is not None else adapters.fresh(name)

    def _train(self, start: HostAdapter, examples, steps: int, lr: float, opts: dict) -> LearnResult:
        config, loaded = self.engine.config, self.engine.loaded
        job = LearnJob(loaded.model, self.engine.lora_state, weights=start.weights, scale=start.scale,
                       optimizer_state=self.engine.adapters.optimizer_state_of(start), examples=examples, steps=steps, lr=lr,
                       batch_size=opts.get("batch_size", config.learn_batch_size),
                       max_grad_norm=opts.get("max_grad_norm", config.max_grad_norm),
                       weight_decay=opts.get("weight_decay", config.weight_decay),
                       pad_id=loaded.pad_id, device=loaded.device)
        return self.engine.scheduler.add_learn_job(job).result()

    def _commit(self, name: str, start: HostAdapter, result: LearnResult, lr: float) -> tuple[str, bool]:
        """Store commit (if any) with the starting revision as parent, then install; returns (key, stored)."""
        adapters, store = self.engine.adapters, self.engine.store
        revision = None
        _check_finite(name, result)  # nothing non-finite is ever committed or served
        if store is not None:
            revision = self._store_commit(name, start, result, lr)
        elif adapters.latest_revision(name) != start.revision:
            raise CommitConflictError(f"{name}: started from {start.revision}, but the latest is now "
                                      f"{adapters.latest_revision(name)}")
        installed = adapters.install_weights(
            name, result.weights, rank=start.rank, alpha=start.alpha, scale=start.scale,
            use_rslora=start.use_rslora, revision=revision, stored=store is not None,
            optimizer_state=result.optimizer_state,
            meta=self._meta(result, lr))
        return installed.key, store is not None

    def _store_commit(self, name: str, start: HostAdapter, result: LearnResult, lr: float) -> str:
        """Commit to the store; an unreachable store fails the learn saying exactly what was not saved."""
        store = self.engine.store
        try:
            # A memory-only starting point (ensure()'s fresh adapter) has no place in the store's chain:
            # it commits as the first revision, and conflicts if the store got one meanwhile (the
            # weights never saw it, so taking it as parent would silently drop that update).
            parent = start.revision if start.stored else None
            return store.commit(name, to_peft(result.weights), config=self._peft_config(start),
                                parent=parent, meta=self._meta(result, lr),
                                optimizer_state=result.optimizer_state)
        except CommitConflictError:
            self.engine.adapters.forget_latest(name)  # the next bare-name lookup re-reads the store
            raise
        except StoreUnavailableError as exc:
            raise StoreUnavailableError(
                f"learn on adapter {name!r} from revision {start.revision or 'none'} ({result.steps} steps, "
                f"loss {result.loss_before:.4f} -> {result.loss_after:.4f}) was not saved: the adapter store "
                f"is unavailable, so no revision was committed or installed and the trained weights were "
                f"discarded; retry the learn when the store is back ({exc})") from exc

    def _peft_config(self, start: HostAdapter) -> dict:
        targets = sorted({path.rsplit(".", 1)[-1] for path in self.engine.modules})
        return {"r": start.rank, "lora_alpha": start.alpha, "use_rslora": start.use_rslora,
                "target_modules": targets,
                "base_model_name_or_path": self.engine.model_id, "lora_dropout": 0.0, "bias": "none"}

    def _meta(self, result: LearnResult, lr: float) -> dict:
        return {"model_path": self.engine.model_id,
                "training": {"steps": result.steps, "tokens": result.tokens, "lr": lr,
                             "loss_before": result.loss_before, "loss_after": result.loss_after,
                             "duration_s": round(result.duration_s, 3)}}

    def forget(self, name: str) -> None:
        """Drop the per-adapter lock of a deleted adapter (unless a learn on it still runs)."""
        with self._locks_guard:
            lock = self._locks.get(name)
            if lock is not None and not lock.locked():
                del self._locks[name]

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)



def _check_options(opts: dict) -> None:
    """Learn options are checked before any training: bad values would fail later on a worker thread
    or, worse, train NaN weights."""
    unknown = set(opts) - LEARN_OPTIONS
    if unknown:
        raise InvalidRequestError(f"unknown learn options {sorted(unknown)}; known: {sorted(LEARN_OPTIONS)}")
    batch_size = opts.get("batch_size", 1)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or not 1 <= batch_size <= 4096:
        raise InvalidRequestError(f"batch_size must be an integer in 1..4096, got {batch_size!r}")
    norm = opts.get("max_grad_norm", 1.0)
    if isinstance(norm, bool) or not isinstance(norm, (int, float)) or not math.isfinite(norm) or norm <= 0:
        raise InvalidRequestError(f"max_grad_norm must be a finite number > 0, got {norm!r}")
    decay = opts.get("weight_decay", 0.0)
    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 <= decay <= 1.0:
        raise InvalidRequestError(f"weight_decay must be in [0, 1], got {decay!r}")


def _check_finite(name: str, result: LearnResult) -> None:
    """Refuse trained weights with NaN/Inf (a diverged run): neither committed nor installed."""
    for module, (a, b) in result.weights.items():
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise InvalidRequestError(
                f"learn on adapter {name!r} diverged (loss {result.loss_before:.4f} -> {result.loss_after}): "
                f"{module} has NaN/Inf weights; nothing was committed or installed (lower lr?)")
