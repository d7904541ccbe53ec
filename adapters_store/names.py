"""Adapter names, `name@rev` references and revision ids: parsing and validation only.

Knows nothing about where adapters are stored; every path the store builds starts from a name that
passed `validate_name`, so no name can escape the store root or alias another adapter.
"""
from __future__ import annotations

import re
import uuid

from adapters_store.errors import InvalidAdapterNameError

# ASCII only on purpose: unicode look-alikes ("аdapter" with a Cyrillic a) are refused, not folded.
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
REVISION_PATTERN = re.compile(r"(\d{6})-([0-9a-f]{8})")
SEQ_PATTERN = re.compile(r"\d{1,9}")
MAX_NAME_LENGTH = 128


def validate_name(name: object) -> str:
    """Return `name` unchanged if it is an acceptable adapter name, else raise InvalidAdapterNameError."""
    if not isinstance(name, str):
        raise InvalidAdapterNameError(f"adapter name must be a string, got {type(name).__name__}")
    if not NAME_PATTERN.fullmatch(name):
        raise InvalidAdapterNameError(
            f"invalid adapter name {name[:40]!r}: use 1-{MAX_NAME_LENGTH} ASCII letters, digits, "
            "'.', '_' or '-', starting with a letter or digit")
    # The pattern already forbids a leading dot; this guards the rule if the pattern ever changes.
    if set(name) == {"."}:
        raise InvalidAdapterNameError(f"invalid adapter name {name!r}")
    return name


def is_revision_id(text: str) -> bool:
    """True for a full revision id such as '000003-1f2e3d4c'."""
    return isinstance(text, str) and REVISION_PATTERN.fullmatch(text) is not None


def revision_seq(revision: str) -> int:
    """The sequence number of a full revision id ('000003-1f2e3d4c' -> 3)."""
    match = REVISION_PATTERN.fullmatch(revision) if isinstance(revision, str) else None
    if match is None:
        raise InvalidAdapterNameError(f"invalid revision id {str(revision)[:40]!r}")
    return int(match.group(1))


def new_revision_id(seq: int) -> str:
    """A fresh revision id for `seq`; the random suffix keeps racing writers' files apart."""
    if not 1 <= seq <= 999_999:
        raise ValueError(f"revision sequence out of range: {seq}")
    return f"{seq:06d}-{uuid.uuid4().hex[:8]}"


def validate_revision_ref(rev: str) -> str:
    """Accept a full revision id or a bare sequence number ('3'); return it unchanged."""
    if is_revision_id(rev) or (isinstance(rev, str) and SEQ_PATTERN.fullmatch(rev) and int(rev) > 0):
        return rev
    raise InvalidAdapterNameError(
        f"invalid revision {str(rev)[:40]!r}: expected an id like 000003-1f2e3d4c or a number")


def parse_ref(ref: str) -> tuple[str, str | None]:
    """Split 'name' or 'name@rev' into (name, rev or None); both parts are validated."""
    if not isinstance(ref, str):
        raise InvalidAdapterNameError(f"adapter reference must be a string, got {type(ref).__name__}")
    name, sep, rev = ref.partition("@")
    validate_name(name)
    if not sep:
        return name, None
    return name, validate_revision_ref(rev)


def format_ref(name: str, revision: str | None) -> str:
    """'name@rev', or the bare name when there is no revision."""
    return f"{name}@{revision}" if revision else name
