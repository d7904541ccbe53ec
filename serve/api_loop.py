"""A private asyncio event loop on a daemon thread, so blocking callers can run coroutines.

`OnlineLLM` is called from plain synchronous code, from threads of a running event loop's
executor, and sometimes from inside a running loop's own thread. `asyncio.run` fails in the last
case and would build a new loop per call in the others; instead every blocking call submits its
coroutine to this one long-lived loop and waits on the concurrent future.

Knows nothing about models, adapters or the engine; it only runs coroutines.
"""
from __future__ import annotations

import asyncio
import threading
from concurrent.futures import Future
from typing import Any, Coroutine


class LoopThread:
    """Starts its loop thread on first use; `close()` stops it (it is a daemon either way)."""

    def __init__(self, name: str = "online-llm-api-loop"):
        self._name = name
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def run(self, coro: Coroutine[Any, Any, Any], timeout: float | None = None) -> Any:
        """Run `coro` on the private loop and block until it finishes; returns its result or raises."""
        return self.submit(coro).result(timeout)

    def submit(self, coro: Coroutine[Any, Any, Any]) -> Future:
        """Schedule `coro` on the private loop; returns a thread-safe concurrent future."""
        loop = self._ensure_started()
        if threading.current_thread() is self._thread:
            coro.close()
            # Waiting here for a coroutine of this very loop would wait forever.
            raise RuntimeError("a blocking OnlineLLM method was called from its own loop thread")
        return asyncio.run_coroutine_threadsafe(coro, loop)

    def close(self) -> None:
        """Stop the loop and join its thread; later calls start a fresh one."""
        with self._lock:
            loop, thread = self._loop, self._thread
            self._loop = self._thread = None
        if loop is None or thread is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        if not thread.is_alive():
            loop.close()

    def _ensure_started(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                started = threading.Event()
                thread = threading.Thread(target=self._serve, args=(loop, started),
                                          name=self._name, daemon=True)
                thread.start()
                started.wait()
                self._loop, self._thread = loop, thread
            return self._loop

    @staticmethod
    def _serve(loop: asyncio.AbstractEventLoop, started: threading.Event) -> None:
        asyncio.set_event_loop(loop)
        loop.call_soon(started.set)
        loop.run_forever()
