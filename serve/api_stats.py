"""Renders the API's stats dict as a plain-text two-column table (for `stats(show_detailed=True)`),
and reads this process's resident memory.

Nested dicts (the engine's figures) are flattened to dotted keys; long lists are shortened.
Knows nothing about where the figures come from.
"""
from __future__ import annotations

import os
from typing import Any, Iterator

MAX_LIST_ITEMS = 8


def _flatten(prefix: str, value: Any) -> Iterator[tuple[str, str]]:
    if isinstance(value, dict):
        for key, inner in value.items():
            yield from _flatten(f"{prefix}.{key}" if prefix else str(key), inner)
        return
    if isinstance(value, (list, tuple, set)):
        items = [str(item) for item in value]
        shown = ", ".join(items[:MAX_LIST_ITEMS])
        extra = len(items) - MAX_LIST_ITEMS
        yield prefix, shown + (f", ... (+{extra})" if extra > 0 else "")
        return
    if isinstance(value, float):
        yield prefix, f"{value:.4g}"
        return
    yield prefix, "-" if value is None else str(value)


def render_table(stats: dict) -> str:
    """'key | value' rows under a header, keys left-aligned to the longest one."""
    rows = list(_flatten("", stats))
    width = max([len("figure")] + [len(key) for key, _ in rows])
    lines = [f"{'figure'.ljust(width)} | value", f"{'-' * width}-+-{'-' * 24}"]
    lines += [f"{key.ljust(width)} | {value}" for key, value in rows]
    return "\n".join(lines)


def process_rss_bytes() -> int | None:
    """Resident set size of this process (Linux /proc), None where it cannot be read."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None
