"""The single sync/async bridge: one long-lived event loop running in a daemon thread.

taskiq is async only, while Dagster's executor loop and run launcher are synchronous. Running
``asyncio.run`` per call breaks connection pools that stay bound to a closed loop, so every sync
caller goes through one :class:`AsyncBridge`, which owns a loop for its whole life. After a fork
the child gets a fresh loop on first use (the parent's thread does not exist in the child).
"""

import asyncio
import os
import threading
from collections.abc import Awaitable, Callable, Coroutine
from concurrent.futures import TimeoutError as FutureTimeoutError
from typing import Any, TypeVar

T = TypeVar("T")


class AsyncBridge:
    """Runs coroutines on a private event loop thread and waits for them synchronously."""

    def __init__(self, name: str = "dagster-taskiq-bridge") -> None:
        self._name = name
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._pid = -1
        self._on_reset: list[Callable[[], None]] = []

    def on_reset(self, callback: Callable[[], None]) -> None:
        """Register ``callback`` to drop loop-bound state when a fork gives us a new loop."""
        self._on_reset.append(callback)

    def _ensure_loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is not None and self._pid == os.getpid() and not self._loop.is_closed():
                return self._loop
            if self._pid not in (-1, os.getpid()):
                for callback in self._on_reset:
                    callback()
            loop = asyncio.new_event_loop()
            ready = threading.Event()

            def _run() -> None:
                asyncio.set_event_loop(loop)
                loop.call_soon(ready.set)
                loop.run_forever()

            thread = threading.Thread(target=_run, name=self._name, daemon=True)
            thread.start()
            ready.wait()
            self._loop, self._thread, self._pid = loop, thread, os.getpid()
            return loop

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The bridge's loop, started on first use."""
        return self._ensure_loop()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run ``coro`` on the bridge loop and return its result, waiting at most ``timeout``.

        On timeout the coroutine is cancelled and :class:`TimeoutError` is raised.
        """
        loop = self._ensure_loop()
        if threading.current_thread() is self._thread:
            raise RuntimeError("AsyncBridge.run() called from its own loop thread")
        future = asyncio.run_coroutine_threadsafe(coro, loop)
        try:
            return future.result(timeout)
        except FutureTimeoutError:
            future.cancel()
            raise TimeoutError(f"operation did not finish within {timeout} s") from None

    def call(self, factory: Callable[[], Awaitable[T]], timeout: float | None = None) -> T:
        """Like :meth:`run`, for a zero-argument coroutine factory."""

        async def _wrapper() -> T:
            return await factory()

        return self.run(_wrapper(), timeout)

    def close(self) -> None:
        """Stop the loop thread. The bridge starts a new loop if used again."""
        with self._lock:
            loop, thread = self._loop, self._thread
            self._loop = self._thread = None
            self._pid = -1
        if loop is not None and thread is not None and thread.is_alive():
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=5)
            loop.close()
