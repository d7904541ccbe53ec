"""AdapterStore: versioned, immutable PEFT-format LoRA adapter revisions on any fsspec storage.

Commit protocol (shared/DESIGN.md rule 2): a revision's files are written under <name>/<rev>/ with
meta.json (sha256 of each file) last; then the writer claims the next sequence number exclusively
(one winner per parent); then it replaces <name>/LATEST. Reads validate everything before returning.
Knows nothing about models, devices, Ray or serving; maintenance (list/info/prune/verify/gc) is in
maintenance.py.
"""
from __future__ import annotations

import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

from adapters_store.backends import Backend, ProgressCallback, make_backend
from adapters_store.errors import AdapterNotFoundError, CommitConflictError, StoreUnavailableError
from adapters_store.maintenance import MaintenanceMixin
from adapters_store.names import (
    is_revision_id, new_revision_id, revision_seq, validate_name, validate_revision_ref,
)
from adapters_store.revlog import RevisionLog
from adapters_store.safetensors_io import encode_parts
from adapters_store.validate import (
    CONFIG_FILE, META_FILE, MODEL_FILE, OPTIMIZER_FILE, ChunkHasher, Where, check_checksum,
    decode_file, sha256_parts, validate_config, validate_lora_tensors, validate_optimizer_tensors,
)

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

# Fields PEFT's LoraConfig expects in adapter_config.json; commit fills what the caller leaves out.
PEFT_CONFIG_DEFAULTS = {
    "peft_type": "LORA", "task_type": "CAUSAL_LM", "bias": "none", "lora_dropout": 0.0,
    "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True, "use_rslora": False,
    "use_dora": False, "modules_to_save": None, "layers_to_transform": None, "revision": None,
}


@dataclass(frozen=True)
class AdapterRevision:
    """One validated revision, tensors on CPU with PEFT key names."""

    name: str
    revision: str
    tensors: dict[str, torch.Tensor]
    config: dict
    meta: dict
    optimizer_state: dict[str, torch.Tensor] | None

    @property
    def rank(self) -> int:
        return int(self.config["r"])

    @property
    def alpha(self) -> float:
        return float(self.config["lora_alpha"])

    @property
    def target_modules(self) -> list[str]:
        return list(self.config["target_modules"])


def open_store(url: str | None = None, *, storage_options: dict | None = None, max_rank: int = 256,
               create: bool = True) -> "AdapterStore | None":
    """Open the store at `url` (default: $LORA_SAVE_PATH); None when neither is set (memory only)."""
    if url is None:
        url = os.environ.get("LORA_SAVE_PATH", "")
    if not url:
        return None
    backend = make_backend(url, storage_options)
    backend.ensure_root(create)
    return AdapterStore(backend, max_rank=max_rank)


