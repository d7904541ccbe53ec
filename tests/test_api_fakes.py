"""Test doubles for the API tests: an in-memory engine that keeps the Engine contract of
docs/INTERFACES.md, and two file-system helpers (corrupt a file; make a directory tree read-only).

The engine is injected through `engine_cls=` (the API's dependency injection), so the API's own logic
(store handling, return values, sync/async bridging) is tested without loading a model. Its "model" has two
LoRA target modules; generated text names the adapter revision it used and echoes the sampling
options, so tests can see exactly what the API passed down. Commits go to the real AdapterStore.
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from adapters_store.errors import AdapterNotFoundError, InvalidAdapterError
from adapters_store.names import format_ref, new_revision_id, parse_ref, revision_seq, validate_name

_POOL = ThreadPoolExecutor(max_workers=4, thread_name_prefix="fake-engine")
MODULES = {"model.layers.0.self_attn.q_proj": (8, 8), "model.layers.0.mlp.down_proj": (16, 8)}


def peft_tensors(rank: int = 4, fill: float = 0.5) -> dict[str, torch.Tensor]:
    """PEFT-keyed A [r, in] / B [out, r] tensors for the fake model's modules."""
    tensors = {}
    for path, (fan_in, fan_out) in MODULES.items():
        tensors[f"base_model.model.{path}.lora_A.weight"] = torch.full((rank, fan_in), fill)
        tensors[f"base_model.model.{path}.lora_B.weight"] = torch.full((fan_out, rank), fill)
    return tensors


class FakeResult:
    def __init__(self, text: str, adapter: str | None):
        self.text, self.adapter = text, adapter


class FakeEngine:
    """Thread-safe; async methods finish on a worker thread, like the real engine's futures."""

    constructed = 0          # how many engines were built (the model must load once per API object)

    def __init__(self, config=None, *, store=None, **overrides):
        type(self).constructed += 1
        self.store, self.overrides = store, overrides
        self.model_id = overrides.get("model", "fake/model")
        self.rank = overrides.get("lora_rank", 16)
        self._resident: dict[str, dict[str, torch.Tensor]] = {}   # "name@rev" -> tensors
        self._latest: dict[str, str] = {}
        self._lock = threading.Lock()
        self.shut_down = False
        self.calls: list[str] = []

    async def _off_thread(self, fn, *args):
        """Run `fn` on another thread and await it from whatever loop the caller runs."""
        return await asyncio.wrap_future(_POOL.submit(fn, *args))

    # --- generation --------------------------------------------------------------------------
    async def generate(self, prompt, adapter=None, **sampling):
        return await self._off_thread(self._generate_now, prompt, adapter, sampling)

    def _generate_now(self, prompt, adapter, sampling):
        self.calls.append("generate")
        ref = self._ref_for(adapter) if adapter else None
        options = ",".join(f"{key}={sampling[key]}" for key in sorted(sampling))
        return FakeResult(f"[{ref or 'base'}] {prompt} ({options})", ref)

    async def generate_batch(self, prompts, adapters=None, **sampling):
        names = adapters if isinstance(adapters, list) else [adapters] * len(prompts)
        return [await self.generate(p, a, **sampling) for p, a in zip(prompts, names)]

    async def stream(self, prompt, adapter=None, **sampling):
        result = await self.generate(prompt, adapter, **sampling)
        for word in result.text.split(" "):
            yield word + " "

    def _ref_for(self, adapter: str) -> str | None:
        """Resident latest, else the store's latest (loaded), else None: an unknown adapter is the base."""
        name, rev = parse_ref(adapter)
        with self._lock:
            if rev is None and name in self._latest:
                return format_ref(name, self._latest[name])
        latest = self.store.latest(name) if self.store is not None else None
        return self._load_now(format_ref(name, rev or latest)) if (rev or latest) else None

    # --- learning ----------------------------------------------------------------------------
    async def learn(self, data, adapter, *, steps=None, lr=None, parent=None, **opts):
        return await self._off_thread(self._learn_now, data, adapter, steps, lr)

    def _learn_now(self, data, adapter, steps, lr):
        if not data:
            raise ValueError("empty training data")
        name = validate_name(adapter)
        steps = steps or 3
        tensors = peft_tensors(self.rank, fill=float(steps))
        parent = self.store.latest(name) if self.store is not None else None
        if self.store is not None:
            config = {"r": self.rank, "lora_alpha": 32.0, "base_model_name_or_path": self.model_id,
                      "target_modules": ["q_proj", "down_proj"]}
            revision = self.store.commit(name, tensors, config=config, parent=parent,
                                         meta={"model_path": self.model_id})
        else:
            revision = new_revision_id(1)
        self.install(name, tensors, revision=revision)
        return _Report(name, revision, parent, steps, committed=self.store is not None)

    # --- adapter tiers -----------------------------------------------------------------------
    def resolve(self, adapter):
        return self._ref_for(adapter)

    async def load(self, ref):
        return await self._off_thread(self._load_now, ref)

    def _load_now(self, ref):
        with self._lock:
            if ref in self._resident:
                return ref
        name, rev = parse_ref(ref)
        if self.store is None:
            raise AdapterNotFoundError(ref)
        record = self.store.read(name, rev)
        self.install(name, record.tensors, revision=record.revision)
        return format_ref(name, record.revision)

    def check_adapter(self, name, tensors):
        """Like Engine.check_adapter: PEFT keys with 2-d tensors fit this fake model."""
        for key, tensor in tensors.items():
            if not key.endswith((".lora_A.weight", ".lora_B.weight")) or tensor.dim() != 2:
                raise InvalidAdapterError(f"{name}: tensor {key!r} does not fit the model", adapter=name)

    def resident(self):
        with self._lock:
            return list(self._resident)

    def adapter_state(self, name):
        with self._lock:
            rev = self._latest.get(name)
            tensors = self._resident.get(format_ref(name, rev)) if rev else None
            return {k: v.clone() for k, v in tensors.items()} if tensors is not None else None

    def install(self, name, tensors, *, revision=None, alpha=None, config=None):
        self.calls.append("install")
        for key, tensor in tensors.items():
            path = key.removeprefix("base_model.model.").rsplit(".lora_", 1)[0]
            want_in, want_out = MODULES.get(path, (None, None))
            shape_ok = tensor.shape[1] == want_in if ".lora_A." in key else tensor.shape[0] == want_out
            if want_in is None or not shape_ok:
                raise InvalidAdapterError(f"{name}: {key} {tuple(tensor.shape)} does not fit the model")
        with self._lock:
            current = self._latest.get(name)
            revision = revision or new_revision_id(revision_seq(current) + 1 if current else 1)
            self._resident[format_ref(name, revision)] = dict(tensors)
            self._latest[name] = revision
        return format_ref(name, revision)

    def ensure(self, name):
        """Resident or stored: True; else a fresh zero-B adapter is installed: False."""
        ref = self._ref_for(name)
        if ref is not None:
            return True
        self.install(name, peft_tensors(self.rank, fill=0.0))
        return False

    def delete(self, name):
        with self._lock:
            keys = [ref for ref in self._resident if ref.partition("@")[0] == name]
            for ref in keys:
                del self._resident[ref]
            return bool(keys) | (self._latest.pop(name, None) is not None)

    def stats(self):
        return {"resident": len(self._resident), "hits": 3, "misses": 1, "memory": {"host_bytes": 0}}

    def shutdown(self):
        self.shut_down = True


