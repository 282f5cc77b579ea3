"""The gateway's WebSocket protocol with a callback path for tunnels (gateway/transport/tunnel_socket.py), driven
through a fake transport by a wsproto client: no sockets."""

import asyncio
import functools
import gc
from collections.abc import Awaitable, Callable, Coroutine
from types import SimpleNamespace
from typing import Any, cast

import pytest
from uvicorn.config import Config
from uvicorn.server import ServerState
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
    Message,
    Ping,
    Pong,
    Request,
    TextMessage,
)

from gridserve.gateway.transport import Unreachable
from gridserve.gateway.transport.tunnel import TunnelConn
from gridserve.gateway.transport.tunnel_socket import EXTENSION, DirectSocket, OnMessage
from gridserve.types import NodeId

App = Callable[[Any, Any, Any], Awaitable[None]]


class FakeTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.written = bytearray()
        self.closing = False
        self.reading = True

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += data

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 40000), "sockname": ("127.0.0.1", 8000)}.get(name, default)


class Peer:
    """A node's end: a wsproto client talking to one DirectSocket through a FakeTransport."""

    def __init__(self, app: App, *, max_size: int = 1 << 20, ping_interval: float | None = None) -> None:
        config = Config(app, ws=DirectSocket, ws_max_size=max_size, ws_ping_interval=ping_interval, log_level="error")
        config.load()
        self.transport = FakeTransport()
        self.server = DirectSocket(config=config, server_state=ServerState(), app_state={})
        self.server.connection_made(self.transport)
        self.client = WSConnection(ConnectionType.CLIENT)
        self.server.data_received(self.client.send(Request(host="gateway", target="/nodes/tunnel")))

    @classmethod
    async def opened(cls, app: App, *, max_size: int = 1 << 20) -> "Peer":
        """A peer whose handshake is done (the app accepted)."""
        peer = cls(app, max_size=max_size)
        await settle()
        assert any(isinstance(e, AcceptConnection) for e in peer.events())
        return peer

    def send(self, event: Event) -> None:
        self.server.data_received(self.client.send(event))

    def events(self) -> list[Event]:
        """What the server wrote since the last call, as the client parses it."""
        self.client.receive_data(bytes(self.server.transport.written))  # type: ignore[attr-defined]
        self.transport.written.clear()
        return list(self.client.events())

    def lose(self) -> None:
        self.server.connection_lost(None)


def attaching(
    got: list[bytes], answer: Callable[[bytes], str | None] = lambda _: None, drain: Callable[[], bool] | None = None
) -> tuple[App, list[Any]]:
    """An app that accepts, reads one message the ASGI way, then attaches `got.append` (and `answer`, `drain`)."""
    ended: list[Any] = []

    def take(data: bytes) -> str | None:
        got.append(data)
        return answer(data)

    async def app(scope: Any, receive: Any, send: Any) -> None:
        assert (await receive())["type"] == "websocket.connect"
        await send({"type": "websocket.accept"})
        first = await receive()
        got.append(b"asgi:" + first["bytes"])
        direct: DirectSocket = scope["extensions"][EXTENSION]
        on_message: OnMessage = take
        ended.append(direct.attach(on_message, drain))
        await ended[-1]

    return app, ended