class AdapterStore(MaintenanceMixin):
    """Commit and read adapter revisions; see the module docstring for the protocol."""

    def __init__(self, backend: Backend, *, max_rank: int = 256, gc_grace_s: float = 3600.0):
        self.backend, self.url = backend, backend.url
        self.log = RevisionLog(backend)
        self.max_rank, self.gc_grace_s = max_rank, gc_grace_s

    def __repr__(self) -> str:
        return f"AdapterStore({self.url!r})"

    # --- commit --------------------------------------------------------------------------------
    def commit(self, name: str, tensors: dict[str, torch.Tensor], *, config: dict,
               parent: str | None, meta: dict | None = None,
               optimizer_state: dict[str, torch.Tensor] | None = None,
               progress: ProgressCallback | None = None) -> str:
        """Write a new revision whose parent must be the latest one; returns its revision id."""
        validate_name(name)
        where = Where(name, None)
        config = {**PEFT_CONFIG_DEFAULTS, **config}
        if isinstance(config.get("target_modules"), (tuple, set, frozenset)):
            config["target_modules"] = sorted(config["target_modules"])  # JSON keeps lists only
        validate_config(where, config, self.max_rank)
        validate_lora_tensors(where, tensors, config)
        if optimizer_state is not None:
            validate_optimizer_tensors(where, optimizer_state)
        parent = self._check_parent(name, parent)
        revision = new_revision_id(revision_seq(parent) + 1 if parent else 1)
        files = self._encode_files(where, tensors, config, optimizer_state)
        try:
            checksums = self._write_files(name, revision, files, progress)
            # meta.json last: a revision directory without it is incomplete by construction.
            self.backend.write_bytes(f"{name}/{revision}/{META_FILE}", json.dumps(
                self._meta(name, revision, parent, config, meta, checksums), indent=2,
                default=str).encode())
        except BaseException:
            self._discard(name, revision)
            raise
        if not self.log.claim(name, revision):
            self._discard(name, revision)  # the loser's files go; the winner's stay
            raise CommitConflictError(
                f"adapter {name!r}: another writer committed on parent {parent} first")
        self._publish(name, revision)
        return revision

    def _check_parent(self, name: str, parent: str | None) -> str | None:
        current = self.log.latest(name)
        if parent is not None and not is_revision_id(parent):
            parent = self.log.resolve(name, validate_revision_ref(parent))
        if parent != current:
            raise CommitConflictError(
                f"adapter {name!r}: parent {parent} is not the latest revision ({current})")
        return parent

    def _discard(self, name: str, revision: str) -> None:
        """Best effort removal of an unclaimed revision's files (gc gets whatever remains)."""
        try:
            self.backend.remove_tree(f"{name}/{revision}")
        except OSError as exc:
            logger.warning("adapter %s: could not remove unfinished revision %s: %s", name,
                           revision, exc)

    @staticmethod
    def _encode_files(where, tensors, config, optimizer_state) -> dict[str, list[memoryview]]:
        try:
            config_bytes = json.dumps(config, indent=2, allow_nan=False).encode()
        except (TypeError, ValueError) as exc:
            raise where.invalid(CONFIG_FILE, f"config is not JSON-serializable: {exc}") from None
        files = {MODEL_FILE: encode_parts(tensors), CONFIG_FILE: [memoryview(config_bytes)]}
        if optimizer_state is not None:
            files[OPTIMIZER_FILE] = encode_parts(optimizer_state)
        return files

    @staticmethod
    def _meta(name, revision, parent, config, extra, checksums) -> dict:
        # Store fields win over caller fields of the same name: they are what readers rely on.
        return {**(extra or {}), "adapter_name": name, "revision": revision,
                "seq": revision_seq(revision), "parent": parent, "lora_rank": config["r"],
                "lora_alpha": config["lora_alpha"], "target_modules": config["target_modules"],
                "model_path": (extra or {}).get("model_path", config.get("base_model_name_or_path")),
                "saved_at": time.time(), "files": checksums}

    def _write_files(self, name, revision, files, progress) -> dict[str, str]:
        """Write each file while a worker thread hashes the same bytes; returns {file: sha256}."""
        checksums = {}
        with ThreadPoolExecutor(1, thread_name_prefix="sha256") as pool:
            for file, parts in files.items():
                digest = pool.submit(sha256_parts, parts)
                self.backend.write_parts(f"{name}/{revision}/{file}", parts,
                                         progress if file != CONFIG_FILE else None)
                checksums[file] = digest.result()
        return checksums

    def _publish(self, name: str, revision: str) -> None:
        """Move LATEST; the claim already made the revision durable, so a failure here only logs."""
        try:
            self.log.set_pointer(name, revision)
        except StoreUnavailableError as exc:
            logger.warning("adapter %s: revision %s committed, LATEST not updated (readers roll "
                           "forward): %s", name, revision, exc)

    # --- read ------------------------------------------------------------------------------------
    def latest(self, name: str) -> str | None:
        return self.log.latest(validate_name(name))

    def read(self, name: str, rev: str | None = None, *, with_optimizer: bool = False,
             progress: ProgressCallback | None = None) -> AdapterRevision:
        """The validated revision `rev` (default: latest) of `name`."""
        revision = self._resolve(name, rev)
        where = Where(name, revision)
        meta = self._read_meta(where)
        checksums = meta["files"]
        config = _parse_json(where, CONFIG_FILE, self._read_checked(where, CONFIG_FILE, checksums))
        validate_config(where, config, self.max_rank)
        tensors = decode_file(where, MODEL_FILE, self._read_checked(where, MODEL_FILE, checksums,
                                                                   progress))
        validate_lora_tensors(where, tensors, config)
        optimizer = None
        if with_optimizer and OPTIMIZER_FILE in checksums:
            optimizer = decode_file(where, OPTIMIZER_FILE,
                                    self._read_checked(where, OPTIMIZER_FILE, checksums))
        return AdapterRevision(name, revision, tensors, config, meta, optimizer)

    def _resolve(self, name: str, rev: str | None) -> str:
        validate_name(name)
        if rev is None:
            revision = self.log.latest(name)
            if revision is None:
                raise AdapterNotFoundError(f"adapter {name!r} not found in store {self.url}")
            return revision
        return self.log.resolve(name, validate_revision_ref(rev))

    def _read_meta(self, where: Where) -> dict:
        try:
            raw = self.backend.read_small(f"{where.adapter}/{where.revision}/{META_FILE}")
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise where.corrupt(META_FILE, "file is missing") from None
        meta = _parse_json(where, META_FILE, raw)
        if not isinstance(meta, dict) or not isinstance(meta.get("files"), dict) \
                or MODEL_FILE not in meta["files"] or CONFIG_FILE not in meta["files"]:
            raise where.corrupt(META_FILE, "no file checksums for the adapter files")
        return meta

    def _read_checked(self, where: Where, file: str, checksums: dict, progress=None):
        """A revision file's bytes, hashed while they arrive and checked against the manifest."""
        hasher = ChunkHasher()
        try:
            data = self.backend.read_bytes(f"{where.adapter}/{where.revision}/{file}", progress,
                                           on_chunk=hasher.update)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise where.corrupt(file, "file is missing") from None
        finally:
            hasher.close()
        check_checksum(where, file, data, checksums.get(file), hasher.hexdigest())
        return data

    def revision_url(self, name: str, rev: str) -> str:
        """Where the PEFT directory of a revision lives: a local path, or an fsspec URL."""
        rel = f"{validate_name(name)}/{self.log.resolve(name, validate_revision_ref(rev))}"
        return self.backend.local_path(rel) or self.backend.url_of(rel)


def _parse_json(where: Where, file: str, raw) -> object:
    try:
        return json.loads(bytes(raw))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise where.corrupt(file, f"not valid JSON: {exc}") from None
