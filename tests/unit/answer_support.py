"""Shared by the answer-path unit tests: a serving path that replays a node's scripted events, and a lifecycle that
records nothing (what these tests check is the bytes and answers the client gets)."""

import asyncio
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

from gridserve.gateway.api import answers
from gridserve.types import StreamEvent


class Scripted(answers.Source):
    """A serving path whose node sent `events`, `pause_s` apart (its `closed` says whether it was released)."""

    def __init__(self, events: list[StreamEvent], pause_s: float = 0.0) -> None:
        self.scope = SimpleNamespace()  # type: ignore[assignment]
        self._events = events
        self.pause_s = pause_s
        self.closed = False
        self.status = ""

    async def _gen(self) -> AsyncIterator[StreamEvent]:
        for event in self._events:
            await asyncio.sleep(self.pause_s)
            yield event

    def events(self) -> AsyncIterator[StreamEvent]:
        return self._gen()

    async def close(self) -> None:
        self.closed = True

    def finished(self, status: str, error: str, last: StreamEvent) -> Any:
        self.status = status
        return None


class Lifecycle:
    def finished(self, scope: Any, end: Any) -> None:
        return None

    async def commit(self, end: Any, settled: Any) -> None:
        return None


def context() -> Any:
    """The part of ApiContext the answer path uses."""
    return SimpleNamespace(lifecycle=Lifecycle())
