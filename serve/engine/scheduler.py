"""The engine's one background thread: iteration-level (continuous) batching of generation requests,
interleaved with learn steps and with small calls that must run where the model lives.

Each iteration: run queued calls; admit waiting requests into the running batch (up to
max_batch_size, each needs a device slot; a short window gathers the first batch); prefill them;
one decode step for every row; then one step of the active learn job, if any. Requests that arrive
while a batch runs join at the next iteration. Knows nothing about stores or data formats.
"""
from __future__ import annotations

import collections
import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

import torch

from serve.engine.adapters import HostAdapter
from serve.engine.batch import DecodeBatch
from serve.engine.errors import EngineStoppedError, InvalidRequestError
from serve.engine.sampling import SamplingParams, TextTracker, sample_rows
from serve.engine.slots import SlotTable
from serve.engine.types import GenerationResult

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class Request:
    """One generation request as the scheduler runs it."""

    prompt_ids: list[int]
    adapter: HostAdapter | None            # None: the base model
    params: SamplingParams
    tracker: TextTracker
    future: Future = field(default_factory=Future)
    on_delta: Callable[[str], None] | None = None
    generator: torch.Generator | None = None
    slot: int = 0
    finish_reason: str | None = None
    error: Exception | None = None
    eos_hit: bool = False
    aborted: bool = False                  # the caller left (stream closed, future cancelled): stop early


