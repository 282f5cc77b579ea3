"""A single background thread that performs Store writes off the event loop."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy.exc import OperationalError

from gridserve.store.db import Store

_log = logging.getLogger("gridserve.store")

_Job = tuple[Callable[..., None], tuple[Any, ...], dict[str, Any]]
RETRY_DELAYS_S = (0.2, 1.0, 3.0)
"""A write that fails on the connection (database restarted, network blip) is tried again after these pauses;
settlement entries carry a unique key, so a write that committed before its connection broke counts once."""


class StoreWriter:
    """Writes off the event loop: one background thread drains a queue of callables against the Store.

    ``submit(store.record_event, kind=..., ...)`` enqueues ``fn(*args, **kwargs)``; it never blocks on
    the database. Errors are logged (``logging.getLogger('gridserve.store')``), not raised; nothing
    accepted is dropped: :meth:`close` runs every queued job before the thread stops. Submitting after
    :meth:`close` raises ``RuntimeError``. The thread is a daemon, so call :meth:`close` on shutdown.
    """

    def __init__(self, store: Store) -> None:
        self._store = store
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._cond = threading.Condition()
        self._submitted = 0
        self._done = 0
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="gridserve-store-writer", daemon=True)
        self._thread.start()

    @property
    def store(self) -> Store:
        return self._store

    def submit(self, fn: Callable[..., None], /, *args: Any, **kwargs: Any) -> None:
        with self._cond:
            if self._closed:
                raise RuntimeError("StoreWriter is closed")
            self._submitted += 1
            self._queue.put((fn, args, kwargs))

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until everything submitted so far has run; False if ``timeout`` expired first."""
        if threading.current_thread() is self._thread:
            raise RuntimeError("flush() called from the writer thread would deadlock")
        with self._cond:
            target = self._submitted
            return self._cond.wait_for(lambda: self._done >= target, timeout)

    def close(self) -> None:
        """Run everything already queued, then stop the thread. Idempotent."""
        with self._cond:
            if not self._closed:
                self._closed = True
                self._queue.put(None)
        if threading.current_thread() is not self._thread:
            self._thread.join()

    @staticmethod
    def _execute(job: _Job) -> None:
        fn, args, kwargs = job
        name = getattr(fn, "__qualname__", repr(fn))
        for delay in (*RETRY_DELAYS_S, None):
            try:
                fn(*args, **kwargs)
                return
            except OperationalError as exc:
                if delay is None:
                    _log.error("store write %s failed after %d tries: %s", name, len(RETRY_DELAYS_S) + 1, exc)
                    return
                _log.warning("store write %s failed (%s); retrying in %.1f s", name, type(exc).__name__, delay)
                time.sleep(delay)
            except Exception:
                _log.exception("store write %s failed", name)
                return

    def _run(self) -> None:
        while (job := self._queue.get()) is not None:
            self._execute(job)
            with self._cond:
                self._done += 1
                self._cond.notify_all()
