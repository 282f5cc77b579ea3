"""Both ends of the tunnel, in memory: no sockets, no processes.

The gateway's end (gateway/transport/tunnel.py) runs over Starlette's own WebSocket class whose ASGI receive and
send are queues; the node on the far side is driven by hand with wire.encode/decode and handshake.hello. The node's
end (node/tunnel.py) runs a small Starlette app; its aiohttp WebSocket is a fake that records the frames it sends,
or, for the exchanges through both ends, a fake wired to the gateway's queues.
"""

import asyncio
import base64
import re
import time
from collections.abc import Callable, Coroutine, MutableMapping
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Generic, TypeVar, cast

import aiohttp
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from gridserve.gateway.registry.membership import UnknownNode
from gridserve.gateway.transport import BrokenStream, Malformed, Refused, Timeout, Unreachable
from gridserve.gateway.transport.tunnel import (
    MAX_PROBE_BYTES,
    TunnelConn,
    TunnelEventStream,
    TunnelHub,
    TunnelStageChannel,
    TunnelTransport,
)
from gridserve.node import tunnel as node_tunnel
from gridserve.node.tunnel import ROUTES, NodeTunnel, TunnelClosed
from gridserve.trust import (
    EnvelopeVerifier,
    FreshnessPolicy,
    Identity,
    Replayed,
    TrustError,
    WrongSigner,
    sign_envelope,
)
from gridserve.tunnel import handshake
from gridserve.tunnel.channel import Opener, Sealer, gateway_side, node_side
from gridserve.tunnel.wire import CONTROL, PATH, Frame, Kind, decode, encode, endpoint_for, request_payload
from gridserve.types import GenerateRequest, NodeId, SamplingParams

NODE = Identity.generate()
NODE_ID = NodeId(NODE.node_id)
ENDPOINT = endpoint_for(NODE_ID)
REMOTE = "10.0.0.7"
INTERVAL_S = 2.0
GUARD_S = 5.0
"""How long a helper waits for a frame before calling the test stuck (a guard against hangs, not a measurement)."""
Message = MutableMapping[str, Any]
T = TypeVar("T")