class Scheduler:
    def __init__(self, batch: DecodeBatch, slots: SlotTable, *, eos_ids: frozenset[int],
                 max_batch_size: int, batch_window_ms: float):
        self.batch, self.slots, self.eos_ids = batch, slots, eos_ids
        self.max_batch_size, self.window_s = max_batch_size, batch_window_ms / 1000.0
        self.rows: list[Request] = []           # row order == self.batch row order
        self.pending: list[int] = []            # next token to feed, per row
        self._waiting: collections.deque[Request] = collections.deque()
        self._calls: collections.deque[tuple[Callable, Future]] = collections.deque()
        self._learn_jobs: collections.deque = collections.deque()
        self._wake = threading.Condition()
        self._stopped = False
        self.steps = self.tokens_out = self.learn_steps = 0
        self._thread = threading.Thread(target=self._run, name="engine-scheduler", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ submission (any thread)
    def submit(self, request: Request) -> Future:
        self._enqueue(lambda: self._waiting.append(request))
        return request.future

    def call(self, fn: Callable) -> Future:
        """Run fn() on the scheduler thread between iterations; returns its future."""
        future: Future = Future()
        self._enqueue(lambda: self._calls.append((fn, future)))
        return future

    def add_learn_job(self, job) -> Future:
        """job.step() -> bool (True when finished); job.future resolves when it is done."""
        self._enqueue(lambda: self._learn_jobs.append(job))
        return job.future

    def _enqueue(self, put: Callable) -> None:
        with self._wake:
            if self._stopped or not self._thread.is_alive():
                raise EngineStoppedError("the engine is shut down")
            put()
            self._wake.notify()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stopped

    def stop(self) -> None:
        with self._wake:
            self._stopped = True
            self._wake.notify()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=30)

    # ------------------------------------------------------------------ the loop (scheduler thread)
    def _run(self) -> None:
        try:
            while self._wait_for_work():
                self._run_calls()
                self._admit()
                if self.rows:
                    self._decode_step()
                if self._learn_jobs:
                    self._learn_step()
        except BaseException as exc:  # noqa: BLE001 - every waiter must hear about the failure
            logger.exception("scheduler thread died")
            self._fail_all(exc)
            raise
        self._fail_all(EngineStoppedError("the engine is shut down"))

    def _wait_for_work(self) -> bool:
        with self._wake:
            while not self._stopped and not (self.rows or self._waiting or self._calls or self._learn_jobs):
                self._wake.wait()
            if self._stopped:
                return False
            first_batch = not self.rows and self._waiting and len(self._waiting) < self.max_batch_size
        if first_batch and self.window_s > 0:
            time.sleep(self.window_s)  # let requests sent together start together
        return True

    def _run_calls(self) -> None:
        while True:
            with self._wake:
                if not self._calls:
                    return
                fn, future = self._calls.popleft()
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except Exception as exc:  # noqa: BLE001 - handed to the caller
                    future.set_exception(exc)

    def _admit(self) -> None:
        admitted: list[Request] = []
        while len(self.rows) + len(admitted) < self.max_batch_size:
            with self._wake:
                if not self._waiting:
                    break
                request = self._waiting[0]
                if request.aborted:  # its caller left before it started
                    self._waiting.popleft()
                    request.future.cancel()
                    continue
                slot = self.slots.acquire(request.adapter) if request.adapter is not None else 0
                if slot is None:
                    break  # every slot is busy with running rows; it waits for one to finish
                self._waiting.popleft()
            if request.future.set_running_or_notify_cancel():
                request.slot = slot
                admitted.append(request)
            else:
                self.slots.release(slot)
        if admitted:
            self._prefill(admitted)

    def _prefill(self, requests: list[Request]) -> None:
        try:
            logits = self.batch.prefill([r.prompt_ids for r in requests], [r.slot for r in requests],
                                        [self.slots.rank_of(r.slot) for r in requests])
        except Exception as exc:  # noqa: BLE001 - a failed prefill fails only its requests
            logger.exception("prefill failed")
            for request in requests:
                self.slots.release(request.slot)
                request.future.set_exception(exc)
            return
        self.rows.extend(requests)
        self.pending.extend([0] * len(requests))
        first = len(self.rows) - len(requests)
        self._take_tokens(logits, range(first, len(self.rows)))

    def _decode_step(self) -> None:
        try:
            logits = self.batch.decode(self.pending)
        except Exception as exc:  # noqa: BLE001 - e.g. out of memory: fail these rows, keep serving
            logger.exception("decode step failed; failing the %d running requests", len(self.rows))
            for request in self.rows:
                request.error, request.finish_reason = exc, "error"
            self._retire(list(range(len(self.rows))))
            return
        self.steps += 1
        self._take_tokens(logits, range(len(self.rows)))

    def _take_tokens(self, logits: torch.Tensor, row_ids: range) -> None:
        """Sample one token for each of these rows (logits [len(row_ids), V]), stream it, and retire
        finished rows. Each row is sampled on its own: one bad row fails only its request."""
        finite = torch.isfinite(logits).all(dim=-1).tolist()  # one device sync for the whole batch
        for offset, row in enumerate(row_ids):
            request = self.rows[row]
            if request.aborted:
                request.finish_reason = "abort"  # nobody reads the rest: free the row and its slot
                continue
            try:
                token = self._sample(logits[offset:offset + 1], request, finite[offset])
                self.pending[row] = token
                self.tokens_out += 1
                self._advance(request, token)
            except Exception as exc:  # noqa: BLE001 - one bad request must not stop the batch
                logger.warning("request failed while decoding: %s", exc)
                request.error, request.finish_reason = exc, "error"
        finished = [i for i, r in enumerate(self.rows) if r.finish_reason is not None]
        if finished:
            self._retire(finished)

    @staticmethod
    def _sample(row_logits: torch.Tensor, request: Request, finite: bool) -> int:
        """One token from this row's logits [1, V]; InvalidRequestError when they are not usable."""
        if not finite:
            raise InvalidRequestError("the model produced NaN/Inf logits for this request (its adapter "
                                      f"{request.adapter.key if request.adapter else 'base'} overflows)")
        try:
            return sample_rows(row_logits, [request.params], [request.generator])[0]
        except RuntimeError as exc:  # e.g. probabilities overflowing to inf after temperature scaling
            raise InvalidRequestError(f"sampling failed for this request: {exc}") from exc

    def _advance(self, request: Request, token: int) -> None:
        if token in self.eos_ids and not request.params.ignore_eos:
            request.finish_reason, request.eos_hit = "stop", True
            return
        delta = request.tracker.add(token)
        if delta and request.on_delta is not None:
            request.on_delta(delta)
        if request.tracker.stopped:
            request.finish_reason = "stop"
        elif len(request.tracker.token_ids) >= request.params.max_tokens:
            request.finish_reason = "length"

    def _retire(self, finished: list[int]) -> None:
        done = set(finished)
        keep = [i for i in range(len(self.rows)) if i not in done]
        leaving = [self.rows[i] for i in finished]
        self.rows = [self.rows[i] for i in keep]
        self.pending = [self.pending[i] for i in keep]
        self.batch.keep(keep)
        for request in leaving:  # futures last: a caller woken by one sees the batch without it
            self._complete(request)

    def _complete(self, request: Request) -> None:
        self.slots.release(request.slot)
        if request.error is not None:
            request.future.set_exception(request.error)
            return
        tail = request.tracker.flush()
        if tail and request.on_delta is not None:
            try:
                request.on_delta(tail)
            except Exception:  # noqa: BLE001 - a gone stream consumer must not stop the batch
                logger.warning("stream consumer of a finished request is gone", exc_info=True)
        tracker = request.tracker
        request.future.set_result(GenerationResult(
            text=tracker.text, finish_reason=request.finish_reason, prompt_tokens=len(request.prompt_ids),
            completion_tokens=len(tracker.token_ids) + request.eos_hit,
            adapter=request.adapter.key if request.adapter is not None else None,
            token_ids=list(tracker.token_ids)))

    def _learn_step(self) -> None:
        job = self._learn_jobs[0]
        try:
            finished = job.step()
            self.learn_steps += 1
        except Exception as exc:  # noqa: BLE001 - the learn caller gets it
            logger.exception("learn step failed")
            finished = True
            job.future.set_exception(exc)
        if finished:
            self._learn_jobs.popleft()

    def _fail_all(self, exc: BaseException) -> None:
        error = exc if isinstance(exc, Exception) else EngineStoppedError(str(exc))
        with self._wake:
            self._stopped = True
            pending = list(self._waiting) + self.rows
            calls = [f for _, f in self._calls]
            jobs = [j.future for j in self._learn_jobs]
            self._waiting.clear(), self._calls.clear(), self._learn_jobs.clear()
        for future in [r.future for r in pending] + calls + jobs:
            if not future.done():
                future.set_exception(error)
