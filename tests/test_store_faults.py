"""Faults of issue 2: a writer SIGKILLed mid-commit, racing writer processes, read-only and missing
directories, an S3 endpoint that is down or answers 500/503. Readers must keep the last committed
revision, errors must be typed, and gc must clean up what dead writers left.
"""
from __future__ import annotations

import http.client
import http.server
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from adapters_store import StorePermissionError, StoreUnavailableError, open_store
from adapters_store.backends import make_backend
from adapters_store.store import AdapterStore
from adapters_store.testing import lora_config, random_lora

# The child writer: commits one revision, pausing at the point the test names (so it can be killed
# there, or so that two writers reach their claim together).
CHILD_WRITER = r"""
import os, sys, time
from adapters_store import CommitConflictError
from adapters_store.backends import make_backend
from adapters_store.store import AdapterStore
from adapters_store.testing import lora_config, random_lora

url, mode, signal_dir, parent = sys.argv[1:5]
store = AdapterStore(make_backend(url))

def pause(tag):
    open(os.path.join(signal_dir, f"{tag}-{os.getpid()}"), "w").close()
    while not os.path.exists(os.path.join(signal_dir, "go")):
        time.sleep(0.01)

def wrap(obj, attribute, before):
    original = getattr(obj, attribute)
    def wrapped(*args, **kwargs):
        before(args)
        return original(*args, **kwargs)
    setattr(obj, attribute, wrapped)

if mode == "mid-file":
    write = store.backend.write_parts
    def half_then_pause(path, parts, progress=None):
        if path.endswith("adapter_model.safetensors"):
            data = b"".join(parts)
            write(path, [memoryview(data)[: len(data) // 2]])
            pause("paused")
        return write(path, parts, progress)
    store.backend.write_parts = half_then_pause
elif mode in ("before-claim", "race"):
    wrap(store.log, "claim", lambda args: pause("paused"))
elif mode == "before-pointer":
    wrap(store.log, "set_pointer", lambda args: pause("paused"))
try:
    revision = store.commit("victim", random_lora(seed=os.getpid()), config=lora_config(),
                            parent=None if parent == "-" else parent)
    print("won", revision, flush=True)
except CommitConflictError as exc:
    print("conflict", exc, flush=True)
"""


