"""The revision log of each adapter: which revisions are committed and which one is the latest.

Layout under the store root (see shared/DESIGN.md):
    <name>/<rev>/...        revision files (written first, meta.json last)
    <name>/.seq/<seq>       the claim: created exclusively, content = the revision id. Exactly one
                            writer wins each sequence number; a claim is only made once its revision's
                            files are complete, so a claimed revision is committed.
    <name>/LATEST           the pointer, replaced last; readers roll it forward over later claims
                            (a writer may die between its claim and the pointer).
Knows nothing about tensors or validation; only names, revision ids and the backend's primitives.
"""
from __future__ import annotations

from adapters_store.backends import Backend
from adapters_store.errors import AdapterNotFoundError, RevisionNotFoundError
from adapters_store.names import is_revision_id, revision_seq

CLAIMS_DIR = ".seq"
POINTER = "LATEST"


def claim_path(name: str, seq: int) -> str:
    return f"{name}/{CLAIMS_DIR}/{seq:06d}"


class RevisionLog:
    """Reads and writes claims and the LATEST pointer of adapters through a Backend."""

    def __init__(self, backend: Backend):
        self.backend = backend

    def read_claim(self, name: str, seq: int) -> str | None:
        """The revision id that won `seq`, or None (no claim, or unreadable content)."""
        try:
            text = self.backend.read_small(claim_path(name, seq)).decode("ascii", "replace")
        except FileNotFoundError:
            return None
        text = text.strip()
        return text if is_revision_id(text) and revision_seq(text) == seq else None

    def read_pointer(self, name: str) -> str | None:
        try:
            text = self.backend.read_small(f"{name}/{POINTER}").decode("ascii", "replace").strip()
        except (FileNotFoundError, NotADirectoryError):
            return None
        return text if is_revision_id(text) else None

    def latest(self, name: str) -> str | None:
        """LATEST, rolled forward over claims that follow it (writers that died before the pointer)."""
        revision = self.read_pointer(name)
        seq = revision_seq(revision) if revision else 0
        while (following := self.read_claim(name, seq + 1)) is not None:
            revision, seq = following, seq + 1
        return revision

    def claim(self, name: str, revision: str) -> bool:
        """Try to win the revision's sequence number; False if another writer holds it."""
        return self.backend.create_exclusive(claim_path(name, revision_seq(revision)),
                                             revision.encode("ascii"))

    def set_pointer(self, name: str, revision: str) -> None:
        self.backend.replace_small(f"{name}/{POINTER}", revision.encode("ascii"))

    def committed(self, name: str) -> list[str]:
        """Committed revision ids still present, oldest first."""
        seqs = sorted(int(s) for s in self.backend.list_dir(f"{name}/{CLAIMS_DIR}") if s.isdigit())
        by_seq: dict[int, list[str]] = {}
        for entry in self.backend.list_dir(name):
            if is_revision_id(entry):
                by_seq.setdefault(revision_seq(entry), []).append(entry)
        revisions = []
        for seq in seqs:
            candidates = by_seq.get(seq, [])
            # A claim always has its directory (created before, removed after the claim); with one
            # candidate directory it is the claimed one. Several: dead writers' leftovers, ask the claim.
            if len(candidates) == 1:
                revisions.append(candidates[0])
            elif candidates and (winner := self.read_claim(name, seq)) in candidates:
                revisions.append(winner)
        return revisions

    def resolve(self, name: str, rev: str) -> str:
        """A full revision id for `rev` (a full id or a bare sequence number) if it is committed."""
        seq = revision_seq(rev) if is_revision_id(rev) else int(rev)
        winner = self.read_claim(name, seq)
        if winner is not None and (winner == rev or not is_revision_id(rev)):
            return winner
        if self.latest(name) is None:
            raise AdapterNotFoundError(f"adapter {name!r} not found in store {self.backend.url}")
        raise RevisionNotFoundError(f"adapter {name!r} has no revision {rev!r}")
