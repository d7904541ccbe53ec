"""Engine: one frozen base model with LoRA device slots, a host-memory tier and an optional store,
serving mixed-adapter batched generation and online learning from one scheduler thread.

Thread-safe. Blocking callers use the `submit_*` methods (concurrent futures); the async methods wrap
the same futures, so they work from any event loop. Knows nothing about Ray or HTTP; the store is
injected (any object with the AdapterStore methods), None means memory only.
"""
from __future__ import annotations

import asyncio
import logging
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from typing import AsyncIterator

import torch

from adapters_store.errors import AdapterNotFoundError
from adapters_store.names import parse_ref
from serve.engine.adapters import AdapterManager, HostAdapter
from serve.engine.batch import DecodeBatch
from serve.engine.config import EngineConfig
from serve.engine.errors import EngineStoppedError, InvalidRequestError, PromptTooLongError
from serve.engine.lora import wrap_model
from serve.engine.model import load_model
from serve.engine.sampling import SamplingParams, TextTracker
from serve.engine.scheduler import Request, Scheduler
from serve.engine.slots import SlotTable
from serve.engine.trainer import Trainer
from serve.engine.types import GenerationResult, LearnReport
from serve.engine.validate import to_weights
from serve.tiny_model import TINY_MODEL_ID

logger = logging.getLogger(__name__)
_END = object()


def _chain(source: Future, target: Future) -> None:
    """Copy source's outcome into target when it finishes."""
    def copy(done: Future) -> None:
        if target.done():
            return
        if done.cancelled():
            target.cancel()
        elif done.exception() is not None:
            target.set_exception(done.exception())
        else:
            target.set_result(done.result())
    source.add_done_callback(copy)


