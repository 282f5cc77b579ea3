"""A scripted serving path for the API's answer loops (gateway/api/answers.py), with no gateway behind it: the
node's events as a `Source`, and a context whose lifecycle records nothing."""

from collections.abc import AsyncIterator, Sequence
from types import SimpleNamespace
from typing import Any

from gridserve.gateway.api import answers
from gridserve.types import StreamEvent


class _Lifecycle:
    def finished(self, scope: Any, end: Any) -> None:
        return None

    async def commit(self, end: Any, settled: Any) -> None:
        return None


CTX: Any = SimpleNamespace(lifecycle=_Lifecycle(), membership=SimpleNamespace(note=lambda event: None))


class Scripted(answers.Source):
    """A serving path whose node sent `events`; `here[i]`: whether event i had already arrived when event i-1 was
    handled (`ready`; none had, without `here`)."""

    def __init__(self, events: Sequence[StreamEvent], here: Sequence[bool] = ()) -> None:
        self.scope = SimpleNamespace()  # type: ignore[assignment]
        self._events, self._here = events, here
        self._next = 0

    async def _gen(self) -> AsyncIterator[StreamEvent]:
        for i, event in enumerate(self._events):
            self._next = i + 1
            yield event

    def events(self) -> AsyncIterator[StreamEvent]:
        return self._gen()

    def ready(self) -> bool:
        return self._next < len(self._here) and self._here[self._next]

    def finished(self, status: str, error: str, last: StreamEvent) -> Any:
        return None

    def served_by(self) -> str:
        return "n1"