def _run(test: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(test())


async def _until(condition: Callable[[], bool], what: str = "the condition") -> None:
    """Let the loop run until `condition` holds (a bounded number of turns, no clock)."""
    for _ in range(1000):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError(f"{what} never came true")


async def _turns(n: int = 50) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


def _job(prompt: str = "abc") -> GenerateRequest:
    return GenerateRequest(request_id="r1", model="m", prompt=prompt, sampling=SamplingParams(max_tokens=8))


def _ndjson(*events: dict[str, Any]) -> bytes:
    return b"".join(orjson.dumps(e) + b"\n" for e in events)


# -- the gateway's end: Starlette's WebSocket over in-memory ASGI queues ----------------------------------------------
class NodeEnd:
    """The node's side of the gateway's WebSocket: what the gateway receives and what it sent, as ASGI messages."""

    def __init__(self) -> None:
        self.to_gateway: asyncio.Queue[Message] = asyncio.Queue()
        self.from_gateway: asyncio.Queue[Message] = asyncio.Queue()
        self.broken = False
        """When set, the gateway's sends fail as a reset connection does."""
        self.to_gateway.put_nowait({"type": "websocket.connect"})
        scope = {
            "type": "websocket",
            "path": PATH,
            "raw_path": PATH.encode(),
            "query_string": b"",
            "root_path": "",
            "headers": [],
            "scheme": "ws",
            "client": (REMOTE, 40123),
            "server": ("gw.test", 80),
            "subprotocols": [],
        }
        self.ws = WebSocket(scope, self.to_gateway.get, self._gateway_sends)
        self.serving: asyncio.Future[None] | None = None
        self.welcome: Frame | None = None
        self.sealer: Sealer | None = None
        self.opener: Opener | None = None
        """The node's ends of the channel, once the greeting is through (before it, frames go plain)."""

    async def _gateway_sends(self, message: Message) -> None:
        if self.broken:
            raise ConnectionResetError(104, "Connection reset by peer")
        self.from_gateway.put_nowait(message)

    def send(self, kind: Kind, stream: int, payload: bytes = b"") -> None:
        data = encode(kind, stream, payload) if self.sealer is None else self.sealer.seal(kind, stream, payload)
        self.send_raw({"type": "websocket.receive", "bytes": data})

    def send_raw(self, message: Message) -> None:
        self.to_gateway.put_nowait(message)

    def hang_up(self) -> None:
        self.to_gateway.put_nowait({"type": "websocket.disconnect", "code": 1006})

    async def message(self) -> Message:
        while True:
            message = await asyncio.wait_for(self.from_gateway.get(), GUARD_S)
            if message["type"] != "websocket.accept":
                return message

    async def frame(self) -> Frame:
        message = await self.message()
        assert message["type"] == "websocket.send", message
        return self._open(message["bytes"])

    async def challenge(self) -> str:
        """The challenge in the gateway's first frame (read as it comes: the type is the tests' to check)."""
        return cast(str, orjson.loads((await self.frame()).payload)["challenge"])

    def _open(self, data: bytes) -> Frame:
        return decode(data) if self.opener is None else self.opener.open(data)

    def sent(self) -> list[Frame]:
        """The frames the gateway sent that nobody read yet."""
        frames = []
        while not self.from_gateway.empty():
            message = self.from_gateway.get_nowait()
            if message["type"] == "websocket.send":
                frames.append(self._open(message["bytes"]))
        return frames

    async def quiet(self) -> list[Frame]:
        """The frames the gateway sent that nobody read yet, once the loop has had its turns (`== []`: none came)."""
        await _turns()
        return self.sent()

    async def ended(self) -> None:
        """Wait for the gateway to be done serving this connection."""
        assert self.serving is not None
        await asyncio.wait_for(self.serving, GUARD_S)


class FakeMembership:
    def __init__(self) -> None:
        self.config = SimpleNamespace(heartbeat_interval_s=INTERVAL_S)
        self.beats: list[bytes] = []
        self.channel_beats: list[tuple[str, bytes]] = []
        """BEAT frames taken (membership.channel_heartbeat): the tunnel's node, the bare payload."""
        self.rejected: list[tuple[TrustError, str, str]] = []
        self.error: TrustError | None = None
        self.failed: list[tuple[str, str]] = []
        """Nodes taken out of rotation (mark_failed), with why."""
        self.nodes: dict[str, object] = {NODE.node_id: object()}
        """The registered nodes (only their ids are read)."""

    def heartbeat(self, body: bytes) -> None:
        self.beats.append(body)
        if self.error is not None:
            raise self.error

    def channel_heartbeat(self, node_id: str, payload: bytes) -> None:
        self.channel_beats.append((node_id, payload))
        if self.error is not None:
            raise self.error

    def reject(self, exc: TrustError, *, path: str, remote: str, node_id: str | None = None) -> None:
        self.rejected.append((exc, path, remote))

    def mark_failed(self, node_id: str, reason: str) -> None:
        self.failed.append((node_id, reason))


class Gateway:
    def __init__(self) -> None:
        self.identity = Identity.generate()
        self.membership = FakeMembership()
        self.verifier = EnvelopeVerifier(FreshnessPolicy(), time.time)
        self.hub = TunnelHub(self.identity, self.verifier, cast(Any, self.membership))
        self.transport = TunnelTransport(self.identity, self.hub)

    def accept(self) -> NodeEnd:
        end = NodeEnd()
        end.serving = asyncio.ensure_future(self.hub.serve(end.ws))
        return end

    async def dial(self, node: Identity = NODE) -> NodeEnd:
        """A node that dials in and greets as it should; its tunnel is open when this returns."""
        end = self.accept()
        challenge = await end.challenge()
        greeting = handshake.hello(node, challenge)
        end.send(Kind.HELLO, CONTROL, greeting.body)
        end.welcome = await end.frame()
        assert (end.welcome.kind, end.welcome.stream) == (Kind.WELCOME, CONTROL)
        verifier = EnvelopeVerifier(FreshnessPolicy(), time.time)
        welcomed = handshake.check_welcome(
            verifier, end.welcome.payload, greeting, node_id=node.node_id, gateway_key=self.identity.public_key
        )
        end.sealer, end.opener = welcomed.sealer, welcomed.opener
        await _until(lambda: (c := self.hub.conns.get(NodeId(node.node_id))) is not None and c.ws is end.ws)
        return end

    def conn(self, node_id: NodeId = NODE_ID) -> TunnelConn:
        return self.hub.conns[node_id]


async def _accepted() -> tuple[Gateway, NodeEnd, str]:
    """A gateway that took a connection and sent its challenge (returned too); the node has not greeted yet."""
    gw = Gateway()
    end = gw.accept()
    return gw, end, await end.challenge()


async def _dialled() -> tuple[Gateway, NodeEnd]:
    """A gateway and a node whose tunnel to it is open."""
    gw = Gateway()
    return gw, await gw.dial()


async def _refusal(end: NodeEnd) -> str:
    """What the gateway said when it refused the tunnel (WS_CLOSE on the control stream, then a 1008 close)."""
    frame = await end.frame()
    assert (frame.kind, frame.stream) == (Kind.WS_CLOSE, CONTROL)
    close = await end.message()
    assert close["type"] == "websocket.close"
    assert close["code"] == 1008
    await end.ended()
    return frame.payload.decode()


# -- calls from the gateway's transport, answered by hand -------------------------------------------------------------
Make = Callable[[TunnelTransport], Coroutine[Any, Any, T]]
"""One of the transport's calls to NODE, to start on a gateway's transport."""


def _generate(prompt: str = "abc") -> Make[TunnelEventStream]:
    return lambda transport: transport.generate(NODE_ID, ENDPOINT, _job(prompt))


def _probe(timeout_s: float = 1.0, challenge: str = "c1") -> Make[bytes]:
    return lambda transport: transport.probe(NODE_ID, ENDPOINT, timeout_s, challenge)


def _load() -> Make[None]:
    return lambda transport: transport.load(NODE_ID, ENDPOINT, {"model": "m"}, 1.0)


def _stage_link() -> Make[TunnelStageChannel]:
    return lambda transport: transport.stage_link(NODE_ID, ENDPOINT, 1.0)


@dataclass
class Call(Generic[T]):
    """A call under way: the gateway sent its first frame (`request`) to the node, whose answer the test sends."""

    gw: Gateway
    end: NodeEnd
    task: "asyncio.Task[T]"
    request: Frame

    @property
    def number(self) -> int:
        """The call's stream."""
        return self.request.stream

    def send(self, kind: Kind, payload: bytes = b"") -> None:
        """A frame from the node on the call's stream."""
        self.end.send(kind, self.number, payload)

    def answer(self, head: int | bytes, *body: bytes, ended: bool = True) -> None:
        """The node's reply: a HEAD (`head` a status, or the head's bytes as sent), then each piece of `body` in a
        BODY frame, the last in the END unless `ended` is false."""
        self.send(Kind.HEAD, b'{"status":%d}' % head if isinstance(head, int) else head)
        for i, piece in enumerate(body):
            self.send(Kind.END if ended and i == len(body) - 1 else Kind.BODY, piece)


async def _call(make: Make[T], tunnel: tuple[Gateway, NodeEnd] | None = None) -> Call[T]:
    """Start `make` on the tunnel (a newly dialled one unless given) and read its first frame off the node's end."""
    gw, end = tunnel if tunnel is not None else await _dialled()
    task = asyncio.ensure_future(make(gw.transport))
    return Call(gw, end, task, await end.frame())


async def _generating(gw: Gateway, end: NodeEnd) -> tuple[TunnelEventStream, int]:
    """A generate stream under way, and its number: the node answered the request with a 200 head, no body yet."""
    call = await _call(_generate(), (gw, end))
    call.answer(200)
    return await call.task, call.number


async def _drain(stream: TunnelEventStream) -> list[dict[str, Any]]:
    events = []
    while (event := await stream.next()) is not None:
        events.append(dict(event))
    return events


# -- the handshake, gateway side ----------------------------------------------------------------------------------
def test_a_node_that_greets_properly_gets_a_welcome_signed_by_the_gateway() -> None:
    async def go() -> None:
        gw, end = await _dialled()  # (the welcome is checked against the gateway's key there)
        assert end.welcome is not None
        assert orjson.loads(end.welcome.payload)["payload"]["heartbeat_interval_s"] == INTERVAL_S
        assert orjson.loads(end.welcome.payload)["payload"]["beats"] == "channel"
        assert gw.hub.opened == 1
        conn = gw.hub.get(NODE_ID)
        assert (conn.node_id, conn.remote, conn.closed) == (NODE_ID, REMOTE, None)

    _run(go)


def test_the_challenge_is_fresh_for_each_connection() -> None:
    async def go() -> None:
        gw = Gateway()
        first, second = gw.accept(), gw.accept()
        one = await first.challenge()
        two = await second.challenge()
        assert isinstance(one, str) and len(one) >= 32
        assert one != two

    _run(go)


def test_a_hello_answering_another_challenge_is_refused_and_the_tunnel_closed() -> None:
    async def go() -> None:
        gw, end, _ = await _accepted()
        end.send(Kind.HELLO, CONTROL, handshake.hello(NODE, handshake.challenge()).body)
        assert await _refusal(end) == "the hello does not answer this connection's challenge"
        assert gw.hub.conns == {}
        assert gw.hub.opened == 0

    _run(go)


def test_a_hello_replayed_into_a_new_connection_is_refused() -> None:
    async def go() -> None:
        gw, end, challenge = await _accepted()
        body = handshake.hello(NODE, challenge).body
        gw.verifier.verify(body, purpose=handshake.HELLO)  # the same bytes were seen once already
        end.send(Kind.HELLO, CONTROL, body)
        assert await _refusal(end) == "nonce already used: replayed message"
        assert gw.hub.conns == {}

    _run(go)


@pytest.mark.parametrize(
    ("first", "why"),
    [
        (encode(Kind.HEARTBEAT, CONTROL, b"{}"), "expected the node's hello, got HEARTBEAT"),
        (b"\x14\x00", "a frame of 2 bytes is shorter than its header"),
        (b"\x63\x00\x00\x00\x00", "unknown frame kind 99"),
        (encode(Kind.HELLO, CONTROL, b"not json"), "body is not JSON"),
    ],
)
def test_a_first_frame_that_is_not_a_good_hello_is_refused(first: bytes, why: str) -> None:
    async def go() -> None:
        gw, end, _ = await _accepted()
        end.send_raw({"type": "websocket.receive", "bytes": first})
        assert (await _refusal(end)).startswith(why)
        assert gw.hub.conns == {}

    _run(go)


def test_a_node_that_hangs_up_during_the_handshake_leaves_no_tunnel() -> None:
    async def go() -> None:
        gw, end, _ = await _accepted()
        end.hang_up()
        await end.ended()
        assert gw.hub.conns == {}
        assert gw.hub.opened == 0

    _run(go)


def test_a_text_frame_instead_of_the_hello_is_refused() -> None:
    async def go() -> None:
        gw, end, _ = await _accepted()
        end.send_raw({"type": "websocket.receive", "text": "hello?"})
        assert (await _refusal(end)).startswith("expected the node's hello")
        assert gw.hub.conns == {}

    _run(go)


def test_a_hello_whose_exchange_key_makes_no_secret_is_refused() -> None:
    async def go() -> None:
        gw, end, challenge = await _accepted()
        zero = base64.b64encode(bytes(32)).decode()  # a low-order point: X25519 with it gives all zeros
        payload = {"node_id": NODE_ID, "challenge": challenge, "nonce": "n" * 32, "kx": zero}
        end.send(Kind.HELLO, CONTROL, sign_envelope(NODE, payload, purpose=handshake.HELLO, now=time.time()))
        assert await _refusal(end) == "the greeting's exchange key makes no shared secret"
        assert gw.hub.conns == {}

    _run(go)


def test_a_tunnel_whose_node_never_registers_is_closed_after_the_grace() -> None:
    async def go() -> None:
        gw = Gateway()
        gw.hub.register_grace_s = 0.05
        member = await gw.dial()
        stranger_key = Identity.generate()  # greets with a valid signature, never registers
        stranger = await gw.dial(stranger_key)
        closed = await stranger.message()
        assert closed["type"] == "websocket.close" and closed["code"] == 1008, closed
        assert "did not register within" in closed["reason"]
        stranger.hang_up()
        await stranger.ended()
        assert set(gw.hub.conns) == {NODE_ID}  # the registered node's tunnel stands
        assert member.sent() == [] and gw.hub.get(NODE_ID).closed is None

    _run(go)


# -- the hub: tunnels open, replaced, ended ---------------------------------------------------------------------------
def test_a_node_that_dials_again_replaces_its_tunnel_and_the_old_streams_break() -> None:
    async def go() -> None:
        gw = Gateway()
        old = await gw.dial()
        stream, _ = await _generating(gw, old)
        new = await gw.dial()
        assert gw.hub.opened == 2
        assert gw.hub.get(NODE_ID).ws is new.ws
        with pytest.raises(BrokenStream, match="replaced by a new tunnel from the node"):
            await stream.next()
        old.hang_up()  # the old connection's end must not take the new tunnel with it
        await old.ended()
        assert gw.hub.get(NODE_ID).ws is new.ws
        assert gw.membership.failed == []  # the node is reachable over its new tunnel: not taken out of rotation

    _run(go)


def test_when_a_tunnel_ends_every_stream_on_it_breaks_and_the_node_is_unreachable() -> None:
    async def go() -> None:
        gw, end = await _dialled()
        streams = [(await _generating(gw, end))[0] for _ in range(2)]
        conn = gw.conn()
        end.hang_up()
        for stream in streams:
            with pytest.raises(BrokenStream, match="closed: the connection ended") as caught:
                await stream.next()
            assert caught.value.cause == "tunnel closed"
        assert conn.streams == {}
        assert gw.hub.conns == {}
        with pytest.raises(Unreachable, match="has no tunnel open to this gateway"):
            gw.hub.get(NODE_ID)
        with pytest.raises(Unreachable, match="is closed"):
            conn.open_stream()
        assert gw.membership.failed == [(NODE_ID, "its tunnel closed")]  # out of rotation at once

    _run(go)


def _beat(sealer: Sealer, n: int = 1) -> bytes:
    return sealer.seal(Kind.HEARTBEAT, CONTROL, b"beat %d" % n)


def _altered(data: bytes) -> bytes:
    return data[:-1] + bytes([data[-1] ^ 1])


BREAKS: dict[str, tuple[Callable[[Sealer], list[bytes | str]], int]] = {
    "too short": (lambda sealer: [b"\x17\x00"], 0),
    "unsealed": (lambda sealer: [encode(Kind.HEARTBEAT, CONTROL, b"beat " * 10)], 0),
    "altered": (lambda sealer: [_altered(_beat(sealer))], 0),
    "replayed": (lambda sealer: [frame := _beat(sealer), frame], 1),
    "reordered": (lambda sealer: [(pair := [_beat(sealer, 1), _beat(sealer, 2)])[1], pair[0]], 0),
    "text": (lambda sealer: ["a text frame"], 0),
}
"""Ways a node (or someone on the path) breaks the protocol after the greeting: (the messages, how many of them
were good heartbeats)."""


@pytest.mark.parametrize("case", list(BREAKS))
def test_a_frame_that_breaks_the_protocol_ends_the_tunnel(case: str) -> None:
    make, good = BREAKS[case]

    async def go() -> None:
        gw, end = await _dialled()
        assert end.sealer is not None
        for data in make(end.sealer):
            key = "text" if isinstance(data, str) else "bytes"
            end.send_raw({"type": "websocket.receive", key: data})
        await end.ended()
        assert gw.hub.conns == {}
        assert gw.membership.beats == [b"beat 1"] * good

    _run(go)


def test_frames_for_a_stream_nobody_waits_on_are_dropped() -> None:
    async def go() -> None:
        gw, end = await _dialled()
        end.send(Kind.BODY, 99, b"stray")
        end.send(Kind.END, 7, b"stray")
        end.send(Kind.HEARTBEAT, CONTROL, b"beat")
        reply = await end.frame()  # the tunnel still works
        assert (reply.kind, reply.stream) == (Kind.HEARTBEAT_REPLY, CONTROL)
        assert gw.conn().streams == {}
        assert gw.hub.get(NODE_ID).ws is end.ws

    _run(go)


def test_stream_numbers_skip_the_control_stream_when_they_wrap() -> None:
    conn = TunnelConn(NODE_ID, cast(Any, SimpleNamespace(scope={})), REMOTE, cast(Any, None))
    assert [conn.open_stream()[0] for _ in range(3)] == [1, 2, 3]
    conn._next = 0xFFFFFFFF
    assert [conn.open_stream()[0] for _ in range(2)] == [0xFFFFFFFF, 1]


def test_stopping_the_transport_ends_every_tunnel() -> None:
    async def go() -> None:
        gw, end = await _dialled()
        stream, _ = await _generating(gw, end)
        await gw.transport.aclose()
        with pytest.raises(BrokenStream, match="the gateway is stopping"):
            await stream.next()
        with pytest.raises(Unreachable):
            gw.hub.get(NODE_ID)

    _run(go)


# -- heartbeats over the tunnel -----------------------------------------------------------------------------------
def test_a_heartbeat_reaches_membership_and_is_answered_200() -> None:
    async def go() -> None:
        gw, end = await _dialled()
        end.send(Kind.HEARTBEAT, CONTROL, b'{"signed":"beat"}')
        reply = await end.frame()
        assert (reply.kind, reply.stream) == (Kind.HEARTBEAT_REPLY, CONTROL)
        assert orjson.loads(reply.payload) == {"status": 200, "body": '{"ok":true}'}
        assert gw.membership.beats == [b'{"signed":"beat"}']
        assert gw.membership.rejected == []

    _run(go)


def test_a_channel_beat_reaches_membership_as_the_tunnels_node_and_is_answered_200() -> None:
    """A BEAT carries the bare payload: membership is told which node's tunnel it came over (the channel is the
    proof), and no signature check is asked for."""

    async def go() -> None:
        gw, end = await _dialled()
        end.send(Kind.BEAT, CONTROL, b'{"node_id":"n","seq":3}')
        end.send(Kind.BEAT, CONTROL, b'{"node_id":"n","seq":4}')
        replies = [await end.frame(), await end.frame()]
        assert [(r.kind, r.stream) for r in replies] == [(Kind.HEARTBEAT_REPLY, CONTROL)] * 2
        assert [orjson.loads(r.payload) for r in replies] == [{"status": 200, "body": '{"ok":true}'}] * 2
        assert gw.membership.channel_beats == [
            (NODE_ID, b'{"node_id":"n","seq":3}'),
            (NODE_ID, b'{"node_id":"n","seq":4}'),
        ]
        assert gw.membership.beats == []
        assert gw.membership.rejected == []

    _run(go)


@pytest.mark.parametrize("kind", [Kind.HEARTBEAT, Kind.BEAT])
@pytest.mark.parametrize(
    ("error", "status"),
    [(UnknownNode("heartbeat from unregistered node n1"), 404), (Replayed("nonce already used"), 401)],
)
def test_a_refused_heartbeat_is_answered_as_the_http_endpoint_would(kind: Kind, error: TrustError, status: int) -> None:
    async def go() -> None:
        gw, end = await _dialled()
        gw.membership.error = error
        end.send(kind, CONTROL, b"beat")
        reply = orjson.loads((await end.frame()).payload)
        assert reply["status"] == status
        assert orjson.loads(reply["body"]) == {"error": {"type": error.kind, "message": error.detail}}
        assert gw.membership.rejected == [(error, "/nodes/tunnel", REMOTE)]
        assert gw.hub.get(NODE_ID).ws is end.ws  # a refused heartbeat does not end the tunnel

    _run(go)


class Closing:
    """Stands for the gateway's own WebSocket protocol under a tunnel (TunnelConn.direct): records its closes."""

    def __init__(self) -> None:
        self.closed: list[tuple[int, str]] = []

    def close(self, code: int, reason: str) -> None:
        self.closed.append((code, reason))


def test_a_tunnel_silent_for_four_heartbeat_intervals_is_closed() -> None:
    """The gateway does not ping tunnels on its own socket; one whose node has sent nothing (no frame, no ping) for
    `silent_after_s` (a half-open connection) is closed by the sweep, which looks at most four times per
    `silent_after_s`. A tunnel whose node has not registered yet is the registration grace's to close, and its
    silence counts from registration; one read through ASGI keeps uvicorn's pings and is never closed here."""

    async def go() -> None:
        gw, _ = await _dialled()
        hub, conn = gw.hub, gw.conn()
        assert conn.direct is None
        socket = Closing()
        assert hub.close_silent(conn.heard_at + 10 * hub.silent_after_s) == 0  # (read through ASGI)
        conn.direct = socket  # type: ignore[assignment]
        assert hub.silent_after_s == max(4 * INTERVAL_S, 20.0)
        heard = conn.heard_at
        hub._scanned_at = heard
        assert hub.close_silent(heard + hub.silent_after_s - 1) == 0  # not silent long enough
        assert hub.close_silent(heard + hub.silent_after_s + 1) == 0  # not a quarter-period since the last look
        gw.membership.nodes.pop(NODE.node_id)
        later = heard + 3 * hub.silent_after_s
        assert hub.close_silent(later) == 0  # not a member: not closed, and silence now counts from `later`
        assert conn.heard_at == later
        gw.membership.nodes[NODE.node_id] = object()
        pinged = conn.heard_at = later + 5  # the node pinged (or sent a frame): silence counts from here
        assert hub.close_silent(pinged + hub.silent_after_s - 1) == 0 and socket.closed == []
        assert hub.close_silent(pinged + 2 * hub.silent_after_s) == 1
        ((code, reason),) = socket.closed
        assert code == 1001 and reason.startswith(f"nothing from node {NODE_ID} in ")

    _run(go)


def test_a_frame_from_the_node_counts_as_hearing_from_it() -> None:
    async def go() -> None:
        gw, end = await _dialled()
        conn = gw.conn()
        conn.heard_at = 0.0
        end.send(Kind.BEAT, CONTROL, b"{}")
        await end.frame()
        assert conn.heard_at > time.monotonic() - GUARD_S
        conn.heard_at = 0.0
        conn.heard()  # what the gateway's socket calls on a ping (tunnel_socket.py, DirectSocket.attach's `pinged`)
        assert conn.heard_at > time.monotonic() - GUARD_S
        assert gw.hub.close_silent(conn.heard_at + gw.hub.silent_after_s / 2) == 0

    _run(go)


# -- generate -----------------------------------------------------------------------------------------------------
def test_generate_sends_a_request_signed_by_the_gateway_for_this_node() -> None:
    async def go() -> None:
        call = await _call(_generate("hi"))
        request = call.request
        assert request.kind == Kind.REQUEST
        assert request.stream == 1
        head, _, body = request.payload.partition(b"\n")
        meta = orjson.loads(head)
        assert (meta["method"], meta["path"]) == ("POST", "/internal/generate")
        assert meta["headers"]["content-type"] == "application/json"
        verifier = EnvelopeVerifier(FreshnessPolicy(), time.time)
        envelope = verifier.verify(body, purpose="generate", expected_keyid=call.gw.identity.public_key)
        assert envelope.payload["node_id"] == NODE_ID
        assert (envelope.payload["request_id"], envelope.payload["prompt"]) == ("r1", "hi")
        call.task.cancel()

    _run(go)


EVENTS: list[dict[str, Any]] = [
    {"text": "Hel", "token_ids": [1]},
    {"busy": 3},
    {"text": "lo", "token_ids": [2]},
    {"busy": 4},
    {"text": " wörld", "token_ids": [3, 4]},
    {"text": "", "token_ids": [5], "finish_reason": "stop", "completion_tokens": 5},
]
BODY = _ndjson(*EVENTS[:3]) + b"\n  \n" + _ndjson(*EVENTS[3:])
"""The node's NDJSON, with blank lines the reader skips."""


@settings(max_examples=40, deadline=None)
@given(cuts=st.lists(st.integers(min_value=0, max_value=len(BODY)), max_size=10), trailing=st.booleans())
def test_generate_yields_the_events_however_the_body_is_cut_into_frames(cuts: list[int], trailing: bool) -> None:
    body = BODY if trailing else BODY[:-1]  # the last event may come without its newline
    points = sorted({min(c, len(body)) for c in cuts})
    pieces = [body[a:b] for a, b in zip([0, *points], [*points, len(body)], strict=True)]

    async def go() -> None:
        gw, end = await _dialled()
        stream, number = await _generating(gw, end)
        for piece in pieces[:-1]:
            end.send(Kind.BODY, number, piece)
        end.send(Kind.END, number, pieces[-1])
        assert await _drain(stream) == [e for e in EVENTS if "busy" not in e]
        assert stream.busy_at > 0.0
        assert await stream.next() is None
        assert number not in gw.conn().streams
        stream.close()  # after END: nothing to cancel
        assert await end.quiet() == []

    _run(go)


def test_busy_lines_only_move_busy_at() -> None:
    async def go() -> None:
        gw, end = await _dialled()
        stream, number = await _generating(gw, end)
        assert stream.busy_at == 0.0
        end.send(Kind.BODY, number, _ndjson({"busy": 1}, {"busy": 2}))
        end.send(Kind.BODY, number, _ndjson({"text": "a", "token_ids": [1]}))
        before = asyncio.get_running_loop().time()
        assert await stream.next() == {"text": "a", "token_ids": [1]}
        assert stream.busy_at >= before
        stream.busy_at = 0.0
        end.send(Kind.END, number, _ndjson({"busy": 3}))
        assert await stream.next() is None  # a busy line is never an event, even the last one
        assert stream.busy_at > 0.0

    _run(go)


async def _ready_soon(stream: TunnelEventStream) -> bool:
    """Whether the stream says a token is here within 1 s (its frames are on their way through the tunnel)."""
    for _ in range(100):
        if stream.ready():
            return True
        await asyncio.sleep(0.01)
    return False


def test_ready_takes_in_frames_already_queued_and_looks_at_the_next_line_only() -> None:
    """`ready` looks past the buffer at frames the tunnel has already queued for the stream: a token that came in
    its own frame goes out with the one before; the last event, and the tunnel's end, are never `ready`."""

    async def go() -> None:
        gw, end = await _dialled()
        stream, number = await _generating(gw, end)
        end.send(Kind.BODY, number, _ndjson({"text": "a", "token_ids": [1]}))
        end.send(Kind.BODY, number, _ndjson({"text": "b", "token_ids": [2]}))
        end.send(Kind.BODY, number, _ndjson({"text": "", "finish_reason": "stop", "token_ids": []}))
        assert await stream.next() == {"text": "a", "token_ids": [1]}
        assert await _ready_soon(stream)  # b came in a frame of its own, queued
        assert await stream.next() == {"text": "b", "token_ids": [2]}
        await _turns()  # (every frame sent is taken in by now: all in memory)
        assert not stream.ready()  # the last event is not a token
        assert await stream.next() == {"text": "", "finish_reason": "stop", "token_ids": []}
        cut, number = await _generating(gw, end)
        end.send(Kind.BODY, number, _ndjson({"text": "c", "token_ids": [3]}) + b'{"text": "d", "tok')
        end.hang_up()
        assert await _ready_soon(cut)
        assert await cut.next() == {"text": "c", "token_ids": [3]}
        await _turns()
        assert not cut.ready()  # half a line, then the tunnel's end: not a token
        with pytest.raises(BrokenStream, match="closed: the connection ended"):
            await cut.next()

    _run(go)


def test_a_non_200_head_is_refused_with_the_nodes_own_message() -> None:
    async def go() -> None:
        call = await _call(_generate())
        call.answer(
            b'{"status":503,"headers":{"content-type":"application/json"}}',
            b'{"error":{"type":"overloaded","message":"queue full (12 waiting)"}}',
        )
        with pytest.raises(Refused) as caught:
            await call.task
        assert (caught.value.status, caught.value.message) == (503, "queue full (12 waiting)")
        assert call.gw.conn().streams == {}
        assert await call.end.quiet() == []  # the node ended the stream itself: no CANCEL

    _run(go)


def test_a_refusal_whose_body_does_not_end_is_cut_and_cancelled() -> None:
    async def go() -> None:
        call = await _call(_generate())
        call.answer(500, b"x" * 5000, ended=False)
        with pytest.raises(Refused) as caught:
            await call.task
        assert caught.value.status == 500
        assert caught.value.message == "x" * 300
        assert await call.end.frame() == Frame(Kind.CANCEL, call.number, b"")

    _run(go)


def test_a_tunnel_that_ends_before_the_head_makes_the_node_unreachable() -> None:
    async def go() -> None:
        call = await _call(_generate())
        call.end.hang_up()
        with pytest.raises(Unreachable, match="closed: the connection ended") as caught:
            await call.task
        assert caught.value.cause == "tunnel closed"

    _run(go)


def test_a_reply_that_does_not_start_with_a_head_is_malformed_and_cancelled() -> None:
    async def go() -> None:
        call = await _call(_generate())
        call.send(Kind.BODY, _ndjson({"text": "a"}))
        with pytest.raises(Malformed, match="expected a reply head, got BODY"):
            await call.task
        assert await call.end.frame() == Frame(Kind.CANCEL, call.number, b"")
        assert call.gw.conn().streams == {}

    _run(go)


@pytest.mark.parametrize("head", [b"not json", b"{}", b'{"status":"ok"}', b"[200]"])
def test_a_head_without_a_status_is_malformed(head: bytes) -> None:
    async def go() -> None:
        call = await _call(_generate())
        call.answer(head)
        with pytest.raises(Malformed, match="expected a reply head, got HEAD without a status"):
            await call.task
        assert await call.end.frame() == Frame(Kind.CANCEL, call.number, b"")
        assert call.gw.conn().streams == {}

    _run(go)


def test_the_tunnel_closing_mid_stream_breaks_the_stream() -> None:
    async def go() -> None:
        gw, end = await _dialled()
        stream, number = await _generating(gw, end)
        end.send(Kind.BODY, number, _ndjson({"text": "a", "token_ids": [1]}) + b'{"text": "b", "tok')
        assert await stream.next() == {"text": "a", "token_ids": [1]}
        end.hang_up()
        with pytest.raises(BrokenStream, match="closed: the connection ended"):
            await stream.next()

    _run(go)


def test_closing_a_stream_early_cancels_it_on_the_node() -> None:
    async def go() -> None:
        gw, end = await _dialled()
        stream, number = await _generating(gw, end)
        other, other_number = await _generating(gw, end)
        end.send(Kind.BODY, number, _ndjson({"text": "a", "token_ids": [1]}))
        assert await stream.next() == {"text": "a", "token_ids": [1]}
        stream.close()
        assert await end.frame() == Frame(Kind.CANCEL, number, b"")
        assert list(gw.conn().streams) == [other_number]
        stream.close()
        end.send(Kind.END, number, _ndjson({"text": "late"}))  # what was under way is dropped
        end.send(Kind.END, other_number, _ndjson({"text": "b", "token_ids": [2]}))
        assert await _drain(other) == [{"text": "b", "token_ids": [2]}]
        assert await end.quiet() == []  # closed once, cancelled once

    _run(go)


@pytest.mark.parametrize(("line", "why"), [(b'{"text": "a", "tok\n', "unexpected"), (b"[1, 2]\n", "not an event")])
def test_a_line_that_is_not_an_event_is_malformed(line: bytes, why: str) -> None:
    async def go() -> None:
        gw, end = await _dialled()
        stream, number = await _generating(gw, end)
        end.send(Kind.BODY, number, line)
        with pytest.raises(Malformed, match=why):
            await stream.next()

    _run(go)


# -- probe and load -------------------------------------------------------------------------------------------------
def test_a_probe_of_a_node_without_a_tunnel_is_unreachable() -> None:
    async def go() -> None:
        gw = Gateway()
        with pytest.raises(Unreachable, match=f"node {NODE_ID} has no tunnel open") as caught:
            await gw.transport.probe(NODE_ID, ENDPOINT, 1.0, "c1")
        assert caught.value.cause == "no tunnel"

    _run(go)


def test_a_probe_asks_for_health_with_the_challenge_and_returns_the_body() -> None:
    async def go() -> None:
        call = await _call(_probe(challenge="c-42"))
        assert call.request.kind == Kind.REQUEST
        assert call.request.payload == request_payload("GET", "/health?challenge=c-42", {}, b"")
        call.answer(200, b'{"signed":', b'"health"}')
        assert await call.task == b'{"signed":"health"}'
        assert call.gw.conn().streams == {}
        assert await call.end.quiet() == []

    _run(go)


def test_an_unhealthy_answer_is_refused() -> None:
    async def go() -> None:
        call = await _call(_probe())
        call.answer(503, b"draining")
        with pytest.raises(Refused) as caught:
            await call.task
        assert (caught.value.status, caught.value.message) == (503, "unhealthy")

    _run(go)


def test_a_probe_the_node_never_answers_times_out_and_is_cancelled() -> None:
    async def go() -> None:
        call = await _call(_probe(timeout_s=0.05))
        with pytest.raises(Timeout, match="no answer in") as caught:
            await call.task
        assert caught.value.cause == "TimeoutError"
        assert await call.end.frame() == Frame(Kind.CANCEL, call.number, b"")
        assert call.gw.conn().streams == {}

    _run(go)


def test_a_probe_answer_is_cut_at_its_limit_and_the_rest_cancelled() -> None:
    async def go() -> None:
        call = await _call(_probe())
        call.answer(200, b"a" * (MAX_PROBE_BYTES - 10), b"b" * 100, ended=False)
        assert await call.task == b"a" * (MAX_PROBE_BYTES - 10) + b"b" * 10
        assert await call.end.frame() == Frame(Kind.CANCEL, call.number, b"")

    _run(go)


def test_a_tunnel_that_ends_mid_answer_makes_the_probe_unreachable() -> None:
    async def go() -> None:
        call = await _call(_probe())
        call.answer(200, b"{", ended=False)
        call.end.hang_up()
        with pytest.raises(Unreachable, match="closed: the connection ended"):
            await call.task

    _run(go)


def test_a_request_the_tunnel_cannot_send_is_unreachable() -> None:
    async def go() -> None:
        gw, end = await _dialled()
        end.broken = True
        with pytest.raises(Unreachable) as caught:
            await gw.transport.probe(NODE_ID, ENDPOINT, 1.0, "c1")
        assert caught.value.cause == "WebSocketDisconnect"
        assert gw.conn().streams == {}

    _run(go)


def test_load_sends_a_signed_load_and_accepts_202() -> None:
    async def go() -> None:
        call = await _call(_load())
        head, _, body = call.request.payload.partition(b"\n")
        assert orjson.loads(head) == {
            "method": "POST",
            "path": "/internal/load",
            "headers": {"content-type": "application/json"},
        }
        verifier = EnvelopeVerifier(FreshnessPolicy(), time.time)
        envelope = verifier.verify(body, purpose="load", expected_keyid=call.gw.identity.public_key)
        assert envelope.payload == {"node_id": NODE_ID, "model": "m"}
        call.answer(202, b'{"loading":true}')
        await call.task  # 202: accepted (anything else raises)
        assert call.gw.conn().streams == {}

    _run(go)


def test_a_declined_load_is_refused() -> None:
    async def go() -> None:
        call = await _call(_load())
        call.answer(409, b'{"error":{"message":"busy"}}')
        with pytest.raises(Refused) as caught:
            await call.task
        assert (caught.value.status, caught.value.message) == (409, "declined")

    _run(go)


# -- stage links ----------------------------------------------------------------------------------------------------
async def _stage(gw: Gateway, end: NodeEnd) -> tuple[TunnelStageChannel, int]:
    """A stage link the node accepted, and its stream number."""
    call = await _call(_stage_link(), (gw, end))
    assert call.request.kind == Kind.WS_OPEN
    assert orjson.loads(call.request.payload) == {"path": "/internal/stage"}
    call.send(Kind.WS_ACCEPT)
    return await call.task, call.number


def test_a_stage_link_carries_frames_both_ways_until_the_node_closes_it() -> None:
    async def go() -> None:
        gw, end = await _dialled()
        channel, number = await _stage(gw, end)
        assert not channel.closed
        await channel.send(b"hidden states")
        assert await end.frame() == Frame(Kind.WS_DATA, number, b"hidden states")
        await channel.send(b"more")
        assert await end.frame() == Frame(Kind.WS_DATA, number, b"more")
        end.send(Kind.WS_DATA, number, b"logits")
        assert await channel.receive(1.0) == b"logits"
        end.send(Kind.WS_DATA, number, b"again")
        assert await channel.receive(1.0) == b"again"
        end.send(Kind.WS_CLOSE, number, b'{"code":1000,"reason":"done"}')
        with pytest.raises(BrokenStream, match=re.escape('stage connection closed ({"code":1000,"reason":"done"})')):
            await channel.receive(1.0)
        assert channel.closed
        assert number not in gw.conn().streams
        with pytest.raises(BrokenStream, match="stage link closed"):
            await channel.send(b"x")
        await channel.aclose()
        assert await end.quiet() == []  # the node closed it: nothing to tell it

    _run(go)


def test_a_stage_link_the_node_refuses_is_refused() -> None:
    async def go() -> None:
        call = await _call(_stage_link())
        call.send(Kind.WS_CLOSE, b'{"code":1008,"reason":"no such route"}')
        with pytest.raises(Refused, match="no such route") as caught:
            await call.task
        assert caught.value.status == 403
        assert call.gw.conn().streams == {}

    _run(go)


def test_a_stage_link_that_does_not_open_in_time_times_out() -> None:
    async def go() -> None:
        gw, end = await _dialled()
        with pytest.raises(Timeout, match="did not open"):
            await gw.transport.stage_link(NODE_ID, ENDPOINT, 0.05)
        assert gw.conn().streams == {}
        assert end.ws is gw.conn().ws

    _run(go)


def test_closing_a_stage_link_tells_the_node_once() -> None:
    async def go() -> None:
        gw, end = await _dialled()
        channel, number = await _stage(gw, end)
        await channel.aclose()
        assert await end.frame() == Frame(Kind.WS_CLOSE, number, b"")
        await channel.aclose()
        assert await end.quiet() == []
        assert channel.closed
        with pytest.raises(BrokenStream):
            await channel.send(b"x")

    _run(go)


def test_a_stage_link_whose_tunnel_ends_reads_as_closed() -> None:
    async def go() -> None:
        gw, end = await _dialled()
        channel, _ = await _stage(gw, end)
        quiet, _ = await _stage(gw, end)
        with pytest.raises(Timeout, match=re.escape("no stage frame in 0.05 s")):
            await quiet.receive(0.05)
        end.hang_up()
        with pytest.raises(BrokenStream, match="closed: the connection ended"):
            await channel.receive(1.0)
        assert channel.closed and quiet.closed

    _run(go)


def test_a_stage_frame_the_tunnel_cannot_send_breaks_the_link() -> None:
    async def go() -> None:
        gw, end = await _dialled()
        channel, _ = await _stage(gw, end)
        end.broken = True
        with pytest.raises(BrokenStream) as caught:
            await channel.send(b"x")
        assert caught.value.cause == "WebSocketDisconnect"

    _run(go)


# -- the node's end -------------------------------------------------------------------------------------------------
class NodeWire:
    """The node's aiohttp WebSocket, reduced to what serving frames uses: it records what is sent (opened with the
    gateway's end of the channel, so each frame is also checked to come sealed and in order)."""

    def __init__(self, opener: Opener) -> None:
        self.opener = opener
        self.sent: list[Frame] = []
        self.closed = False

    async def send_bytes(self, data: bytes) -> None:
        if self.closed:
            raise aiohttp.ClientConnectionResetError("Cannot write to closing transport")
        self.sent.append(self.opener.open(data))

    def on(self, stream: int) -> list[Frame]:
        return [f for f in self.sent if f.stream == stream]


def _node_app(seen: list[Any]) -> Starlette:
    async def health(request: Request) -> Response:
        client = request.client.host if request.client else None
        return JSONResponse(
            {"challenge": request.query_params.get("challenge"), "method": request.method, "client": client}
        )

    async def generate(request: Request) -> Response:
        job = orjson.loads(await request.body())
        prompt = job["payload"]["prompt"] if "payload" in job else job["prompt"]

        async def lines() -> Any:
            yield _ndjson({"busy": 1})
            for i, ch in enumerate(prompt):
                yield _ndjson({"text": ch, "token_ids": [i]})
            yield _ndjson({"text": "", "token_ids": [], "finish_reason": "stop"})

        return StreamingResponse(lines(), media_type="application/x-ndjson")

    async def load(request: Request) -> Response:
        seen.append(("load", await request.body()))
        return JSONResponse({"loading": True}, status_code=202)

    async def faults(request: Request) -> Response:
        seen.append("faults")
        return JSONResponse({})

    async def stage(ws: WebSocket) -> None:
        await ws.accept()
        try:
            while True:
                data = await ws.receive_bytes()
                if data == b"bye":
                    await ws.close(code=4000, reason="done")
                    return
                await ws.send_bytes(b"echo:" + data)
        except WebSocketDisconnect as exc:
            seen.append(("disconnect", exc.code))

    return Starlette(
        routes=[
            Route("/health", health),
            Route("/internal/generate", generate, methods=["POST"]),
            Route("/internal/load", load, methods=["POST"]),
            Route("/internal/faults", faults, methods=["POST"]),
            WebSocketRoute("/internal/stage", stage),
        ]
    )


Feed = Callable[..., None]


def _node(app: Any) -> tuple[NodeTunnel, NodeWire, Feed]:
    """A node whose tunnel is open (as after a greeting), and `feed(kind, stream, payload)`: a frame from the
    gateway, sealed with the gateway's end of the channel, as the node's read loop hands it over."""
    shared, transcript = bytes(range(32)), b"challenge|nonce"
    g_sealer, g_opener = gateway_side(shared, transcript)
    tunnel = NodeTunnel(NODE, app, "http://gw.test")
    wire = NodeWire(g_opener)
    tunnel._ws = cast(Any, wire)
    tunnel._sealer, tunnel._opener = node_side(shared, transcript)
    tunnel.connected.set()

    def feed(kind: Kind, stream: int, payload: bytes = b"") -> None:
        tunnel._on_frame(g_sealer.seal(kind, stream, payload))

    return tunnel, wire, feed


async def _served(tunnel: NodeTunnel) -> None:
    """Wait for every exchange under way on the node to finish."""
    if tunnel._tasks:
        _, pending = await asyncio.wait(set(tunnel._tasks), timeout=GUARD_S)
        assert not pending, "an exchange on the node never finished"


def test_the_fault_routes_are_not_in_the_tunnels_routes() -> None:
    assert {"/health", "/internal/generate", "/internal/load", "/internal/stage"} <= ROUTES
    assert not any("fault" in route for route in ROUTES)


@pytest.mark.parametrize("path", ["/internal/faults", "/internal/faults?kind=crash", "/admin/nodes", "/"])
def test_a_request_outside_the_routes_gets_404_without_reaching_the_app(path: str) -> None:
    async def go() -> None:
        seen: list[Any] = []
        tunnel, wire, feed = _node(_node_app(seen))
        feed(Kind.REQUEST, 9, request_payload("POST", path, {}, b"{}"))
        await _served(tunnel)
        assert [(f.kind, f.stream) for f in wire.sent] == [(Kind.HEAD, 9), (Kind.END, 9)]
        assert orjson.loads(wire.sent[0].payload) == {"status": 404}
        bare = path.partition("?")[0]
        assert orjson.loads(wire.sent[1].payload) == {
            "error": {"type": "tunnel", "message": f"{bare} is not served through the tunnel"}
        }
        assert seen == []

    _run(go)


@pytest.mark.parametrize("payload", [b"no head at all", b'{"method":"GET"}\n', b"GET /health\n"])
def test_a_request_that_cannot_be_read_gets_400(payload: bytes) -> None:
    async def go() -> None:
        tunnel, wire, feed = _node(_node_app([]))
        feed(Kind.REQUEST, 4, payload)
        await _served(tunnel)
        assert [f.kind for f in wire.sent] == [Kind.HEAD, Kind.END]
        assert orjson.loads(wire.sent[0].payload) == {"status": 400}
        assert orjson.loads(wire.sent[1].payload)["error"]["message"].startswith("bad tunnel request: ")

    _run(go)


def test_a_request_to_an_allowed_route_streams_back_head_bodies_and_end() -> None:
    async def go() -> None:
        tunnel, wire, feed = _node(_node_app([]))
        body = orjson.dumps({"prompt": "hey"})
        feed(Kind.REQUEST, 5, request_payload("POST", "/internal/generate", {"Content-Type": "x"}, body))
        await _served(tunnel)
        kinds = [f.kind for f in wire.on(5)]
        assert kinds[0] == Kind.HEAD and kinds[-1] == Kind.END
        assert set(kinds[1:-1]) <= {Kind.BODY}
        assert len(kinds) >= 3  # the streaming response's chunks come as they are made
        assert orjson.loads(wire.sent[0].payload) == {
            "status": 200,
            "headers": {"content-type": "application/x-ndjson"},
        }
        assert b"".join(f.payload for f in wire.on(5)[1:]) == _ndjson(
            {"busy": 1},
            {"text": "h", "token_ids": [0]},
            {"text": "e", "token_ids": [1]},
            {"text": "y", "token_ids": [2]},
            {"text": "", "token_ids": [], "finish_reason": "stop"},
        )
        assert tunnel._gone == {}

    _run(go)


def test_a_health_request_reaches_the_app_with_its_query_and_a_non_local_client() -> None:
    async def go() -> None:
        tunnel, wire, feed = _node(_node_app([]))
        feed(Kind.REQUEST, 2, request_payload("GET", "/health?challenge=c-9", {}, b""))
        await _served(tunnel)
        assert orjson.loads(wire.sent[0].payload)["status"] == 200
        assert orjson.loads(b"".join(f.payload for f in wire.sent[1:])) == {
            "challenge": "c-9",
            "method": "GET",
            "client": "tunnel",
        }

    _run(go)


def _waiting_app(seen: list[str]) -> Any:
    """An app that answers a first chunk, then waits for its client to go, then tries to answer more."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append((await receive())["type"])
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"a", "more_body": True})
        seen.append("waiting")
        seen.append((await receive())["type"])
        try:
            await send({"type": "http.response.body", "body": b"late", "more_body": False})
        except OSError:
            seen.append("send refused")

    return app


def test_a_cancel_disconnects_the_apps_request() -> None:
    async def go() -> None:
        seen: list[str] = []
        tunnel, wire, feed = _node(_waiting_app(seen))
        feed(Kind.REQUEST, 3, request_payload("POST", "/internal/generate", {}, b"{}"))
        await _until(lambda: "waiting" in seen, "the app waiting")
        feed(Kind.CANCEL, 7)  # another stream's cancel does not touch this one
        await _turns()
        assert seen == ["http.request", "waiting"]
        feed(Kind.CANCEL, 3)
        await _served(tunnel)
        assert seen == ["http.request", "waiting", "http.disconnect", "send refused"]
        assert [f.kind for f in wire.on(3)] == [Kind.HEAD, Kind.BODY]  # nothing after the cancel
        assert tunnel._gone == {}

    _run(go)


def test_a_cancel_right_behind_its_request_still_disconnects_it() -> None:
    async def go() -> None:
        seen: list[str] = []
        tunnel, wire, feed = _node(_waiting_app(seen))
        feed(Kind.REQUEST, 3, request_payload("POST", "/internal/generate", {}, b"{}"))
        feed(Kind.CANCEL, 3)  # both frames came in one read from the socket: no task ran in between
        await _turns()
        try:
            assert not tunnel._tasks  # the exchange ended (its app saw the client go), as for a later cancel
            assert Kind.END not in [f.kind for f in wire.on(3)]
        finally:
            tunnel._lost()

    _run(go)


def test_a_lost_tunnel_disconnects_every_exchange_on_the_node() -> None:
    async def go() -> None:
        seen: list[Any] = []
        tunnel, wire, feed = _node(_waiting_app(seen))
        feed(Kind.REQUEST, 1, request_payload("POST", "/internal/generate", {}, b"{}"))
        await _until(lambda: "waiting" in seen, "the app waiting")
        wire.closed = True
        tunnel._lost()
        await _served(tunnel)
        assert seen == ["http.request", "waiting", "http.disconnect", "send refused"]
        assert tunnel._ws is None
        assert not tunnel.connected.is_set()
        assert await tunnel.heartbeat(b"beat") is None  # down: the caller sends it over HTTP

    _run(go)


def test_a_stage_link_runs_the_apps_websocket_route() -> None:
    async def go() -> None:
        seen: list[Any] = []
        tunnel, wire, feed = _node(_node_app(seen))
        feed(Kind.WS_OPEN, 6, orjson.dumps({"path": "/internal/stage"}))
        await _until(lambda: len(wire.sent) == 1, "the accept")
        assert wire.sent == [Frame(Kind.WS_ACCEPT, 6, b"")]
        feed(Kind.WS_DATA, 6, b"step-1")
        feed(Kind.WS_DATA, 8, b"not this link")
        feed(Kind.WS_DATA, 6, b"bye")
        await _served(tunnel)
        assert wire.sent[1:] == [
            Frame(Kind.WS_DATA, 6, b"echo:step-1"),
            Frame(Kind.WS_CLOSE, 6, b'{"code":4000,"reason":"done"}'),
        ]
        assert tunnel._sockets == {}
        assert seen == []

    _run(go)


def test_a_stage_link_closed_by_the_gateway_disconnects_the_route() -> None:
    async def go() -> None:
        seen: list[Any] = []
        tunnel, wire, feed = _node(_node_app(seen))
        feed(Kind.WS_OPEN, 6, orjson.dumps({"path": "/internal/stage"}))
        await _until(lambda: len(wire.sent) == 1, "the accept")
        feed(Kind.WS_CLOSE, 6)
        await _served(tunnel)
        assert seen == [("disconnect", 1000)]
        assert tunnel._sockets == {}

    _run(go)


def test_a_websocket_outside_the_routes_is_closed_with_1008() -> None:
    async def go() -> None:
        tunnel, wire, feed = _node(_node_app([]))
        feed(Kind.WS_OPEN, 6, orjson.dumps({"path": "/internal/faults"}))
        await _served(tunnel)
        assert wire.sent == [Frame(Kind.WS_CLOSE, 6, b'{"code":1008,"reason":"no such route"}')]
        assert tunnel._sockets == {}

    _run(go)


def test_a_heartbeat_goes_over_the_tunnel_and_returns_the_gateways_answer() -> None:
    async def go() -> None:
        tunnel, wire, feed = _node(_node_app([]))
        task = asyncio.ensure_future(tunnel.heartbeat(b"signed beat"))
        await _until(lambda: len(wire.sent) == 1, "the heartbeat")
        assert wire.sent == [Frame(Kind.HEARTBEAT, CONTROL, b"signed beat")]
        assert await tunnel.heartbeat(b"second") is None  # one at a time
        feed(Kind.HEARTBEAT_REPLY, CONTROL, b'{"status":404,"body":"{\\"error\\":1}"}')
        assert await task == (404, b'{"error":1}')
        assert tunnel._heartbeat is None

    _run(go)


@pytest.mark.parametrize(("channel_beats", "sent"), [(True, Kind.BEAT), (False, Kind.HEARTBEAT)])
def test_a_node_sends_the_bare_beat_where_the_gateway_takes_it_else_the_signed_one(
    channel_beats: bool, sent: Kind
) -> None:
    async def go() -> None:
        tunnel, wire, feed = _node(_node_app([]))
        tunnel._channel_beats = channel_beats
        task = asyncio.ensure_future(tunnel.heartbeat(b"signed beat", b"bare beat"))
        await _until(lambda: len(wire.sent) == 1, "the heartbeat")
        assert wire.sent == [Frame(sent, CONTROL, b"bare beat" if sent == Kind.BEAT else b"signed beat")]
        feed(Kind.HEARTBEAT_REPLY, CONTROL, b'{"status":200,"body":"{\\"ok\\":true}"}')
        assert await task == (200, b'{"ok":true}')
        wire.sent.clear()
        task = asyncio.ensure_future(tunnel.heartbeat(b"signed only"))  # no bare payload given: signed
        await _until(lambda: len(wire.sent) == 1, "the second heartbeat")
        assert wire.sent == [Frame(Kind.HEARTBEAT, CONTROL, b"signed only")]
        feed(Kind.HEARTBEAT_REPLY, CONTROL, b'{"status":200,"body":""}')
        assert await task == (200, b"")

    _run(go)


def test_a_heartbeat_under_way_when_the_tunnel_is_lost_falls_back() -> None:
    async def go() -> None:
        tunnel, wire, _ = _node(_node_app([]))
        task = asyncio.ensure_future(tunnel.heartbeat(b"beat"))
        await _until(lambda: len(wire.sent) == 1, "the heartbeat")
        tunnel._lost()
        assert await task is None

    _run(go)


# -- both ends at once --------------------------------------------------------------------------------------------
class NodeSocket:
    """The node's aiohttp WebSocket, wired in memory to the gateway's Starlette WebSocket (a NodeEnd)."""

    def __init__(self, end: NodeEnd) -> None:
        self.end = end
        self.closed = False
        self.close_code: int | None = None

    async def send_bytes(self, data: bytes) -> None:
        if self.closed:
            raise aiohttp.ClientConnectionResetError("Cannot write to closing transport")
        self.end.to_gateway.put_nowait({"type": "websocket.receive", "bytes": data})

    async def receive(self) -> aiohttp.WSMessage:
        message = await self.end.message()
        if message["type"] == "websocket.send":
            return aiohttp.WSMessage(aiohttp.WSMsgType.BINARY, message["bytes"], None)
        self.closed, self.close_code = True, message.get("code")
        return aiohttp.WSMessage(aiohttp.WSMsgType.CLOSE, self.close_code, message.get("reason"))

    def __aiter__(self) -> "NodeSocket":
        return self

    async def __anext__(self) -> aiohttp.WSMessage:
        message = await self.receive()
        if message.type == aiohttp.WSMsgType.CLOSE:
            raise StopAsyncIteration
        return message


class Dialer:
    """The node's aiohttp session: `ws_connect` opens the in-memory socket; leaving it hangs up."""

    def __init__(self, end: NodeEnd) -> None:
        self.socket = NodeSocket(end)
        self.urls: list[str] = []

    def ws_connect(self, url: str, **kwargs: Any) -> "Dialer":
        self.urls.append(url)
        return self

    async def __aenter__(self) -> NodeSocket:
        return self.socket

    async def __aexit__(self, *exc: object) -> None:
        self.socket.closed = True
        self.socket.end.hang_up()


def test_a_node_tunnel_serves_generate_probe_load_stage_and_heartbeats_for_the_gateway() -> None:
    async def go() -> None:
        gw = Gateway()
        end = gw.accept()
        seen: list[Any] = []
        learned: list[str] = []
        tunnel = NodeTunnel(
            NODE,
            _node_app(seen),
            "http://gw.test/",
            gateway_key=lambda: gw.identity.public_key,
            learned_key=learned.append,
        )
        dialer = Dialer(end)
        node = asyncio.ensure_future(tunnel._connect_and_serve(cast(Any, dialer)))
        await asyncio.wait_for(tunnel.connected.wait(), GUARD_S)
        await _until(lambda: NODE_ID in gw.hub.conns, "the tunnel open at the gateway")
        assert dialer.urls == ["ws://gw.test/nodes/tunnel"]
        assert learned == [gw.identity.public_key]
        assert tunnel.connections == 1

        stream = await gw.transport.generate(NODE_ID, ENDPOINT, _job("ok"))
        assert [e["text"] for e in await _drain(stream)] == ["o", "k", ""]
        assert stream.busy_at > 0.0

        health = orjson.loads(await gw.transport.probe(NODE_ID, ENDPOINT, GUARD_S, "c-7"))
        assert health == {"challenge": "c-7", "method": "GET", "client": "tunnel"}

        await gw.transport.load(NODE_ID, ENDPOINT, {"model": "m"}, GUARD_S)
        verifier = EnvelopeVerifier(FreshnessPolicy(), time.time)
        envelope = verifier.verify(seen[0][1], purpose="load", expected_keyid=gw.identity.public_key)
        assert envelope.payload == {"node_id": NODE_ID, "model": "m"}

        channel = await gw.transport.stage_link(NODE_ID, ENDPOINT, GUARD_S)
        await channel.send(b"x")
        assert await channel.receive(GUARD_S) == b"echo:x"
        await channel.send(b"bye")
        with pytest.raises(BrokenStream, match="4000"):
            await channel.receive(GUARD_S)

        assert tunnel._channel_beats  # the welcome said so
        assert await tunnel.heartbeat(b"signed", b'{"bare":1}') == (200, b'{"ok":true}')
        assert gw.membership.channel_beats == [(NODE_ID, b'{"bare":1}')]
        assert await tunnel.heartbeat(b"beat") == (200, b'{"ok":true}')
        assert gw.membership.beats == [b"beat"]

        node.cancel()
        await asyncio.gather(node, return_exceptions=True)
        tunnel._lost()
        await end.ended()
        assert gw.hub.conns == {}

    _run(go)


def test_a_node_that_pinned_another_gateway_key_refuses_the_welcome() -> None:
    async def go() -> None:
        gw = Gateway()
        end = gw.accept()
        learned: list[str] = []
        pinned = Identity.generate().public_key
        tunnel = NodeTunnel(
            NODE, _node_app([]), "https://gw.test", gateway_key=lambda: pinned, learned_key=learned.append
        )
        dialer = Dialer(end)
        with pytest.raises(WrongSigner):
            await tunnel._connect_and_serve(cast(Any, dialer))
        assert dialer.urls == ["wss://gw.test/nodes/tunnel"]
        assert learned == []
        assert not tunnel.connected.is_set()
        await end.ended()
        assert gw.hub.conns == {}

    _run(go)


def test_a_node_the_gateway_refuses_learns_why() -> None:
    async def go() -> None:
        gw = Gateway()
        gw.hub.verifier = EnvelopeVerifier(FreshnessPolicy(), lambda: time.time() + 3600)  # the node's clock is off
        end = gw.accept()
        tunnel = NodeTunnel(NODE, _node_app([]), "http://gw.test")
        with pytest.raises(TunnelClosed, match="refused: expired"):
            await tunnel._connect_and_serve(cast(Any, Dialer(end)))
        assert tunnel.connections == 0
        assert gw.hub.conns == {}

    _run(go)


# -- the node's dial loop, against a scripted gateway -----------------------------------------------------------------
Reply = Callable[[dict[str, Any]], bytes]


class ScriptedSocket:
    """One dial's gateway: a challenge, then `reply(hello payload)` (no checks of its own), once `gate` opens."""

    def __init__(self, reply: Reply, gate: "asyncio.Future[None] | None") -> None:
        self.reply, self.gate = reply, gate
        self.closed = False
        self.close_code: int | None = None
        self.waiting = False
        """Whether the node waits for the answer to its hello."""
        self._hello: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._answered = 0

    async def send_bytes(self, data: bytes) -> None:
        if not self._hello.done():
            self._hello.set_result(orjson.loads(decode(data).payload)["payload"])

    async def receive(self) -> aiohttp.WSMessage:
        self._answered += 1
        if self._answered == 1:
            data = encode(Kind.CHALLENGE, CONTROL, b'{"challenge":"c-1"}')
        else:
            hello = await self._hello
            self.waiting = True
            if self.gate is not None:
                await self.gate
            data = self.reply(hello)
        return aiohttp.WSMessage(aiohttp.WSMsgType.BINARY, data, None)


class ScriptedSession:
    """aiohttp's ClientSession as the node's run loop uses it: every ws_connect dials a new ScriptedSocket."""

    def __init__(self, reply: Reply) -> None:
        self.reply = reply
        self.gate: asyncio.Future[None] | None = None
        self.sockets: list[ScriptedSocket] = []

    @property
    def dials(self) -> int:
        return len(self.sockets)

    async def __aenter__(self) -> "ScriptedSession":
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    def ws_connect(self, url: str, **kwargs: Any) -> "ScriptedDial":
        self.sockets.append(ScriptedSocket(self.reply, self.gate))
        return ScriptedDial(self.sockets[-1])


class ScriptedDial:
    def __init__(self, socket: ScriptedSocket) -> None:
        self.socket = socket

    async def __aenter__(self) -> ScriptedSocket:
        return self.socket

    async def __aexit__(self, *exc: object) -> None:
        self.socket.closed = True


async def _stop(task: "asyncio.Task[None]") -> None:
    """Cancel the dial loop (again, if a cancel went astray) and wait for it to end."""
    for _ in range(100):
        if task.done():
            break
        task.cancel()
        await _turns(5)
    await asyncio.wait({task}, timeout=GUARD_S)
    assert task.done(), "the node's dial loop would not stop"


Scripted = Callable[[Reply], ScriptedSession]


@pytest.fixture
def scripted(monkeypatch: pytest.MonkeyPatch) -> Scripted:
    """Make the node's run loop dial a scripted gateway, and dial again at once (a backoff of 0 s: no clock)."""
    monkeypatch.setattr(node_tunnel, "random", SimpleNamespace(uniform=lambda low, high: 0.0))

    def install(reply: Reply) -> ScriptedSession:
        session = ScriptedSession(reply)
        monkeypatch.setattr(aiohttp, "ClientSession", lambda **kwargs: session)
        return session

    return install


def _refuse(hello: dict[str, Any]) -> bytes:
    return encode(Kind.WS_CLOSE, CONTROL, b"expired")


def test_a_node_the_gateway_refuses_dials_again(scripted: Scripted) -> None:
    async def go() -> None:
        session = scripted(_refuse)
        tunnel = NodeTunnel(NODE, _node_app([]), "http://gw.test")
        task = asyncio.ensure_future(tunnel.run())
        try:
            await _until(lambda: session.dials >= 3 or task.done(), "three dials")
            assert not task.done()
            assert session.sockets[0].closed and session.sockets[1].closed
            assert tunnel.connections == 0
            assert not tunnel.connected.is_set()
        finally:
            await _stop(task)
        assert task.cancelled()

    _run(go)


def test_cancelling_the_dial_loop_as_a_greeting_ends_stops_it(scripted: Scripted) -> None:
    async def go() -> None:
        session = scripted(_refuse)
        session.gate = asyncio.get_running_loop().create_future()
        tunnel = NodeTunnel(NODE, _node_app([]), "http://gw.test")
        task = asyncio.ensure_future(tunnel.run())
        try:
            await _until(lambda: session.dials == 1 and session.sockets[0].waiting, "the hello sent")
            session.gate.set_result(None)  # the gateway's refusal arrives...
            task.cancel()  # ...as the node is being stopped (node/main.py cancels its tunnels' run())
            await _turns()
            assert task.done() and task.cancelled()
            assert session.dials == 1
        finally:
            await _stop(task)

    _run(go)


def test_a_welcome_whose_exchange_key_makes_no_secret_does_not_stop_the_node_dialling(scripted: Scripted) -> None:
    gateway = Identity.generate()
    zero = base64.b64encode(bytes(32)).decode()

    def welcome(hello: dict[str, Any]) -> bytes:
        payload = {"node_id": hello["node_id"], "nonce": hello["nonce"], "kx": zero, "heartbeat_interval_s": 1.0}
        return encode(
            Kind.WELCOME, CONTROL, sign_envelope(gateway, payload, purpose=handshake.WELCOME, now=time.time())
        )

    async def go() -> None:
        session = scripted(welcome)
        tunnel = NodeTunnel(NODE, _node_app([]), "http://gw.test")  # no pinned key: the first welcome's is learned
        task = asyncio.ensure_future(tunnel.run())
        try:
            await _until(lambda: session.dials >= 2 or task.done(), "a second dial")
            assert not task.done(), task.exception()
        finally:
            await _stop(task)

    _run(go)