class Engine:
    def __init__(self, config: EngineConfig | None = None, *, store=None, **overrides):
        base = config.model_dump() if config is not None else {}
        self.config = EngineConfig(**{**base, **overrides})
        self.store = store
        self.model_id = TINY_MODEL_ID if self.config.model in (TINY_MODEL_ID, "tiny", "") \
            else self.config.model
        self.loaded = load_model(self.config.model, self.config.device, self.config.max_model_len)
        if self.config.cpu_threads and self.loaded.device.type == "cpu":
            torch.set_num_threads(self.config.cpu_threads)
        self.tokenizer = self.loaded.tokenizer
        self.lora_state, self.modules = wrap_model(self.loaded.model, self.config.target_modules,
                                                   self.config.max_slots + 1, self.config.lora_rank)
        shapes = {path: (m.in_features, m.out_features) for path, m in self.modules.items()}
        self.adapters = AdapterManager(
            shapes, store=store, host_cache_size=self.config.host_cache_size,
            max_rank=self.config.max_lora_rank, default_rank=self.config.lora_rank,
            default_alpha=self.config.lora_alpha, model_path=self.model_id)
        self.slots = SlotTable(self.modules, self.config.max_slots, self.lora_state)
        batch = DecodeBatch(self.loaded.model, self.lora_state, self.loaded.device, self.loaded.pad_id)
        self.scheduler = Scheduler(batch, self.slots, eos_ids=self.loaded.eos_ids,
                                   max_batch_size=self.config.max_batch_size,
                                   batch_window_ms=self.config.batch_window_ms)
        self._prep_pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="engine-prep")
        self.trainer = Trainer(self)
        self._closed = False

    # ------------------------------------------------------------------ prompts and requests
    def encode_prompt(self, prompt) -> list[int]:
        """Token ids of a string prompt, or of a chat message list through the chat template."""
        if isinstance(prompt, str):
            ids = self.tokenizer(prompt)["input_ids"]
        elif isinstance(prompt, list) and prompt and all(isinstance(m, dict) for m in prompt):
            for message in prompt:
                if not isinstance(message.get("role"), str) or not isinstance(message.get("content"), str):
                    raise InvalidRequestError("chat messages need string 'role' and 'content'")
            text = self._chat_text(prompt)
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            raise InvalidRequestError("prompt must be a string or a non-empty list of chat messages")
        if not ids:
            raise InvalidRequestError("the prompt is empty")
        if len(ids) >= self.loaded.max_len:
            raise PromptTooLongError(f"prompt has {len(ids)} tokens; the model's context is "
                                     f"{self.loaded.max_len} (room for at least one new token needed)")
        return list(ids)

    def _chat_text(self, messages: list[dict]) -> str:
        if not getattr(self.tokenizer, "chat_template", None):
            raise InvalidRequestError("this model's tokenizer has no chat template; send a string prompt")
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def _sampling(self, sampling: dict) -> SamplingParams:
        defaults = {"temperature": self.config.temperature, "max_tokens": self.config.max_tokens}
        return SamplingParams.build(defaults, sampling)

    def _make_request(self, prompt, sampling: dict, on_delta) -> Request:
        ids = self.encode_prompt(prompt)
        params = self._sampling(sampling)
        room = self.loaded.max_len - len(ids)
        if params.max_tokens > room:
            params = params.model_copy(update={"max_tokens": room})
        generator = None
        if params.seed is not None:
            generator = torch.Generator().manual_seed(params.seed)
        return Request(prompt_ids=ids, adapter=None, params=params,
                       tracker=TextTracker(self.tokenizer, params.stop), on_delta=on_delta,
                       generator=generator)

    def _adapter_for(self, adapter: str | None) -> HostAdapter | None:
        """Blocking: the host copy to serve for a reference; None = base (unknown bare name too)."""
        if adapter is None:
            return None
        key = self.adapters.resolve(adapter)
        if key is None:
            return None  # unknown name: a new zero adapter answers like the base; nothing is written
        return self.adapters.load_sync(key)

    def submit_generate(self, prompt, adapter: str | None = None, *, on_delta=None,
                        **sampling) -> Future:
        """Thread-safe, non-blocking: a future of the GenerationResult (cancel it to stop early)."""
        return self._submit(prompt, adapter, on_delta, sampling)[1]

    def _submit(self, prompt, adapter: str | None, on_delta, sampling: dict) -> tuple[Request, Future]:
        """The scheduler's Request (callers abort through it) and the future its caller waits on."""
        self._check_open()
        request = self._make_request(prompt, sampling, on_delta)
        if adapter is not None:
            parse_ref(adapter)  # bad names fail here, synchronously
        fast = self._resident_latest(adapter)
        outer: Future = Future()  # not the scheduler's own: cancelling it works while the row runs
        if adapter is None or fast is not None:
            request.adapter = fast
            _chain(self.scheduler.submit(request), outer)
        else:
            def prepare() -> None:
                request.adapter = self._adapter_for(adapter)
                _chain(self.scheduler.submit(request), outer)
            _chain_errors(self._prep_pool.submit(prepare), outer)
        # A cancelled future (asyncio wait_for, a gone client) stops its row at the next step.
        outer.add_done_callback(lambda f: f.cancelled() and _abort(request))
        return request, outer

    def _resident_latest(self, adapter: str | None) -> HostAdapter | None:
        """Host copy for a bare name whose latest revision is resident, without any store I/O."""
        if adapter is None or "@" in adapter:
            return None
        revision = self.adapters.latest_revision(adapter)
        return self.adapters.get(f"{adapter}@{revision}") if revision else None

    async def generate(self, prompt, adapter: str | None = None, **sampling) -> GenerationResult:
        request, future = self._submit(prompt, adapter, None, sampling)
        try:
            return await asyncio.wrap_future(future)
        finally:
            if not future.done():  # the awaiting task was cancelled: nobody wants the rest
                _abort(request)

    async def generate_batch(self, prompts: list, adapters=None, **sampling) -> list[GenerationResult]:
        if adapters is None or isinstance(adapters, str):
            adapters = [adapters] * len(prompts)
        if len(adapters) != len(prompts):
            raise InvalidRequestError(f"{len(prompts)} prompts but {len(adapters)} adapters")
        submitted = [self._submit(p, a, None, sampling) for p, a in zip(prompts, adapters)]
        try:
            return list(await asyncio.gather(*(asyncio.wrap_future(f) for _, f in submitted)))
        finally:
            for request, future in submitted:
                if not future.done():
                    _abort(request)

    async def stream(self, prompt, adapter: str | None = None, *, include_result: bool = False,
                     **sampling) -> AsyncIterator:
        """Text deltas as tokens are produced; they join to the final text. With `include_result`,
        the GenerationResult (finish_reason, token counts) follows the last delta. A consumer that
        stops early (break, aclose, cancel) aborts the request."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        request, future = self._submit(
            prompt, adapter, lambda d: loop.call_soon_threadsafe(queue.put_nowait, d), sampling)
        future.add_done_callback(lambda _f: loop.call_soon_threadsafe(queue.put_nowait, _END))
        try:
            while (item := await queue.get()) is not _END:
                yield item
        finally:
            if not future.done():
                _abort(request)
        result = future.result()  # raise the request's error, if any
        if include_result:
            yield result

    # ------------------------------------------------------------------ learning
    def submit_learn(self, data, adapter: str, *, steps: int | None = None, lr: float | None = None,
                     parent: str | None = None, **opts) -> Future:
        self._check_open()
        return self.trainer.submit(data, adapter, steps=steps, lr=lr, parent=parent, **opts)

    async def learn(self, data, adapter: str, *, steps: int | None = None, lr: float | None = None,
                    parent: str | None = None, **opts) -> LearnReport:
        return await asyncio.wrap_future(self.submit_learn(data, adapter, steps=steps, lr=lr,
                                                           parent=parent, **opts))

    # ------------------------------------------------------------------ adapters
    def resolve(self, adapter: str) -> str | None:
        return self.adapters.resolve(adapter)

    def load_sync(self, ref: str) -> str:
        key = self.adapters.resolve(ref)
        if key is None:
            raise AdapterNotFoundError(f"adapter {ref!r} not found")
        return self.adapters.load_sync(key).key

    async def load(self, ref: str) -> str:
        key = await asyncio.to_thread(self.adapters.resolve, ref)
        if key is None:
            raise AdapterNotFoundError(f"adapter {ref!r} not found")
        return (await asyncio.wrap_future(self.adapters.load(key))).key

    def ensure(self, name: str) -> bool:
        """Make `name` resident: True if found (memory, then store), False if a fresh one was made."""
        key = self.adapters.resolve(name)
        if key is not None:
            self.adapters.load_sync(key)
            return True
        fresh = self.adapters.fresh(name)
        self.adapters.install_weights(name, fresh.weights, rank=fresh.rank, alpha=fresh.alpha,
                                      scale=fresh.scale, revision=None, stored=False)
        return False

    def check_adapter(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        """Raise InvalidAdapterError unless these PEFT tensors fit this model (nothing is installed)."""
        to_weights(tensors, self.adapters.shapes, self.config.max_lora_rank, name)

    def resident(self) -> list[str]:
        return sorted(set(self.adapters.resident()) | set(self.slots.resident()))

    def adapter_state(self, name: str) -> dict[str, torch.Tensor] | None:
        return self.adapters.state(name)

    def install(self, name: str, tensors: dict[str, torch.Tensor], *, revision: str | None = None,
                alpha: float | None = None, config: dict | None = None) -> str:
        """Validate and install PEFT tensors as the latest revision of `name`; returns "name@rev".
        With `revision` (a store commit) the copy counts as stored; without, it is memory-only (pinned).
        `alpha` / `config` (PEFT LoraConfig fields) set the scale; default: the engine's lora_alpha."""
        stored = revision is not None and self.store is not None
        return self.adapters.install(name, tensors, revision=revision, stored=stored, alpha=alpha,
                                     config=config).key

    def delete(self, name: str) -> bool:
        existed = self.adapters.delete(name)
        self.trainer.forget(name)
        if self.scheduler.alive:
            self.scheduler.call(lambda: self.slots.evict_name(name)).result(timeout=60)
        return existed

    # ------------------------------------------------------------------ oracle / introspection
    def prompt_logits(self, prompts: list, adapters: list[str | None]) -> list[torch.Tensor]:
        """Full-prompt logits [len, V] per row, all rows in ONE mixed forward (for correctness checks)."""
        ids = [self.encode_prompt(p) for p in prompts]
        hosts = [self._adapter_for(a) for a in adapters]
        return self.scheduler.call(lambda: self._forward_rows(ids, hosts)).result()

    def _forward_rows(self, ids: list[list[int]], hosts: list) -> list[torch.Tensor]:
        slots: list[int] = []
        try:  # every slot taken is given back, also when a later acquire finds none free
            for host in hosts:
                slot = self.slots.acquire(host) if host is not None else 0
                if slot is None:
                    raise InvalidRequestError("more distinct adapters than free device slots")
                slots.append(slot)
            batch = DecodeBatch(self.loaded.model, self.lora_state, self.loaded.device, self.loaded.pad_id)
            logits = batch.full_logits(ids, slots, [self.slots.rank_of(s) for s in slots])
        finally:
            for slot in slots:
                self.slots.release(slot)
        return [row[len(row) - len(p):].float().cpu() for row, p in zip(logits, ids)]

    def stats(self) -> dict:
        slot_bytes = sum(m.lora_A.nbytes + m.lora_B.nbytes for m in self.modules.values())
        return {"model": self.model_id, "device": str(self.loaded.device), **self.slots.stats(),
                **self.adapters.stats(), "slot_bytes": slot_bytes,
                "running": len(self.scheduler.rows), "decode_steps": self.scheduler.steps,
                "tokens_generated": self.scheduler.tokens_out, "learn_steps": self.scheduler.learn_steps,
                "store": getattr(self.store, "url", None)}

    def check_health(self) -> None:
        if self._closed or not self.scheduler.alive:
            raise EngineStoppedError("the engine's scheduler is not running")
        self.scheduler.call(lambda: None).result(timeout=60)

    def _check_open(self) -> None:
        if self._closed:
            raise EngineStoppedError("the engine is shut down")

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.scheduler.stop()
        self.trainer.shutdown()
        self._prep_pool.shutdown(wait=False, cancel_futures=True)
        self.adapters.shutdown()


def _chain_errors(source: Future, target: Future) -> None:
    """Forward only a failure of `source` (its success already chained the real result); a source
    cancelled by shutdown fails the target, so no caller waits forever."""
    def copy(done: Future) -> None:
        if target.done():
            return
        error = None if done.cancelled() else done.exception()
        if done.cancelled() or isinstance(error, CancelledError):  # shutdown cancelled it or its load
            target.set_exception(EngineStoppedError("the engine shut down before the request started"))
        elif error is not None:
            target.set_exception(error)
    source.add_done_callback(copy)


def _abort(request: Request) -> None:
    """Mark a request whose caller left; the scheduler retires it (finish_reason "abort")."""
    request.aborted = True
