"""The shared body of OnlineLLM and AsyncOnlineLLM: one Engine, one store, the management methods.

Holds the constructor (options, store from an object/URL/LORA_SAVE_PATH, the injected engine class)
and every management method of shared/SEED_API.md, which are blocking in both classes. Store
failures (corrupt files, permission errors, a missing or unreachable store) become the documented
False / None / `disk_error` results with a logged reason; invalid adapter names raise
InvalidAdapterNameError. Knows nothing about how the engine batches or trains, only its contract in
docs/INTERFACES.md.
"""
from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

from adapters_store.errors import CorruptAdapterError, InvalidAdapterError
from adapters_store.names import validate_name
from serve.api_loop import LoopThread
from serve.api_options import (
    STORE_FAILURES, ApiOptions, cpu_tensors, lora_config_for, metadata_mismatches, open_api_store,
)
from serve.api_stats import process_rss_bytes, render_table

logger = logging.getLogger("serve.api")


class OnlineLLMCore:
    """Construction and adapter management shared by the blocking and the async API."""

    def __init__(self, model: str | None = None, *, temperature: float = 0.0, max_tokens: int = 64,
                 lora_rank: int = 16, lora_alpha: float = 32.0, store: Any = None,
                 engine_cls: type | None = None, **engine_options: Any):
        self.options = ApiOptions(temperature=temperature, max_tokens=max_tokens,
                                  lora_rank=lora_rank, lora_alpha=lora_alpha)
        opened = open_api_store(store)
        self._store, self._store_location, self._store_error = opened.store, opened.location, opened.error
        if engine_cls is None:
            from serve.engine import Engine as engine_cls
        overrides = dict(self.options.model_dump(), **engine_options)
        if model is not None:
            overrides["model"] = model
        # The model is loaded here, once; every later call reuses this engine.
        self._engine = engine_cls(store=self._store, **overrides)
        self._runner = LoopThread()

    # --- properties and lifecycle ------------------------------------------------------------
    @property
    def engine(self) -> Any:
        """The Engine this API drives (shared by every call; the model is loaded once)."""
        return self._engine

    @property
    def store(self) -> Any | None:
        """The AdapterStore in use, or None in memory-only mode."""
        return self._store

    @property
    def model_id(self) -> str:
        return self._engine.model_id

    def close(self) -> None:
        """Stop the engine and the private loop thread."""
        self._engine.shutdown()
        self._runner.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _sampling(self, sampling: dict) -> dict:
        """Per-call sampling options over the constructor's defaults."""
        return {"temperature": self.options.temperature, "max_tokens": self.options.max_tokens,
                **sampling}

    # --- where adapters are ------------------------------------------------------------------
    def _resident_names(self) -> set[str]:
        return {ref.partition("@")[0] for ref in self._engine.resident()}

    def _served_revision(self, name: str) -> str | None:
        """The revision a bare-name generate would use now; None when the store cannot say."""
        try:
            ref = self._engine.resolve(name)
        except STORE_FAILURES as exc:  # resident only as name@rev: resolving asks the store
            logger.error("adapter %r: cannot resolve its latest revision: %s", name, exc)
            return None
        return (ref.partition("@")[2] or None) if ref else None

    def _stored_latest(self, name: str) -> tuple[str | None, str | None]:
        """(latest committed revision or None, error text or None); never raises store failures."""
        if self._store is None:
            return None, None
        try:
            return self._store.latest(name), None
        except STORE_FAILURES as exc:
            logger.error("adapter %r: store %s unreadable: %s", name, self._store_location, exc)
            return None, f"{type(exc).__name__}: {exc}"

    def _no_store_reason(self) -> str:
        if self._store_error:
            return f"the store {self._store_location} could not be opened ({self._store_error})"
        return "no adapter store is configured (set LORA_SAVE_PATH or pass store=)"

    # --- management methods (shared/SEED_API.md) ---------------------------------------------
    def get_lora_save_path(self) -> str | None:
        """The store location (path or URL) from LORA_SAVE_PATH / `store=`, or None (memory only)."""
        return self._store_location if self._store is not None else None

    def list_disk_adapters(self) -> list[str]:
        """Adapter names with a committed revision in the store; [] without a usable store."""
        if self._store is None:
            return []
        try:
            return list(self._store.list_adapters())
        except STORE_FAILURES as exc:
            logger.error("listing store %s failed: %s", self._store_location, exc)
            return []

    def list_adapters(self) -> list[str]:
        """Sorted union of resident and stored adapter names."""
        return sorted(self._resident_names() | set(self.list_disk_adapters()))

    def load_lora_from_disk(self, adapter: str) -> dict | None:
        """The latest committed revision's tensors (PEFT keys, CPU), or None if missing/unreadable."""
        name = validate_name(adapter)
        latest, error = self._stored_latest(name)
        if latest is None:
            logger.warning("load_lora_from_disk(%r): %s", name,
                           error or ("not in the store" if self._store else self._no_store_reason()))
            return None
        try:
            revision = self._store.read(name, latest)
        except STORE_FAILURES as exc:
            logger.error("load_lora_from_disk(%r): revision %s unreadable: %s", name, latest, exc)
            return None
        return {key: tensor.to("cpu") for key, tensor in revision.tensors.items()}

    def save_lora_to_disk(self, adapter: str, lora_state: dict | None = None) -> bool:
        """Commit the resident adapter (or `lora_state`) as a new revision whose parent is the latest."""
        name = validate_name(adapter)
        if self._store is None:
            logger.warning("save_lora_to_disk(%r) not saved: %s", name, self._no_store_reason())
            return False
        if lora_state is None and self._already_committed(name):
            return True
        tensors = self._engine.adapter_state(name) if lora_state is None else lora_state
        if tensors is None:
            logger.warning("save_lora_to_disk(%r) not saved: the adapter is not in memory", name)
            return False
        try:
            tensors = cpu_tensors(tensors)
            revision, config = self._commit(name, tensors)
        except (*STORE_FAILURES, TypeError) as exc:
            logger.error("save_lora_to_disk(%r) failed: %s", name, exc)
            return False
        return self._install_committed(name, tensors, revision, config)

    def _already_committed(self, name: str) -> bool:
        """True when the resident copy is the store's latest revision: saving again adds nothing."""
        if name not in self._resident_names():
            return False
        latest, _ = self._stored_latest(name)
        return latest is not None and latest == self._served_revision(name)

    def _commit(self, name: str, tensors: dict) -> tuple[str, dict]:
        parent = self._store.latest(name)
        alpha, use_rslora = self.options.lora_alpha, False
        if parent is not None:  # keep the adapter's own scale, whatever this API's default is
            alpha = (self._store.info(name).get("meta") or {}).get("lora_alpha", alpha)
            use_rslora = bool(self._store.read(name, parent).config.get("use_rslora"))
        config = lora_config_for(tensors, alpha=alpha, base_model=self._engine.model_id,
                                 use_rslora=use_rslora)
        # Tensors the loaded model cannot serve must never become the store's latest revision.
        self._engine.check_adapter(name, tensors)
        meta = {"model_path": self._engine.model_id, "source": "save_lora_to_disk"}
        revision = self._store.commit(name, tensors, config=config, parent=parent, meta=meta)
        logger.info("saved adapter %r as revision %s (parent %s) in %s", name, revision, parent,
                    self._store_location)
        return revision, config

    def _install_committed(self, name: str, tensors: dict, revision: str, config: dict) -> bool:
        """Serve the committed revision from memory too (read your writes); True: it is committed."""
        try:
            self._engine.install(name, tensors, revision=revision, config=config)
        except STORE_FAILURES as exc:
            # Committed as asked; the loaded model cannot serve it (loading it later fails clearly).
            logger.error("adapter %r: revision %s was saved but does not fit the loaded model: %s",
                         name, revision, exc)
        return True

    def ensure_lora_adapter(self, adapter: str) -> bool:
        """Make `adapter` resident: memory, then store (True); else a fresh zero adapter (False).

        A stored copy that is unreadable is reported (False, logged) and not replaced by a fresh
        one; a stored copy whose shapes do not fit the model raises InvalidAdapterError.
        """
        name = validate_name(adapter)
        if name in self._resident_names():
            return True
        latest, error = self._stored_latest(name)
        if error is not None:
            return False
        if latest is None:
            # The engine makes a fresh zero-initialised adapter (output = base model), or finds one
            # that another writer committed meanwhile.
            return bool(self._engine.ensure(name))
        return self._load_stored(name, latest)

    def _load_stored(self, name: str, latest: str) -> bool:
        self._warn_on_mismatch(name)
        try:
            self._runner.run(self._engine.load(f"{name}@{latest}"))
        except InvalidAdapterError as exc:
            if not isinstance(exc, CorruptAdapterError):
                raise  # incompatible shapes: a clear error, not a silent fallback to the base model
            logger.error("adapter %r: stored revision %s is corrupt: %s", name, latest, exc)
            return False
        except STORE_FAILURES as exc:
            logger.error("adapter %r: loading revision %s failed: %s", name, latest, exc)
            return False
        return True

    def _warn_on_mismatch(self, name: str) -> list[str]:
        try:
            meta = self._store.info(name).get("meta") or {}
        except STORE_FAILURES:
            return []
        found = metadata_mismatches(meta, model_id=self._engine.model_id, rank=self.options.lora_rank,
                                    alpha=self.options.lora_alpha)
        for difference in found:
            logger.warning("adapter %r: %s; loading it anyway since its shapes fit", name, difference)
        return found

    def delete_adapter(self, adapter: str, delete_from_disk: bool = False) -> bool:
        """Drop from memory (and from the store when asked); False if nothing was deleted."""
        name = validate_name(adapter)
        deleted = bool(self._engine.delete(name))
        if delete_from_disk:
            if self._store is None:
                logger.warning("delete_adapter(%r): %s", name, self._no_store_reason())
            else:
                try:
                    deleted = bool(self._store.delete(name)) or deleted
                except STORE_FAILURES as exc:
                    logger.error("delete_adapter(%r) from %s failed: %s", name, self._store_location, exc)
        return deleted

    def get_adapter_info(self, adapter: str) -> dict:
        """name, in_memory, on_disk, param_count, metadata, disk_path, revision (+ disk_error)."""
        name = validate_name(adapter)
        in_memory = name in self._resident_names()
        info: dict[str, Any] = {
            "name": name, "in_memory": in_memory, "on_disk": False, "param_count": 0,
            "metadata": {}, "disk_path": None, "disk_revision": None,
            "revision": self._served_revision(name) if in_memory else None,
        }
        if in_memory:
            state = self._engine.adapter_state(name) or {}
            info["param_count"] = sum(int(t.numel()) for t in state.values())
        self._add_disk_info(name, info)
        if info["revision"] is None:
            info["revision"] = info["disk_revision"]
        return info

    def _add_disk_info(self, name: str, info: dict) -> None:
        latest, error = self._stored_latest(name)
        if error is not None:
            info["disk_error"] = error
        if latest is None:
            return
        info.update(on_disk=True, disk_revision=latest)
        try:
            info["disk_path"] = self._store.revision_url(name, latest)
            stored = self._store.read(name, latest)
        except STORE_FAILURES as exc:
            info["disk_error"] = f"{type(exc).__name__}: {exc}"
            info["metadata"] = self._readable_meta(name)
            return
        info["metadata"] = dict(stored.meta)
        if not info["in_memory"]:
            info["param_count"] = sum(int(t.numel()) for t in stored.tensors.values())
        mismatches = metadata_mismatches(stored.meta, model_id=self._engine.model_id,
                                         rank=self.options.lora_rank, alpha=self.options.lora_alpha)
        if mismatches:
            info["metadata_warnings"] = mismatches

    def _readable_meta(self, name: str) -> dict:
        """meta.json alone, for an adapter whose tensors are unreadable (it may still parse)."""
        try:
            return dict(self._store.info(name).get("meta") or {})
        except STORE_FAILURES:
            return {}

    def stats(self, show_detailed: bool = True, *, stream: TextIO | None = None) -> dict:
        """Resident adapters, store location and counts, cache hits/misses, memory use.

        With `show_detailed` the figures are also written as a table to `stream` (stdout).
        """
        engine_stats = dict(self._engine.stats())
        disk = self.list_disk_adapters()
        result = {
            "model": self._engine.model_id,
            "resident_adapters": sorted(self._engine.resident()),
            "num_resident": len(self._engine.resident()),
            "store": self.get_lora_save_path(),
            "store_error": self._store_error,
            "num_disk_adapters": len(disk),
            "num_adapters": len(self._resident_names() | set(disk)),
            "cache": {k: v for k, v in engine_stats.items() if k.endswith(("hits", "misses"))},
            "memory": {**{k: v for k, v in engine_stats.items() if k.endswith("bytes")},
                       "process_rss_bytes": process_rss_bytes()},
            "engine": engine_stats,
        }
        if show_detailed:
            # The table is output the caller asked for (SEED_API: "printed as a table when asked").
            (stream or sys.stdout).write(render_table(result) + "\n")
        return result
