"""The `adapters` command: inspect and manage an adapter store from the shell.

    adapters [--store URL] [--json] ls | info NAME | revisions NAME | rm NAME | import PATH NAME |
             export NAME[@REV] DEST | verify [NAME] | gc [--grace S] | prune NAME [--keep N]

Exit status 0 on success, 1 with a one-line message on stderr for any error, 2 for usage errors.
Knows nothing about serving; it only calls AdapterStore and interop.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from contextlib import contextmanager
from typing import Iterator

import fsspec

from adapters_store.errors import OnlineLLMError
from adapters_store.names import parse_ref
from adapters_store.store import AdapterStore, open_store
from adapters_store.validate import MODEL_FILE

PROGRESS_MIN_BYTES = 16 * 2**20  # show a bar only for transfers big enough to notice


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="adapters", description="Manage a LoRA adapter store.")
    parser.add_argument("--store", default=None, help="store URL (default: $LORA_SAVE_PATH)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("ls", help="list adapters")
    for command, text in (("info", "show an adapter"), ("revisions", "list revisions"),
                          ("rm", "delete an adapter and all its revisions")):
        sub.add_parser(command, help=text).add_argument("name")
    imp = sub.add_parser("import", help="import a PEFT directory or a legacy .pt file")
    imp.add_argument("path")
    imp.add_argument("name")
    exp = sub.add_parser("export", help="write a revision as a PEFT directory")
    exp.add_argument("name", help="NAME or NAME@REV")
    exp.add_argument("dest")
    sub.add_parser("verify", help="check every revision's files").add_argument("name", nargs="?")
    gc = sub.add_parser("gc", help="remove files of commits that never completed")
    gc.add_argument("--grace", type=float, default=3600.0, help="only files older than this (s)")
    prune = sub.add_parser("prune", help="delete old revisions")
    prune.add_argument("name")
    prune.add_argument("--keep", type=int, default=5)
    return parser


@contextmanager
def progress_bar(description: str, total: int | None) -> Iterator:
    """A byte-count callback drawing a tqdm bar on a TTY for large transfers; else a no-op."""
    if not sys.stderr.isatty() or total is None or total < PROGRESS_MIN_BYTES:
        yield None
        return
    from tqdm import tqdm

    with tqdm(total=total, desc=description, unit="B", unit_scale=True, file=sys.stderr) as bar:
        yield bar.update


def _file_size(path: str) -> int | None:
    try:
        fs, root = fsspec.core.url_to_fs(path)
        target = root if fs.isfile(root) else f"{root.rstrip('/')}/{MODEL_FILE}"
        return int(fs.size(target))
    except (OSError, ValueError):
        return None


def run_command(store: AdapterStore, args: argparse.Namespace):
    """Execute one subcommand; returns (result for --json, text lines, ok)."""
    if args.command in ("import", "export"):
        return _run_transfer(store, args)
    if args.command == "ls":
        names = store.list_adapters()
        return names, names, True
    if args.command == "info":
        info = store.info(args.name)
        return info, [f"{key}: {json.dumps(value, default=str)}" for key, value in info.items()], True
    if args.command == "revisions":
        revisions = store.list_revisions(args.name)
        if not revisions:
            store.info(args.name)  # raises AdapterNotFoundError with the store in the message
        return revisions, revisions, True
    if args.command == "rm":
        if not store.delete(args.name):
            raise OnlineLLMError(f"adapter {args.name!r} not found in store {store.url}")
        return {"deleted": args.name}, [f"deleted {args.name}"], True
    return _run_maintenance(store, args)


def _run_maintenance(store: AdapterStore, args: argparse.Namespace):
    if args.command == "verify":
        rows = store.verify(args.name)
        lines = [f"{r['name']}@{r['revision']}: " + ("ok" if r["ok"] else f"FAILED {r['error']}")
                 for r in rows]
        failed = sum(not r["ok"] for r in rows)
        if failed:
            print(f"adapters: error: {failed} of {len(rows)} revisions failed verification",
                  file=sys.stderr)
        return rows, lines, not failed
    if args.command == "gc":
        removed = store.gc(args.grace)
        return removed, [f"removed {path}" for path in removed], True
    deleted = store.prune(args.name, keep=args.keep)
    return deleted, [f"deleted {args.name}@{rev}" for rev in deleted], True


def _run_transfer(store: AdapterStore, args: argparse.Namespace):
    # interop imports torch (slow to start): only the commands that move tensors load it.
    from adapters_store.interop import export_revision, import_path

    if args.command == "import":
        with progress_bar(f"import {args.name}", _file_size(args.path)) as callback:
            revision = import_path(store, args.path, args.name, progress=callback)
        return {"name": args.name, "revision": revision}, [f"{args.name}@{revision}"], True
    name, rev = parse_ref(args.name)
    size = _file_size(store.revision_url(name, rev or store.latest(name) or "1"))
    with progress_bar(f"export {name}", size) as callback:
        revision = export_revision(store, name, args.dest, rev, progress=callback)
    return {"name": name, "revision": revision, "dest": args.dest}, \
        [f"exported {name}@{revision} to {args.dest}"], True


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        store = open_store(args.store, create=args.command == "import")
        if store is None:
            print("adapters: no store: pass --store URL or set LORA_SAVE_PATH", file=sys.stderr)
            return 2
        result, lines, ok = run_command(store, args)
    except (OnlineLLMError, OSError, ValueError) as exc:
        message = " ".join(str(exc).split()) or type(exc).__name__
        print(f"adapters: error: {message}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    else:
        for line in lines:
            print(line)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
