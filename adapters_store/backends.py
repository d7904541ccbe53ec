"""The primitive file operations the store is built on, one class per kind of storage.

Paths are relative to the store root and always '/'-separated. Each backend offers: read bytes, write
bytes, exclusive-create a small file (the commit claim), atomically replace a small file (the LATEST
pointer), list, delete, sizes and modification times. Storage errors become typed errors
(StoreUnavailableError, StorePermissionError); FileNotFoundError / FileExistsError pass through
because callers give them meaning. Knows nothing about adapters, revisions or the commit protocol.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import errno
import logging
import os
import posixpath
import threading
import uuid
from typing import Callable, Iterator
from urllib.parse import urlsplit, urlunsplit

import fsspec

from adapters_store.errors import OnlineLLMError, StorePermissionError, StoreUnavailableError

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[int], None]
ChunkCallback = Callable[[memoryview], None]
CHUNK_BYTES = 8 * 2**20
_PERMISSION_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS}


def redact_url(url: str) -> str:
    """The URL without any user:password@ part, for display and logs."""
    parts = urlsplit(url)
    if parts.password is None and parts.username is None:
        return url
    host = parts.hostname or ""
    return urlunsplit((parts.scheme, host + (f":{parts.port}" if parts.port else ""), parts.path,
                       parts.query, parts.fragment))


def _is_connection_error(exc: BaseException) -> bool:
    """botocore/aiohttp errors that mean 'the endpoint did not answer properly'. Matched by class
    name so that local-only installs need neither package."""
    names = {cls.__name__ for cls in type(exc).__mro__}
    return bool(names & {"BotoCoreError", "ClientError", "ClientConnectionError",
                         "ServerDisconnectedError", "ClientResponseError"})


class Backend:
    """Generic fsspec backend; subclasses replace the operations their storage can do atomically."""

    def __init__(self, fs: fsspec.AbstractFileSystem, root: str, url: str):
        self.fs, self.root, self.url = fs, root.rstrip("/"), redact_url(url)
        self._create_lock = threading.Lock()

    # --- paths and error mapping -------------------------------------------------------------
    def full(self, rel: str) -> str:
        return f"{self.root}/{rel}" if rel else self.root

    def url_of(self, rel: str) -> str:
        """Display/fsspec URL of a relative path (no credentials)."""
        return f"{self.url.rstrip('/')}/{rel}" if rel else self.url

    @contextlib.contextmanager
    def mapped(self, operation: str, rel: str) -> Iterator[None]:
        """Turn storage failures into typed store errors that name the store and the path."""
        try:
            yield
        except (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
                OnlineLLMError):
            raise
        except PermissionError as exc:
            raise StorePermissionError(f"store {self.url}: {operation} {rel!r} refused: {exc}") from exc
        except OSError as exc:
            if exc.errno in _PERMISSION_ERRNOS:
                raise StorePermissionError(f"store {self.url}: {operation} {rel!r} refused: {exc}") from exc
            raise StoreUnavailableError(f"store {self.url}: {operation} {rel!r} failed: {exc}") from exc
        except Exception as exc:
            if _is_connection_error(exc):
                raise StoreUnavailableError(
                    f"store {self.url}: {operation} {rel!r} failed: {type(exc).__name__}: {exc}") from exc
            raise

    # --- primitives ------------------------------------------------------------------------------
    def read_bytes(self, rel: str, progress: ProgressCallback | None = None,
                   on_chunk: ChunkCallback | None = None) -> bytes:
        """The file's content; `on_chunk` sees every piece as it arrives (e.g. to hash while reading)."""
        with self.mapped("read", rel):
            if progress is None:
                data = self.fs.cat_file(self.full(rel))
            else:
                parts = []
                with self.fs.open(self.full(rel), "rb") as handle:
                    while chunk := handle.read(CHUNK_BYTES):
                        parts.append(chunk)
                        progress(len(chunk))
                data = b"".join(parts)
        if on_chunk is not None:
            on_chunk(memoryview(data))
        return data

    def read_small(self, rel: str) -> bytes:
        """Content of a small file (pointer, claim, manifest): one request where the storage allows."""
        return bytes(self.read_bytes(rel))

    def write_bytes(self, rel: str, data: bytes | bytearray | memoryview,
                    progress: ProgressCallback | None = None) -> None:
        self.write_parts(rel, [memoryview(data)], progress)

    def write_parts(self, rel: str, parts: list[memoryview],
                    progress: ProgressCallback | None = None) -> None:
        """Write the concatenation of `parts` as one file."""
        with self.mapped("write", rel):
            if progress is None:
                self.fs.pipe_file(self.full(rel), b"".join(parts))
                return
            with self.fs.open(self.full(rel), "wb") as handle:
                for chunk in _chunks(parts):
                    handle.write(chunk)
                    progress(len(chunk))

    def create_exclusive(self, rel: str, data: bytes) -> bool:
        """Create `rel` with `data` unless it exists; True if this call created it.
        Generic fsspec: atomic only within this process (memory:// lives in one process anyway)."""
        with self._create_lock, self.mapped("create", rel):
            if self.fs.exists(self.full(rel)):
                return False
            self.fs.pipe_file(self.full(rel), data)
            return True

    def replace_small(self, rel: str, data: bytes) -> None:
        """Replace a small file in one step (readers see the old or the new content)."""
        with self.mapped("replace", rel):
            self.fs.pipe_file(self.full(rel), data)

    def exists(self, rel: str) -> bool:
        with self.mapped("stat", rel):
            return self.fs.exists(self.full(rel))

    def list_dir(self, rel: str) -> list[str]:
        """Base names of the entries directly under `rel`; [] when it does not exist."""
        with self.mapped("list", rel):
            try:
                entries = self.fs.ls(self.full(rel), detail=False)
            except (FileNotFoundError, NotADirectoryError):
                return []
        names = {posixpath.basename(str(entry).rstrip("/")) for entry in entries}
        return sorted(name for name in names if name and name != posixpath.basename(self.full(rel)))

    def file_stats(self, rel: str) -> list[tuple[str, int, float | None]]:
        """(base name, size, mtime epoch seconds or None) of the files directly under `rel`."""
        with self.mapped("list", rel):
            try:
                entries = self.fs.ls(self.full(rel), detail=True)
            except (FileNotFoundError, NotADirectoryError):
                return []
        return [(posixpath.basename(e["name"].rstrip("/")), int(e.get("size") or 0), _mtime_of(e))
                for e in entries if e.get("type") == "file"]

    def modified(self, rel: str) -> float | None:
        """Modification time of a directory (epoch seconds), where the storage keeps one."""
        return None

    def remove_tree(self, rel: str) -> bool:
        """Delete `rel` and everything under it; False if nothing was there."""
        with self.mapped("delete", rel):
            try:
                self.fs.rm(self.full(rel), recursive=True)
            except FileNotFoundError:
                return False
            return True

    def remove_file(self, rel: str) -> None:
        with self.mapped("delete", rel):
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(self.full(rel))

    def ensure_root(self, create: bool) -> None:
        """Create the root if asked (object stores need nothing); a missing bucket is unavailable."""
        with self.mapped("open", ""):
            if create:
                self.fs.makedirs(self.root, exist_ok=True)
            elif not self.fs.exists(self.root):
                raise StoreUnavailableError(f"store {self.url} does not exist")

    def local_path(self, rel: str) -> str | None:
        """A path on this machine's file system for `rel`, or None for remote storage."""
        return None


