"""Helpers for the fault-injection tests and the soak script: a TCP proxy that can cut the S3 endpoint
off (moto keeps its in-memory data), finding and killing Serve replica actors, replica memory, and
small HTTP helpers that retry on retryable statuses.

Imported by module name (tests/faults is on sys.path under pytest; benchmarks/soak.py adds it). It knows
nothing about the app's internals beyond Serve's actor naming ("SERVE_REPLICA::app#Deployment#id").
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import time

import httpx

from testkit import free_port, wait_for  # noqa: F401  (re-exported for the fault tests)

logger = logging.getLogger(__name__)

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
AWS_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")
RETRYABLE = (429, 503)


class TcpProxy:
    """Forwards 127.0.0.1:port -> target; `down()` resets open connections and refuses new ones
    (accepted, then closed at once) until `up()`. The server behind it keeps running and its data."""

    def __init__(self, target_host: str, target_port: int):
        self.target = (target_host, target_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self.is_up = True
        self._closed = False
        threading.Thread(target=self._accept_loop, name="tcp-proxy", daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def down(self) -> None:
        with self._lock:
            self.is_up = False
            sockets, self._open = list(self._open), set()
        for sock in sockets:
            _close(sock)

    def up(self) -> None:
        with self._lock:
            self.is_up = True

    def close(self) -> None:
        self._closed = True
        self.down()
        _close(self._listener)

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if not self.is_up:
                _reset(client)
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                _reset(client)
                continue
            with self._lock:
                self._open.update((client, upstream))
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(source, sink), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while chunk := source.recv(65536):
                sink.sendall(chunk)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with self._lock:
                    self._open.discard(sock)
                _close(sock)


def _reset(sock: socket.socket) -> None:
    # SO_LINGER 0: the peer sees a connection reset, as from an endpoint that went away.
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    except OSError:
        pass
    _close(sock)


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


def worker_env(s3_endpoint: str) -> dict:
    """Environment of every Ray worker: repo on the path, model cache, S3 through `s3_endpoint`."""
    env = {"PYTHONPATH": os.pathsep.join([HERE, REPO]), "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": "1", "AWS_ENDPOINT_URL": s3_endpoint,
           "ONLINE_LLM_CACHE": os.environ.get("ONLINE_LLM_CACHE", os.path.join(REPO, ".cache"))}
    env.update({key: os.environ.get(key, "testing") for key in AWS_KEYS})
    env["AWS_DEFAULT_REGION"] = os.environ.get("AWS_DEFAULT_REGION", "us-east-1")
    return env


# -- Serve replicas ----------------------------------------------------------------------------------

def replica_actor_names(app: str, deployment: str) -> list[str]:
    """Names of the live replica actors of one deployment."""
    import ray

    prefix = f"SERVE_REPLICA::{app}#{deployment}#"
    return sorted(entry["name"] for entry in ray.util.list_named_actors(all_namespaces=True)
                  if entry["name"].startswith(prefix))


def kill_replica(app: str, deployment: str, index: int = 0) -> str:
    """ray.kill one replica actor (no restart: Serve's controller must bring a replacement up)."""
    import ray

    name = replica_actor_names(app, deployment)[index]
    ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
    logger.info("killed %s", name)
    return name


def running_replicas(app: str, deployment: str) -> int:
    from ray import serve

    status = serve.status().applications[app].deployments[deployment]
    return int(status.replica_states.get("RUNNING", 0))


def replica_pids(app: str) -> dict[str, int]:
    """{actor name: pid} of every live replica of `app` (from the GCS: no dashboard needed)."""
    from ray._private import state

    prefix = f"SERVE_REPLICA::{app}#"
    return {actor["Name"]: actor["Pid"] for actor in state.actors().values()
            if actor.get("State") == "ALIVE" and actor.get("Pid")
            and (actor.get("Name") or "").startswith(prefix)}


def rss_bytes(pids: dict[str, int]) -> dict[str, int]:
    import psutil

    sizes = {}
    for name, pid in pids.items():
        try:
            sizes[name] = psutil.Process(pid).memory_info().rss
        except psutil.Error:
            continue
    return sizes


# -- HTTP ------------------------------------------------------------------------------------------

def post_with_retry(url: str, body: dict, *, deadline_s: float = 60.0, timeout_s: float = 60.0):
    """POST until the status is not retryable (429/503) or the deadline passes; (response, tries)."""
    end = time.monotonic() + deadline_s
    tries = 0
    while True:
        tries += 1
        try:
            response = httpx.post(url, json=body, timeout=timeout_s)
        except httpx.TransportError:
            response = None
        if response is not None and response.status_code not in RETRYABLE:
            return response, tries
        if time.monotonic() > end:
            return response, tries
        retry_after = float(response.headers.get("Retry-After", 0.5)) if response is not None else 0.5
        time.sleep(min(retry_after, 1.0))
