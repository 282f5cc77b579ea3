"""A streamed answer's head goes out with its first chunk (gateway/api/head_with_body.py), over uvicorn's own request
cycle and a fake transport that records each write (one write is one system call on a socket)."""

import asyncio
import logging
from typing import Any

from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.httptools_impl import RequestResponseCycle

from gridserve.gateway.api.head_with_body import hold_head

HEAD = {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]}


class Writes:
    """A transport that keeps what is written to it, write by write."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 40000), "sockname": ("127.0.0.1", 8000)}.get(name, default)


def cycle(transport: Writes, *, keep_alive: bool = True) -> RequestResponseCycle:
    log = logging.getLogger("test")
    scope: Any = {"type": "http", "method": "POST", "path": "/v1/completions", "http_version": "1.1"}
    return RequestResponseCycle(
        scope=scope,
        transport=transport,  # type: ignore[arg-type]
        flow=FlowControl(transport),  # type: ignore[arg-type]
        logger=log,
        access_logger=log,
        access_log=False,
        default_headers=[],
        message_event=asyncio.Event(),
        expect_100_continue=False,
        keep_alive=keep_alive,
        on_response=lambda: None,
    )


async def stream(c: RequestResponseCycle, chunks: list[bytes]) -> None:
    await c.send(HEAD)  # type: ignore[arg-type]
    for chunk in chunks:
        await c.send({"type": "http.response.body", "body": chunk, "more_body": True})
    await c.send({"type": "http.response.body", "body": b"", "more_body": False})


def test_the_head_is_written_with_the_first_chunk_then_each_chunk_as_before() -> None:
    async def main() -> None:
        plain, held = Writes(), Writes()
        await stream(cycle(plain), [b"data: 1\n\n", b"data: 2\n\n"])
        c = cycle(held)
        hold_head(c.send)
        await stream(c, [b"data: 1\n\n", b"data: 2\n\n"])
        assert len(plain.writes) == 4 and plain.writes[0].startswith(b"HTTP/1.1 200 OK\r\n")
        assert held.writes == [plain.writes[0] + plain.writes[1], *plain.writes[2:]]  # the same bytes, one write less
        assert c.transport is held  # the request's own transport again after the first chunk

    asyncio.run(main())


def test_a_connection_closed_after_the_answer_is_closed_with_the_head_written() -> None:
    async def main() -> None:
        transport = Writes()
        c = cycle(transport, keep_alive=False)
        hold_head(c.send)
        await c.send(HEAD)  # type: ignore[arg-type]
        assert transport.writes == []
        await c.send({"type": "http.response.body", "body": b"data: 1\n\n", "more_body": False})
        assert len(transport.writes) == 1 and transport.writes[0].startswith(b"HTTP/1.1 200 OK\r\n")
        assert transport.writes[0].endswith(b"data: 1\n\n\r\n0\r\n\r\n") and transport.closed

    asyncio.run(main())


def test_a_send_that_is_not_uvicorns_or_a_started_response_is_left_alone() -> None:
    async def other(message: Any) -> None: ...

    hold_head(other)  # not a request cycle's send: nothing to hold (no error either)

    async def main() -> None:
        transport = Writes()
        c = cycle(transport)
        await c.send(HEAD)  # type: ignore[arg-type]
        hold_head(c.send)  # too late: the head is out
        await c.send({"type": "http.response.body", "body": b"data: 1\n\n", "more_body": True})
        assert len(transport.writes) == 2 and c.transport is transport

    asyncio.run(main())


def test_the_gateways_protocol_marks_every_request_scope() -> None:
    """`HttpProtocol` (what the gateway runs uvicorn with) puts `HEAD_WITH_BODY` in each request's scope: the hot
    path holds a stream's head only where that mark says `hold_head` works."""
    import uvicorn
    from uvicorn.server import ServerState

    from gridserve.gateway.api.head_with_body import HEAD_WITH_BODY, HttpProtocol

    async def app(scope: Any, receive: Any, send: Any) -> None: ...

    async def main() -> None:
        config = uvicorn.Config(app, http=HttpProtocol, lifespan="off", log_config=None)
        config.load()
        protocol = HttpProtocol(config, ServerState(), {})
        protocol.connection_made(Writes())  # type: ignore[arg-type]
        protocol.on_message_begin()
        assert HEAD_WITH_BODY in protocol.scope["extensions"]  # type: ignore[operator]

    asyncio.run(main())
