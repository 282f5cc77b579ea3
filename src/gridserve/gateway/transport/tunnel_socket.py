"""The gateway's WebSocket protocol (uvicorn's wsproto one) with a callback path for tunnels.

A tunnel idles between a node's heartbeats (seconds), and the gateway holds thousands. Read through ASGI, every
idle tunnel keeps a chain of fresh objects waiting for its next message (its `receive()` coroutines, a future, the
parser's state): at 10,000 tunnels that is some 200,000 objects that live one heartbeat interval, too long for the
collector's young generation and too many for its pauses (each a stop of the event loop: 30 ms every second and
190 ms now and then, measured with bench/ingest.py). Here a tunnel's messages are handed to the hub by a callback
instead, as they are parsed; an idle tunnel holds nothing new (wsproto keeps no per-message state, unlike the
websockets library's parser).

`DirectSocket` is what an ASGI app finds under `scope["extensions"][EXTENSION]`: it may `attach` a callback once it
has done its handshake with plain ASGI messages; from then on messages go to the callback, not to `receive()`, and
`attach` returns a future that is done when the connection ends. Sending stays ASGI's `send`. Any other WebSocket
route, and any app that does not attach, is served exactly as uvicorn's `wsproto` protocol serves it.
"""

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from uvicorn.protocols.websockets.wsproto_impl import FrameTooLargeError, WSProtocol
from wsproto import events

EXTENSION = "gridserve.direct"
log = logging.getLogger("gridserve.gateway")

OnMessage = Callable[[bytes], str | None]
"""Takes one whole binary message; returns None, or why the connection must close (1008 with that reason). It runs
inside the protocol's data callback: it must not block, and what it raises closes the connection (1011)."""


class DirectSocket(WSProtocol):
    """uvicorn's wsproto WebSocket protocol, plus `attach` (see the module's doc)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deliver: OnMessage | None = None
        self._ended: asyncio.Future[None] | None = None
        self._drain: Callable[[], bool] | None = None
        self._pinged: Callable[[], None] | None = None

    def handle_connect(self, event: events.Request) -> None:
        super().handle_connect(event)
        extensions: dict[str, object] = self.scope["extensions"]  # type: ignore[assignment]  # (ASGI types it narrowly)
        extensions[EXTENSION] = self

    def attach(
        self,
        on_message: OnMessage,
        drain: Callable[[], bool] | None = None,
        pinged: Callable[[], None] | None = None,
    ) -> "asyncio.Future[None]":
        """From now on, each binary message goes to `on_message` as it arrives (those already queued first); a text
        message closes the connection (1003). The future is done when the connection ends.

        `drain` is asked when the server shuts down: True means work is under way on this connection and the app
        will `close` it once that is done (uvicorn waits for it, up to its graceful-shutdown timeout); False, close
        it now. `pinged` is called when the peer sends a ping (it is answered as before): the peer is there."""
        if self._deliver is not None:
            raise RuntimeError("a callback is attached already")
        self._ended = self.loop.create_future()
        self._deliver = on_message
        self._drain = drain
        self._pinged = pinged
        # No keepalive pings from here: the app that attaches hears from its peer on its own schedule (a tunnel: the
        # node's heartbeats, or its own pings where it heartbeats elsewhere) and closes a connection gone silent.
        # At 10,000 tunnels uvicorn's pings were 500 timers, pings and pongs a second for nothing the heartbeats do
        # not already show.
        self.stop_keepalive()
        while not self.queue.empty():  # (what came before the attach, in order)
            message = self.queue.get_nowait()
            if message["type"] != "websocket.receive":
                self._end()
                return self._ended
            self._hand(message.get("bytes"))
        if self.disconnected:
            self._end()
        elif self.read_paused:
            self.read_paused = False
            self.transport.resume_reading()
        return self._ended

    def handle_message(self, event: events.TextMessage | events.BytesMessage) -> None:
        if self._deliver is None:
            super().handle_message(event)
            return
        try:
            self.buffer.extend(event)
        except FrameTooLargeError:
            self._close(1009, f"message exceeds the maximum size ({self.config.ws_max_size} bytes)")
            return
        if event.message_finished:
            message = self.buffer.to_message()
            self.buffer.clear()
            self._hand(message.get("bytes"))

    def handle_ping(self, event: events.Ping) -> None:
        super().handle_ping(event)
        if self._pinged is not None:
            self._pinged()

    def _hand(self, data: bytes | None) -> None:
        deliver = self._deliver
        if deliver is None or self.close_sent:
            return
        if data is None:
            self._close(1003, "text frames are not this protocol")
            return
        try:
            refusal = deliver(data)
        except Exception:
            log.exception("a tunnel's message handler failed; closing the connection")
            self._close(1011, "internal error")
            return
        if refusal is not None:
            self._close(1008, refusal[:120])

    @property
    def can_write(self) -> bool:
        """`write` may be called: the connection is open and its transport not full (else use the ASGI `send`, which
        waits or raises)."""
        return not (self.disconnected or self.close_sent or self.transport.is_closing()) and self.writable.is_set()

    def write(self, data: bytes) -> None:
        """Send one binary message now (only when `can_write`)."""
        self.transport.write(self.conn.send(events.Message(data=data)))

    def shutdown(self) -> None:
        if self._drain is not None and not self.close_sent and not self.disconnected and self._drain():
            self.stop_keepalive()
            return
        super().shutdown()

    def close(self, code: int, reason: str) -> None:
        """Close from the app's side (the close frame, then the transport)."""
        self._close(code, reason)

    def _close(self, code: int, reason: str) -> None:
        if self.close_sent or self.transport.is_closing():
            return
        self.close_sent = True
        self.transport.write(self.conn.send(events.CloseConnection(code=code, reason=reason)))
        self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self._end()

    def _end(self) -> None:
        if self._ended is not None and not self._ended.done():
            self._ended.set_result(None)


__all__ = ["EXTENSION", "DirectSocket", "OnMessage"]
