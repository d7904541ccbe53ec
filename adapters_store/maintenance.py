"""Store maintenance: listing, info, delete, retention (prune), verify and garbage collection.

A mixin of AdapterStore (store.py), which provides `backend`, `log`, `read`, `gc_grace_s`. Knows the
layout of revlog.py; knows nothing about tensors beyond calling `read` to verify.
"""
from __future__ import annotations

import logging
import time

from adapters_store.errors import AdapterNotFoundError, InvalidAdapterError, InvalidAdapterNameError
from adapters_store.names import is_revision_id, revision_seq, validate_name
from adapters_store.revlog import CLAIMS_DIR, POINTER, claim_path
from adapters_store.validate import Where

logger = logging.getLogger(__name__)


class MaintenanceMixin:
    """Operations over many revisions or adapters."""

    def list_adapters(self) -> list[str]:
        """Sorted names that have at least one committed revision."""
        names = []
        for entry in self.backend.list_dir(""):
            if not _valid_name(entry):
                continue
            children = self.backend.list_dir(entry)
            if POINTER in children or (CLAIMS_DIR in children and self.log.latest(entry)):
                names.append(entry)
        return sorted(names)

    def list_revisions(self, name: str) -> list[str]:
        """Committed revisions still stored, oldest first."""
        return self.log.committed(validate_name(name))

    def info(self, name: str) -> dict:
        """name, latest, revisions, meta (of the latest), size_bytes (all revisions), path."""
        latest = self.latest(name)
        if latest is None:
            raise AdapterNotFoundError(f"adapter {name!r} not found in store {self.url}")
        revisions = self.list_revisions(name)
        size = sum(size for rev in revisions
                   for _, size, _ in self.backend.file_stats(f"{name}/{rev}"))
        where_meta = self.read_meta(name, latest)
        return {"name": name, "latest": latest, "revisions": revisions, "meta": where_meta,
                "size_bytes": size, "path": self.revision_url(name, latest),
                "url": self.backend.url_of(name)}

    def read_meta(self, name: str, revision: str) -> dict:
        """meta.json of a committed revision (checked to be JSON with checksums)."""
        return self._read_meta(Where(name, self.log.resolve(validate_name(name), revision)))

    def delete(self, name: str) -> bool:
        """Remove every revision of `name`; False if nothing of it was stored."""
        return self.backend.remove_tree(validate_name(name))

    def prune(self, name: str, keep: int = 5) -> list[str]:
        """Delete all but the newest `keep` revisions (keep >= 1); returns the deleted ids."""
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        revisions = self.list_revisions(name)
        if not revisions:
            raise AdapterNotFoundError(f"adapter {name!r} not found in store {self.url}")
        latest = self.log.latest(name)
        if latest and self.log.read_pointer(name) != latest:
            self.log.set_pointer(name, latest)  # never leave LATEST behind a pruned claim
        doomed = [rev for rev in revisions[:-keep] if rev != latest]
        for rev in doomed:
            # Claim first, then files: an interrupted prune leaves an unclaimed dir that gc removes.
            self.backend.remove_file(claim_path(name, revision_seq(rev)))
            self.backend.remove_tree(f"{name}/{rev}")
        return doomed

    def verify(self, name: str | None = None) -> list[dict]:
        """Read and fully validate every revision (of `name`, or of all adapters); one row each."""
        names = [validate_name(name)] if name is not None else self.list_adapters()
        rows = []
        for adapter in names:
            revisions = self.list_revisions(adapter)
            if name is not None and not revisions:
                raise AdapterNotFoundError(f"adapter {adapter!r} not found in store {self.url}")
            for rev in revisions:
                rows.append(self._verify_one(adapter, rev))
        return rows

    def _verify_one(self, name: str, rev: str) -> dict:
        try:
            self.read(name, rev, with_optimizer=True)
        except InvalidAdapterError as exc:
            return {"name": name, "revision": rev, "ok": False, "file": exc.file, "error": str(exc)}
        return {"name": name, "revision": rev, "ok": True, "file": None, "error": None}

    def gc(self, grace_s: float | None = None) -> list[str]:
        """Remove files of commits that never completed (no claim) once older than `grace_s`
        (default: the store's gc_grace_s; a younger one may belong to a writer still running)."""
        grace = self.gc_grace_s if grace_s is None else grace_s
        removed = []
        for entry in self.backend.list_dir(""):
            if _valid_name(entry):
                removed += self._gc_adapter(entry, time.time() - grace)
        if removed:
            logger.info("store %s: gc removed %d orphaned revision directories", self.url, len(removed))
        return removed

    def _gc_adapter(self, name: str, cutoff: float) -> list[str]:
        # List directories before reading claims: a commit claimed in between is then seen as claimed.
        entries = self.backend.list_dir(name)
        committed = set(self.log.committed(name))
        removed = []
        for entry in entries:
            orphan = is_revision_id(entry) or entry.startswith(".tmp-")
            if not orphan or entry in committed:
                continue
            if self._older(f"{name}/{entry}", cutoff) and self._remove_orphan(name, entry):
                removed.append(f"{name}/{entry}")
        for entry in self.backend.list_dir(f"{name}/{CLAIMS_DIR}"):
            # A claim's temp file whose writer died before link() (local stores only).
            if entry.startswith(".tmp-") and self._older(f"{name}/{CLAIMS_DIR}/{entry}", cutoff):
                self.backend.remove_file(f"{name}/{CLAIMS_DIR}/{entry}")
        if POINTER not in entries and not committed and self.log.latest(name) is None \
                and all(e in (CLAIMS_DIR,) or f"{name}/{e}" in removed for e in entries):
            self.backend.remove_tree(name)  # nothing of this adapter was ever committed
        return removed

    def _older(self, rel: str, cutoff: float) -> bool:
        """True if every file at `rel` (a directory or a file) was last modified before `cutoff`."""
        stats = self.backend.file_stats(rel)
        if not stats:  # an empty directory: a writer may have just created it
            return (self.backend.modified(rel) or 0.0) <= cutoff
        return max((mtime for _, _, mtime in stats if mtime is not None), default=0.0) <= cutoff

    def _remove_orphan(self, name: str, entry: str) -> bool:
        if entry.startswith(".tmp-"):
            self.backend.remove_file(f"{name}/{entry}")
            return True
        return self.backend.remove_tree(f"{name}/{entry}")


def _valid_name(entry: str) -> bool:
    try:
        validate_name(entry)
    except InvalidAdapterNameError:
        return False
    return True