@pytest.fixture
def start_writer():
    """Starts child writers; any still running when the test ends (it failed) is killed."""
    started: list[subprocess.Popen] = []

    def start(url: str, mode: str, signal_dir: Path, parent: str | None) -> subprocess.Popen:
        process = subprocess.Popen([sys.executable, "-c", CHILD_WRITER, url, mode, str(signal_dir),
                                    parent or "-"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True)
        started.append(process)
        return process

    yield start
    for process in started:
        if process.poll() is None:
            process.kill()
        process.wait(30)
        for stream in (process.stdout, process.stderr):
            stream.close()


def wait_for_signals(signal_dir: Path, count: int, processes: list[subprocess.Popen]) -> None:
    deadline = time.time() + 60
    while len(list(signal_dir.glob("paused-*"))) < count:
        for process in processes:
            assert process.poll() is None, process.stderr.read()
        assert time.time() < deadline, "child writers never reached their pause point"
        time.sleep(0.02)


@pytest.fixture(params=["local", "s3"])
def shared_url(request, tmp_path):
    """A store URL that several processes can open."""
    if request.param == "local":
        return str(tmp_path / "store")
    return request.getfixturevalue("s3_store_url")


@pytest.mark.parametrize("kill_point", ["mid-file", "before-claim", "before-pointer"])
def test_writer_killed_mid_commit(tmp_path, kill_point, start_writer):
    url = str(tmp_path / "store")
    store = open_store(url)
    previous = store.commit("victim", random_lora(seed=1), config=lora_config(), parent=None)
    writer = start_writer(url, kill_point, tmp_path, previous)
    wait_for_signals(tmp_path, 1, [writer])
    writer.send_signal(signal.SIGKILL)
    writer.wait(30)
    if kill_point == "before-pointer":
        # The claim was made: the revision is complete and committed; readers roll LATEST forward.
        (newer,) = [r for r in store.list_revisions("victim") if r != previous]
        assert store.latest("victim") == newer and store.read("victim").meta["parent"] == previous
        assert store.gc(grace_s=0) == []
        return
    assert store.latest("victim") == previous and store.read("victim").revision == previous
    assert store.list_revisions("victim") == [previous]
    orphans = [e for e in store.backend.list_dir("victim") if e[0].isdigit() and e != previous]
    assert len(orphans) == 1
    left_behind = store.backend.list_dir(f"victim/{orphans[0]}")
    assert ("meta.json" in left_behind) == (kill_point == "before-claim")  # died where it was told
    assert store.gc(grace_s=3600) == []
    assert store.gc(grace_s=0) == [f"victim/{orphans[0]}"]
    assert [e for e in store.backend.list_dir("victim") if e[0].isdigit()] == [previous]
    assert store.commit("victim", random_lora(), config=lora_config(), parent=previous)


def test_writer_killed_before_its_claim_on_s3(s3_store_url, tmp_path, start_writer):
    store = open_store(s3_store_url)
    previous = store.commit("victim", random_lora(seed=1), config=lora_config(), parent=None)
    writer = start_writer(s3_store_url, "before-claim", tmp_path, previous)
    wait_for_signals(tmp_path, 1, [writer])
    writer.send_signal(signal.SIGKILL)
    writer.wait(30)
    assert store.read("victim").revision == previous and store.list_revisions("victim") == [previous]
    (orphan,) = store.gc(grace_s=0)
    assert orphan.startswith("victim/000002-")


def test_two_writer_processes_on_one_parent(shared_url, tmp_path, start_writer):
    store = open_store(shared_url)
    parent = store.commit("victim", random_lora(seed=1), config=lora_config(), parent=None)
    writers = [start_writer(shared_url, "race", tmp_path, parent) for _ in range(2)]
    wait_for_signals(tmp_path, 2, writers)  # both wrote their files and passed the parent check
    (tmp_path / "go").touch()
    outputs = [writer.communicate(timeout=60)[0].split() for writer in writers]
    assert sorted(out[0] for out in outputs) == ["conflict", "won"], outputs
    (winner,) = [out[1] for out in outputs if out[0] == "won"]
    assert store.latest("victim") == winner and store.list_revisions("victim") == [parent, winner]
    assert store.read("victim").meta["parent"] == parent
    assert store.gc(grace_s=0) == []  # the loser removed its own files


def without_root_privileges() -> list[str]:
    """Command prefix that makes a root process obey permission bits (root otherwise ignores them)."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: a read-only directory cannot be simulated")
    caps = "-dac_override,-dac_read_search,-fowner"
    return ["setpriv", f"--inh-caps={caps}", f"--bounding-set={caps}", "--"]


def test_read_only_directory(tmp_path):
    store = open_store(str(tmp_path / "store"))
    revision = store.commit("kept", random_lora(), config=lora_config(), parent=None)
    directories = [p for p in [tmp_path / "store", *(tmp_path / "store").rglob("*")] if p.is_dir()]
    for path in directories:
        os.chmod(path, 0o555)
    script = ("import sys\nfrom adapters_store import open_store, StorePermissionError\n"
              "from adapters_store.testing import lora_config, random_lora\n"
              "s = open_store(sys.argv[1], create=False)\nprint(s.read('kept').revision)\n"
              "try:\n    s.commit('kept', random_lora(), config=lora_config(), parent=sys.argv[2])\n"
              "except StorePermissionError as e:\n    print('refused', e)\n")
    try:
        result = subprocess.run([*without_root_privileges(), sys.executable, "-c", script,
                                 str(tmp_path / "store"), revision],
                                capture_output=True, text=True, timeout=60)
    finally:
        for path in directories:
            os.chmod(path, stat.S_IRWXU)
    lines = result.stdout.splitlines()
    assert lines[0] == revision and lines[1].startswith("refused"), result.stderr
    assert "kept" in lines[1]
    assert store.list_revisions("kept") == [revision] and store.read("kept").revision == revision


def test_missing_local_directory(tmp_path):
    with pytest.raises(StoreUnavailableError, match="does not exist"):
        open_store(str(tmp_path / "absent"), create=False)
    store = open_store(str(tmp_path / "vanishing"))
    store.commit("a", random_lora(), config=lora_config(), parent=None)
    shutil.rmtree(tmp_path / "vanishing")
    with pytest.raises(StoreUnavailableError):
        store.list_adapters()


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


FAST_FAIL = {"config_kwargs": {"retries": {"total_max_attempts": 1}, "connect_timeout": 2}}


def fail_fast(store: AdapterStore) -> AdapterStore:
    """No s3fs retry loop (about 1 s of backoff per failing call): these tests expect failures."""
    store.backend.fs.retries = 1
    return store


def test_s3_endpoint_down(s3_server):
    options = {**FAST_FAIL, "endpoint_url": f"http://127.0.0.1:{_closed_port()}"}
    with pytest.raises(StoreUnavailableError):
        open_store("s3://nowhere-bucket/adapters", storage_options=options)
    store = fail_fast(AdapterStore(make_backend("s3://nowhere-bucket/adapters", options)))
    with pytest.raises(StoreUnavailableError, match="nowhere-bucket"):
        store.commit("a", random_lora(), config=lora_config(), parent=None)
    for operation in (lambda: store.read("a"), lambda: store.latest("a"), store.list_adapters):
        with pytest.raises(StoreUnavailableError):
            operation()


class FaultProxy:
    """An HTTP proxy to the moto server that answers `status` instead to requests whose method is in
    `methods` and whose path contains `match`, while `status` is set."""

    def __init__(self, upstream: str):
        self.status, self.methods, self.match = None, ("GET", "PUT", "HEAD", "POST", "DELETE"), ""
        upstream_port, proxy = int(upstream.rsplit(":", 1)[1]), self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def handle_any(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                if proxy.status and self.command in proxy.methods and proxy.match in self.path:
                    return self.answer(proxy.status, [], b"<Error><Code>InternalError</Code></Error>")
                conn = http.client.HTTPConnection("127.0.0.1", upstream_port, timeout=30)
                conn.request(self.command, self.path, body=body, headers=dict(self.headers.items()))
                response = conn.getresponse()
                self.answer(response.status, response.getheaders(), response.read())
                conn.close()

            def answer(self, status, headers, payload):
                self.send_response(status)
                for key, value in headers:
                    if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(payload)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = handle_any

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fault_proxy(s3_server):
    proxy = FaultProxy(s3_server)
    yield proxy
    proxy.close()


@pytest.mark.parametrize("status", [500, 503])
def test_s3_answering_server_errors_loses_nothing(fault_proxy, s3_bucket, status):
    store = fail_fast(open_store(f"s3://{s3_bucket}/adapters",
                                 storage_options={**FAST_FAIL, "endpoint_url": fault_proxy.url}))
    first = store.commit("kept", random_lora(seed=1), config=lora_config(), parent=None)
    fault_proxy.status = status
    operations = [lambda: store.commit("kept", random_lora(), config=lora_config(), parent=first),
                  lambda: store.read("kept"), lambda: store.latest("kept"), store.list_adapters]
    for operation in operations:
        with pytest.raises(StoreUnavailableError):
            operation()
    fault_proxy.methods = ("PUT",)  # reads work again, writes still fail
    with pytest.raises(StoreUnavailableError):
        store.commit("kept", random_lora(), config=lora_config(), parent=first)
    assert store.read("kept").revision == first
    fault_proxy.status = None
    assert store.latest("kept") == first and store.list_revisions("kept") == [first]
    assert store.commit("kept", random_lora(), config=lora_config(), parent=first).startswith("000002-")


def test_s3_pointer_write_failing_after_the_claim_still_commits(fault_proxy, s3_bucket):
    store = fail_fast(open_store(f"s3://{s3_bucket}/adapters",
                                 storage_options={**FAST_FAIL, "endpoint_url": fault_proxy.url}))
    first = store.commit("kept", random_lora(seed=1), config=lora_config(), parent=None)
    fault_proxy.status, fault_proxy.methods, fault_proxy.match = 503, ("PUT",), "/LATEST"
    second = store.commit("kept", random_lora(seed=2), config=lora_config(), parent=first)
    assert store.latest("kept") == second and store.read("kept").meta["parent"] == first
    with pytest.raises(StoreUnavailableError):
        open_store(f"s3://{s3_bucket}/adapters", storage_options={
            **FAST_FAIL, "endpoint_url": f"http://127.0.0.1:{_closed_port()}"})
    assert isinstance(StorePermissionError("x"), PermissionError)
