"""One write for a streamed answer's head and its first chunk.

uvicorn writes a response's status line and headers the moment the app sends `http.response.start`, and each body
chunk as it comes. The hot path sends a stream's head only once the node's first token is here (until then an error
can still be answered with its own status), so the head and the first chunk went out back to back in two writes:
two system calls, and two wake-ups of the client, on the way to its first token. The gateway's HTTP protocol here
(uvicorn's httptools protocol, which it extends) marks each request's scope with the extension `HEAD_WITH_BODY`;
where it is present, the hot path calls `hold_head(send)` before the head, and the head is written with the next
write, the first chunk, as one.
"""

from typing import Any

from starlette.types import Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

HEAD_WITH_BODY = "gridserve.head_with_body"
"""The ASGI extension (in `scope["extensions"]`) that says `hold_head` works on this request's `send`."""


class _HoldOnce:
    """A request's transport that keeps its first write (the head) and writes it with the second, then steps aside."""

    __slots__ = ("_cycle", "_held", "_real")

    def __init__(self, cycle: RequestResponseCycle) -> None:
        self._cycle, self._real = cycle, cycle.transport
        self._held: bytes | None = None

    def write(self, data: bytes) -> None:
        if self._held is None:
            self._held = data
            return
        self._cycle.transport = self._real
        self._real.write(self._held + data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


def hold_head(send: Send) -> None:
    """The head this request sends next goes out with the write after it (`send` must be the request's own, from
    a scope with `HEAD_WITH_BODY`; anything else is left as it is)."""
    cycle = getattr(send, "__self__", None)
    if isinstance(cycle, RequestResponseCycle) and not cycle.response_started:
        cycle.transport = _HoldOnce(cycle)  # type: ignore[assignment]


class HttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, each request's scope marked with `HEAD_WITH_BODY`."""

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.scope["extensions"] = {HEAD_WITH_BODY: {}}


__all__ = ["HEAD_WITH_BODY", "HttpProtocol", "hold_head"]