def run(test: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """The test on a fresh event loop (the protocol creates its ASGI task on the running one)."""

    @functools.wraps(test)
    def sync(*args: Any, **kwargs: Any) -> None:
        asyncio.run(test(*args, **kwargs))

    return sync


async def attached(
    got: list[bytes],
    answer: Callable[[bytes], str | None] = lambda _: None,
    *,
    max_size: int = 1 << 20,
    drain: Callable[[], bool] | None = None,
) -> tuple[Peer, list[Any]]:
    """A peer whose app has taken its first message and attached (what the server wrote so far read)."""
    app, ended = attaching(got, answer, drain)
    peer = await Peer.opened(app, max_size=max_size)
    peer.send(Message(data=b"first"))
    await settle()
    peer.events()
    return peer, ended


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def closes(peer: Peer) -> list[CloseConnection]:
    return [e for e in peer.events() if isinstance(e, CloseConnection)]


@run
async def test_messages_go_to_the_callback_in_order_those_queued_before_the_attach_first() -> None:
    got: list[bytes] = []
    app, ended = attaching(got)
    peer = await Peer.opened(app)
    # three messages before the app runs again: one for its ASGI receive, two queued (reading paused meanwhile)
    for data in (b"one", b"two", b"three"):
        peer.send(Message(data=data))
    await settle()
    assert got == [b"asgi:one", b"two", b"three"]
    assert peer.transport.reading, "reading resumes once a callback takes the messages"
    peer.send(Message(data=b"four"))  # now at once, in the data callback: no task, no queue
    assert got[-1] == b"four"
    assert not ended[0].done()
    peer.lose()
    assert ended[0].done()


@run
async def test_a_message_in_several_frames_comes_whole() -> None:
    got: list[bytes] = []
    peer, _ = await attached(got)
    peer.send(Message(data=b"ab", message_finished=False))
    peer.send(Message(data=b"cd", message_finished=False))
    assert got == [b"asgi:first"]
    peer.send(Message(data=b"ef"))
    assert got == [b"asgi:first", b"abcdef"]


@pytest.mark.parametrize(
    ("event", "code"),
    [(TextMessage(data="text"), 1003), (BytesMessage(data=b"x" * 2048), 1009)],
    ids=["text", "too-large"],
)
@run
async def test_what_is_not_this_protocol_closes_the_connection(event: Event, code: int) -> None:
    got: list[bytes] = []
    peer, ended = await attached(got, max_size=1024)
    peer.send(event)
    assert [c.code for c in closes(peer)] == [code]
    assert peer.transport.closing
    peer.lose()
    assert ended[0].done()
    assert got == [b"asgi:first"]


@run
async def test_a_refusal_from_the_callback_closes_with_its_reason_and_nothing_after_it_is_taken() -> None:
    got: list[bytes] = []
    peer, _ = await attached(got, lambda data: "bad frame: tag" if data == b"bad" else None)
    peer.send(Message(data=b"bad"))
    peer.send(Message(data=b"after"))
    assert got == [b"asgi:first", b"bad"]
    assert [(c.code, c.reason) for c in closes(peer)] == [(1008, "bad frame: tag")]


@run
async def test_a_callback_that_raises_closes_with_1011(caplog: pytest.LogCaptureFixture) -> None:
    def boom(data: bytes) -> str | None:
        raise ValueError("handler bug")

    got: list[bytes] = []
    peer, _ = await attached(got, boom)
    peer.send(Message(data=b"x"))
    assert [c.code for c in closes(peer)] == [1011]
    assert "handler bug" in caplog.text


@run
async def test_write_sends_a_binary_message_while_the_transport_has_room() -> None:
    got: list[bytes] = []
    peer, _ = await attached(got)
    assert peer.server.can_write
    peer.server.write(b"reply")
    assert [e.data for e in peer.events() if isinstance(e, BytesMessage)] == [b"reply"]
    peer.server.pause_writing()
    assert not peer.server.can_write, "a full transport: the sender must take the waiting path"
    peer.server.resume_writing()
    assert peer.server.can_write
    peer.lose()
    assert not peer.server.can_write


@run
async def test_a_route_that_does_not_attach_is_served_as_plain_asgi() -> None:
    async def echo(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "websocket.accept"})
        while (message := await receive())["type"] == "websocket.receive":
            await send({"type": "websocket.send", "bytes": message["bytes"] * 2})

    peer = await Peer.opened(echo)
    peer.events()
    for data in (b"a", b"b"):
        peer.send(Message(data=data))
        await settle()
    assert [e.data for e in peer.events() if isinstance(e, BytesMessage)] == [b"aa", b"bb"]


@run
async def test_an_idle_attached_connection_holds_no_new_objects_for_the_collector() -> None:
    """The reason for the callback path: a message leaves nothing behind that lives until the next one (an ASGI
    receive loop leaves its coroutines and future, the websockets parser its frame and generator)."""
    peers: list[Peer] = []
    for _ in range(200):
        app, _ = attaching([])
        peers.append(await Peer.opened(app))
    for peer in peers:
        peer.send(Message(data=b"first"))
    await settle()
    payloads = [Message(data=bytes(300)) for _ in peers]
    frames = [peer.client.send(payload) for peer, payload in zip(peers, payloads, strict=True)]
    gc.collect()
    gc.freeze()
    try:
        for peer, frame in zip(peers, frames, strict=True):
            peer.server.data_received(frame)
        held = len(gc.get_objects())
    finally:
        gc.unfreeze()
    assert held < 50, f"{held} tracked objects live after one message on each of 200 idle connections"


