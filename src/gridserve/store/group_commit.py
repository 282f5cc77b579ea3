"""Group commit: writes that their callers wait for, stored together in one transaction.

An answer is delivered only once its settlement entries are stored. Stored one transaction per answer (a thread
hand-off, BEGIN, INSERT, COMMIT each), a gateway streaming ~200 answers a second spent a tenth of its CPU there.
Here callers that commit while a write is running wait for the next one, which stores all of their rows at once:
each caller still returns only after its own rows are committed (or the write raised, to every caller in it).
"""

import asyncio
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

Row = TypeVar("Row")


class GroupCommit(Generic[Row]):
    """`await commit(rows)` returns once `write` has stored `rows` (in a worker thread, with whatever other rows
    were committed meanwhile). One write runs at a time; the loop that awaits owns the pending rows."""

    def __init__(self, write: Callable[[Sequence[Row]], None], *, max_rows: int = 2048) -> None:
        self._write = write
        self._max_rows = max_rows
        self._pending: list[tuple[Sequence[Row], asyncio.Future[None]]] = []
        self._writing: asyncio.Task[None] | None = None
        self.batches = 0
        """Writes made so far (for tests and metrics)."""

    async def commit(self, rows: Sequence[Row]) -> None:
        if not rows:
            return
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.add_done_callback(_retrieved)
        self._pending.append((rows, done))
        if self._writing is None:
            self._writing = asyncio.create_task(self._drain())
        await asyncio.shield(done)  # a caller cancelled meanwhile does not take its rows out of the write

    async def _drain(self) -> None:
        try:
            while self._pending:
                taken, size = 0, 0
                while taken < len(self._pending) and (
                    taken == 0 or size + len(self._pending[taken][0]) <= self._max_rows
                ):
                    size += len(self._pending[taken][0])
                    taken += 1
                batch, self._pending = self._pending[:taken], self._pending[taken:]
                await self._store(batch)
        finally:
            self._writing = None

    async def _store(self, batch: list[tuple[Sequence[Row], asyncio.Future[None]]]) -> None:
        self.batches += 1
        rows = [row for part, _ in batch for row in part]
        try:
            await asyncio.to_thread(self._write, rows)
        except Exception as exc:
            for _, waiter in batch:
                waiter.set_exception(exc)
            return
        for _, waiter in batch:
            waiter.set_result(None)


def _retrieved(future: "asyncio.Future[None]") -> None:
    """A caller cancelled while its write ran never reads the outcome: read it here (no 'never retrieved' log)."""
    if not future.cancelled():
        future.exception()


__all__ = ["GroupCommit"]