class _Report:
    def __init__(self, adapter, revision, parent, steps, committed):
        self.adapter, self.revision, self.parent, self.steps = adapter, revision, parent, steps
        self.committed = committed

    def to_dict(self):
        return {"adapter": self.adapter, "revision": self.revision, "parent": self.parent,
                "steps": self.steps, "tokens": 10 * self.steps, "loss_before": 2.0,
                "loss_after": 0.5, "duration_s": 0.0, "committed": self.committed}


def flip_bytes(path: str) -> None:
    """Invert the last 16 bytes of a file (a corrupted stored tensor file)."""
    data = bytearray(open(path, "rb").read())
    for i in range(len(data) - 16, len(data)):
        data[i] ^= 0xFF
    open(path, "wb").write(bytes(data))


@contextlib.contextmanager
def read_only(path: str):
    """Make a directory tree unwritable, also for root (immutable attribute); skip if impossible."""
    as_root = os.geteuid() == 0
    flag = ["chattr", "-R", "+i", path] if as_root else ["chmod", "-R", "a-w", path]
    undo = ["chattr", "-R", "-i", path] if as_root else ["chmod", "-R", "u+w", path]
    if subprocess.run(flag, capture_output=True).returncode != 0:
        pytest.skip("cannot make a directory read-only here")
    if _writable(path):
        subprocess.run(undo, check=True)
        pytest.skip("the file system ignores the read-only flag here")
    try:
        yield
    finally:
        subprocess.run(undo, check=True)


def _writable(path: str) -> bool:
    probe = os.path.join(path, ".probe")
    try:
        open(probe, "w").close()
    except OSError:
        return False
    os.remove(probe)
    return True