@run
async def test_a_server_shutdown_leaves_a_busy_connection_open_for_the_app_to_close() -> None:
    busy = [True]
    peer, ended = await attached([], drain=lambda: busy[0])
    peer.server.shutdown()  # uvicorn's graceful stop: work is under way, so the app closes it when done
    assert not peer.transport.closing and closes(peer) == []
    peer.server.close(1012, "the gateway is restarting")
    assert [(c.code, c.reason) for c in closes(peer)] == [(1012, "the gateway is restarting")]
    peer.lose()
    assert ended[0].done()
    idle, _ = await attached([], drain=lambda: False)
    idle.server.shutdown()
    assert idle.transport.closing and [c.code for c in closes(idle)] == [1012]


@run
async def test_a_draining_tunnel_takes_no_new_stream_and_closes_after_its_last() -> None:
    peer, _ = await attached([])
    conn = TunnelConn(NodeId("node-a"), cast(Any, SimpleNamespace(scope=peer.server.scope)), "127.0.0.1", None)
    assert conn.direct is peer.server
    first, _ = conn.open_stream()
    second, _ = conn.open_stream()
    assert conn.drain() is True
    with pytest.raises(Unreachable, match="draining"):
        conn.open_stream()
    conn.end_stream(first)
    assert closes(peer) == []
    conn.end_stream(second)  # the last one: the tunnel closes
    assert [c.code for c in closes(peer)] == [1012]
    idle, _ = await attached([])
    assert TunnelConn(NodeId("node-b"), cast(Any, SimpleNamespace(scope=idle.server.scope)), "", None).drain() is False


async def _first_ping(peer: Peer) -> Ping:
    for _ in range(100):
        await asyncio.sleep(0.005)
        pings = [e for e in peer.events() if isinstance(e, Ping)]
        if pings:
            return pings[0]
    raise AssertionError("no ping came before the app attached")


@run
async def test_attaching_stops_the_servers_keepalive_pings() -> None:
    """uvicorn pings every WebSocket it serves; once an app attaches (a tunnel, which hears from its node by
    heartbeats and closes a silent one itself), it stops: no timer left, no ping sent."""
    got: list[bytes] = []
    app, _ = attaching(got)
    peer = Peer(app, ping_interval=0.1)
    await settle()
    peer.send((await _first_ping(peer)).response())  # answered at once: uvicorn schedules the next in ~0.1 s
    assert peer.server.ping_timer is not None
    peer.send(Message(data=b"first"))
    await settle()
    assert (peer.server.ping_timer, peer.server.pong_timer) == (None, None)  # (nor one awaiting its pong)
    peer.events()  # (a ping sent before the attach, on a slow machine, is not the question)
    await asyncio.sleep(0.3)
    assert not any(isinstance(e, Ping) for e in peer.events())
    peer.send(Message(data=b"second"))
    assert got == [b"asgi:first", b"second"]


@run
async def test_a_ping_from_the_peer_is_answered_and_told_to_the_app() -> None:
    """A tunnel's node that heartbeats to another gateway pings this one's tunnel instead: the ping is answered as
    uvicorn answers it, and the app hears of it (`pinged`), so it does not take the tunnel for a silent one."""
    pings: list[None] = []
    got: list[bytes] = []
    ended: list[Any] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        assert (await receive())["type"] == "websocket.connect"
        await send({"type": "websocket.accept"})
        direct: DirectSocket = scope["extensions"][EXTENSION]
        ended.append(direct.attach(lambda data: got.append(data) or None, pinged=lambda: pings.append(None)))
        await ended[-1]

    peer = await Peer.opened(app)
    peer.send(Ping(payload=b"are you there"))
    peer.send(Ping(payload=b"still?"))
    await settle()
    assert [e.payload for e in peer.events() if isinstance(e, Pong)] == [b"are you there", b"still?"]
    assert len(pings) == 2 and got == []
