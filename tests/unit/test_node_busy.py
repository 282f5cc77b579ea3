"""The node's busy lines: between two events of a stream, the node says it is busy (the engine's step count) each
BUSY_EVERY_S the engine made progress on other streams, and says nothing while the engine is hung or when it
counts no steps (an upstream server). The gateway's side is in test_dispatch_failover.py."""

import asyncio
from collections.abc import AsyncIterator

import pytest

from gridserve.engines import EngineStats
from gridserve.node import app as node_app
from gridserve.types import TokenEvent

EVERY_S = 0.02
GAP_S = 10 * EVERY_S


@pytest.fixture(autouse=True)
def _fast_busy_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(node_app, "BUSY_EVERY_S", EVERY_S)


async def _two_tokens_with_a_gap(stats: EngineStats, stepping: bool) -> AsyncIterator[TokenEvent]:
    yield TokenEvent(text="a", token_ids=(1,))
    loop = asyncio.get_running_loop()
    end = loop.time() + GAP_S
    while loop.time() < end:  # the engine's worker runs other streams' steps (or is hung) meanwhile
        await asyncio.sleep(EVERY_S / 5)
        if stepping and stats.steps is not None:
            stats.steps += 1
    yield TokenEvent(text="b", token_ids=(2,), finish_reason="stop")


def _lines(stats: EngineStats, stepping: bool) -> list[TokenEvent | int]:
    async def go() -> list[TokenEvent | int]:
        return [e async for e in node_app._busy_between(_two_tokens_with_a_gap(stats, stepping), stats)]

    return asyncio.run(go())


def test_an_engine_stepping_other_streams_gets_busy_lines_between_the_events() -> None:
    stats = EngineStats(steps=0)
    lines = _lines(stats, stepping=True)
    events = [e for e in lines if isinstance(e, TokenEvent)]
    busy = [e for e in lines if isinstance(e, int)]
    assert [e.text for e in events] == ["a", "b"]
    assert lines[0] == events[0] and lines[-1] == events[-1]  # busy lines come only between events
    assert 1 <= len(busy) <= GAP_S / EVERY_S + 1  # at most one per interval
    assert busy == sorted(busy) and len(set(busy)) == len(busy)  # each after more steps


def test_a_hung_engine_gets_no_busy_line() -> None:
    lines = _lines(EngineStats(steps=0), stepping=False)
    assert all(isinstance(e, TokenEvent) for e in lines) and len(lines) == 2


def test_an_engine_that_counts_no_steps_gets_no_busy_line() -> None:
    lines = _lines(EngineStats(), stepping=True)
    assert all(isinstance(e, TokenEvent) for e in lines) and len(lines) == 2