def _uninitialized_buffer(size: int):
    """A writable buffer of `size` bytes that is not zero-filled first (bytearray(n) would write every
    page once more before the read fills it): a numpy array, which supports the buffer protocol."""
    import numpy

    return numpy.empty(size, dtype=numpy.uint8)


def _chunks(parts: list[memoryview]) -> Iterator[memoryview]:
    """The bytes of `parts` in pieces of at most CHUNK_BYTES (for progress and bounded syscalls)."""
    for part in parts:
        flat = memoryview(part).cast("B")
        for start in range(0, len(flat), CHUNK_BYTES):
            yield flat[start:start + CHUNK_BYTES]


def _mtime_of(entry: dict) -> float | None:
    """Modification time from an fsspec listing entry, whichever key the backend uses."""
    for key in ("mtime", "LastModified", "last_modified", "created"):
        value = entry.get(key)
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, dt.datetime):
            return value.timestamp()
    return None


class S3Backend(Backend):
    """S3 (and S3-compatible) storage through s3fs; exclusive create uses a conditional PUT."""

    def read_small(self, rel: str) -> bytes:
        # max_concurrency=1 skips s3fs's size probe (HEAD, plus a listing when the key is missing).
        with self.mapped("read", rel):
            return self.fs.cat_file(self.full(rel), max_concurrency=1)

    def create_exclusive(self, rel: str, data: bytes) -> bool:
        with self.mapped("create", rel):
            try:
                self.fs.pipe_file(self.full(rel), data, mode="create")
            except FileExistsError:
                return False
            return True

    def ensure_root(self, create: bool) -> None:
        bucket = self.root.split("/", 1)[0]
        with self.mapped("open", ""):
            try:
                self.fs.ls(bucket, detail=False)  # exists() would hide a connection failure
            except FileNotFoundError:
                raise StoreUnavailableError(
                    f"store {self.url}: bucket {bucket!r} does not exist") from None


