"""Group commit (store/group_commit.py): every caller returns only after its own rows are stored, callers that
commit while a write runs share the next write, a failed write raises to each caller in it, and no row is lost or
stored twice."""

import asyncio
import threading
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gridserve.store.group_commit import GroupCommit


class SlowStore:
    """Stores batches; each write blocks until the test lets it go (a transaction taking its time)."""

    def __init__(self, fail: bool = False) -> None:
        self.batches: list[list[int]] = []
        self.release = threading.Event()
        self.fail = fail

    def write(self, rows: Sequence[int]) -> None:
        self.release.wait(5)
        if self.fail:
            raise RuntimeError("database went away")
        self.batches.append(list(rows))


def test_commits_made_while_a_write_runs_share_the_next_write() -> None:
    async def main() -> list[list[int]]:
        store = SlowStore()
        group: GroupCommit[int] = GroupCommit(store.write)
        first = asyncio.create_task(group.commit([1]))
        await asyncio.sleep(0.01)  # the first write has started and blocks
        rest = [asyncio.create_task(group.commit([n, n * 10])) for n in range(2, 6)]
        await asyncio.sleep(0.01)
        assert not first.done() and not any(t.done() for t in rest)  # nobody returns before its rows are stored
        store.release.set()
        await asyncio.gather(first, *rest)
        assert group.batches == 2
        return store.batches

    assert asyncio.run(main()) == [[1], [2, 20, 3, 30, 4, 40, 5, 50]]


def test_a_failed_write_raises_to_every_caller_in_it() -> None:
    async def main() -> list[BaseException | None]:
        store = SlowStore(fail=True)
        store.release.set()
        group: GroupCommit[int] = GroupCommit(store.write)
        return await asyncio.gather(group.commit([1]), group.commit([2]), return_exceptions=True)

    outcomes = asyncio.run(main())
    assert [type(o) for o in outcomes] == [RuntimeError, RuntimeError]


def test_a_cancelled_caller_keeps_its_rows_in_the_write() -> None:
    async def main() -> list[list[int]]:
        store = SlowStore()
        group: GroupCommit[int] = GroupCommit(store.write)
        waiting = asyncio.create_task(group.commit([7]))
        await asyncio.sleep(0.01)
        waiting.cancel()
        store.release.set()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        await group.commit([8])  # the next write runs after the first ended
        return store.batches

    assert asyncio.run(main()) == [[7], [8]]


@settings(max_examples=30, deadline=None)
@given(st.lists(st.lists(st.integers(0, 999), min_size=0, max_size=6), max_size=25), st.integers(1, 8))
def test_every_row_is_stored_once_and_batches_respect_the_limit(parts: list[list[int]], max_rows: int) -> None:
    stored: list[list[int]] = []

    async def main() -> int:
        group: GroupCommit[int] = GroupCommit(stored.append, max_rows=max_rows)  # type: ignore[arg-type]
        await asyncio.gather(*(group.commit(p) for p in parts))
        return group.batches

    batches = asyncio.run(main())
    assert sorted(r for b in stored for r in b) == sorted(r for p in parts for r in p)
    assert batches == len(stored)
    callers = [len(p) for p in parts if p]
    assert all(len(b) <= max(max_rows, max(callers, default=0)) for b in stored)  # one caller is never split