class LocalBackend(Backend):
    """A local directory: O_EXCL/link for claims, temp file + os.replace for the pointer, fsync."""

    def __init__(self, root: str, url: str, *, fsync: bool = True):
        super().__init__(fsspec.filesystem("file"), os.path.abspath(root), url)
        self.fsync = fsync

    def read_bytes(self, rel: str, progress: ProgressCallback | None = None,
                   on_chunk: ChunkCallback | None = None):
        """The content as a writable buffer (a numpy uint8 array) that tensors can view in place."""
        with self.mapped("read", rel), open(self.full(rel), "rb", buffering=0) as handle:
            size = os.fstat(handle.fileno()).st_size
            buffer = _uninitialized_buffer(size)
            view, done = memoryview(buffer).cast("B"), 0
            while done < size:
                count = handle.readinto(view[done:done + CHUNK_BYTES])
                if not count:
                    break  # file shrank while reading; the checksum will catch it
                if on_chunk:
                    on_chunk(view[done:done + count])
                done += count
                if progress:
                    progress(count)
            return buffer if done == size else bytearray(view[:done])

    def write_parts(self, rel: str, parts: list[memoryview],
                    progress: ProgressCallback | None = None) -> None:
        path = self.full(rel)
        with self.mapped("write", rel):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb", buffering=0) as handle:
                for chunk in _chunks(parts):
                    handle.write(chunk)
                    if progress:
                        progress(len(chunk))
                self._sync(handle.fileno())

    def create_exclusive(self, rel: str, data: bytes) -> bool:
        # Content first in a private temp file, then link(): the claim appears complete or not at all.
        path = self.full(rel)
        with self.mapped("create", rel):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            temp = self._write_temp(path, data)
            try:
                os.link(temp, path)
            except FileExistsError:
                return False
            finally:
                os.unlink(temp)
            self._sync_dir(os.path.dirname(path))
            return True

    def replace_small(self, rel: str, data: bytes) -> None:
        path = self.full(rel)
        with self.mapped("replace", rel):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            os.replace(self._write_temp(path, data), path)
            self._sync_dir(os.path.dirname(path))

    def ensure_root(self, create: bool) -> None:
        with self.mapped("open", ""):
            if create:
                os.makedirs(self.root, exist_ok=True)
            if not os.path.isdir(self.root):
                raise StoreUnavailableError(f"store {self.url}: directory does not exist")

    def local_path(self, rel: str) -> str | None:
        return self.full(rel)

    def modified(self, rel: str) -> float | None:
        try:
            return os.path.getmtime(self.full(rel))
        except OSError:
            return None

    def list_dir(self, rel: str) -> list[str]:
        if not rel and not os.path.isdir(self.root):
            raise StoreUnavailableError(f"store {self.url}: directory does not exist")
        return super().list_dir(rel)

    def _write_temp(self, path: str, data: bytes) -> str:
        temp = f"{os.path.dirname(path)}/.tmp-{uuid.uuid4().hex}"
        with open(temp, "wb") as handle:
            handle.write(data)
            handle.flush()
            self._sync(handle.fileno())
        return temp

    def _sync(self, fd: int) -> None:
        if self.fsync:
            os.fsync(fd)

    def _sync_dir(self, directory: str) -> None:
        if not self.fsync:
            return
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def make_backend(url: str, storage_options: dict | None = None) -> Backend:
    """The backend for a store URL: a path or file://, memory://, s3://, or any other fsspec URL."""
    options = dict(storage_options or {})
    protocol, _, rest = url.partition("://") if "://" in url else ("file", "", url)
    if protocol in ("file", "local"):
        return LocalBackend(os.path.expanduser(rest), url, fsync=options.pop("fsync", True))
    if protocol in ("s3", "s3a"):
        # Listings must never be cached: other processes commit to the same prefix.
        options.setdefault("use_listings_cache", False)
        fs = fsspec.filesystem("s3", **options)
        return S3Backend(fs, fs._strip_protocol(url), url)
    fs = fsspec.filesystem(protocol, **options)
    if protocol != "memory":
        logger.warning("store %s: exclusive create is only atomic within one process on %s://",
                       redact_url(url), protocol)
    return Backend(fs, fs._strip_protocol(url), url)
