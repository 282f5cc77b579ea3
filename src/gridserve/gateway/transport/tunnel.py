"""The node transport over tunnels: outbound-only nodes dial the gateway (`WS /nodes/tunnel`), and every call the
gateway makes to such a node (generate, load, probe, stage link) is a stream multiplexed on that one WebSocket
(tunnel/wire.py). A node's endpoint `tunnel://<node id>` says to reach it this way.

`TunnelHub` owns the open tunnels (one per node: a node that dials again replaces its old tunnel); it accepts a
tunnel after the signed handshake (tunnel/handshake.py), carries the node's heartbeats to membership, and when a
tunnel ends every stream on it breaks at once (the dispatcher fails over as for a dropped HTTP connection) and
the node's next probe finds no way to it. `TunnelTransport` is the NodeTransport over the hub; the same error tree
as the HTTP transport leaves it.
"""

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping
from typing import Any, cast

import orjson
from opentelemetry import propagate
from starlette.websockets import WebSocket, WebSocketDisconnect

from gridserve.gateway.registry.membership import Membership, UnknownNode
from gridserve.gateway.transport.base import is_token_line
from gridserve.gateway.transport.errors import (
    REFUSAL_CHARS,
    BrokenStream,
    Malformed,
    Refused,
    Timeout,
    TransportError,
    Unreachable,
    refusal,
)
from gridserve.gateway.transport.tunnel_socket import EXTENSION, DirectSocket
from gridserve.trust import EnvelopeVerifier, Identity, TrustError, sign_envelope
from gridserve.tunnel import handshake
from gridserve.tunnel.channel import Opener, Sealer
from gridserve.tunnel.wire import (
    CONTROL,
    BadFrame,
    Frame,
    Kind,
    decode,
    encode,
    json_payload,
    request_payload,
)
from gridserve.types import GenerateRequest, NodeId, StreamEvent
from gridserve.types.base import wire_payload
from gridserve.types.embedding import EMBED_PURPOSE, MAX_EMBED_REPLY_BYTES, EmbedRequest

log = logging.getLogger("gridserve.gateway")
HANDSHAKE_TIMEOUT_S = 10.0
REGISTER_GRACE_S = 60.0
"""A tunnel whose node has not registered this long after it opened is closed: a signed greeting proves a key,
not a member, and keys cost nothing to make (the node dials again, and registers, if it can)."""
MAX_PROBE_BYTES = 64 * 1024
SILENT_BEATS = 4
SILENT_MIN_S = 20.0
"""A tunnel that has sent nothing for SILENT_BEATS heartbeat intervals (and at least SILENT_MIN_S) is closed: its node
is down by then (registry), and the connection may be half-open (the node's machine gone without a FIN)."""
BEAT_KEPT = json_payload({"status": 200, "body": '{"ok":true}'})
"""The answer to a heartbeat taken (the same for every node: made once)."""

Inbound = Frame | TransportError
"""What a stream's queue holds: the node's frames, or why the tunnel ended."""


class TunnelConn:
    """One node's open tunnel: the streams under way on it and the frames they wait for."""

    def __init__(self, node_id: NodeId, ws: WebSocket, remote: str, sealer: Sealer) -> None:
        self.node_id, self.ws, self.remote, self.sealer = node_id, ws, remote, sealer
        direct = ws.scope.get("extensions", {}).get(EXTENSION)
        self.direct = direct if isinstance(direct, DirectSocket) else None
        """The gateway's own WebSocket protocol (tunnel_socket.py), when this server is ours: messages by callback."""
        self._sending = asyncio.Lock()
        """Frames go out in the order they were sealed (the node checks their counter)."""
        self.opened_at = time.time()
        self.heard_at = time.monotonic()
        """When the node's last frame came (TunnelHub.close_silent)."""
        self.streams: dict[int, asyncio.Queue[Inbound]] = {}
        self._next = 1
        self.closed: TransportError | None = None
        self._closing: set[asyncio.Task[None]] = set()
        self.draining = False
        """The gateway is shutting down: no new streams; the tunnel closes once the last one ends."""

    def heard(self) -> None:
        """Something came from the node: a frame, or a WebSocket ping (a node whose heartbeats go to another gateway
        of the cluster pings this one's tunnel every 10 s: aiohttp's heartbeat, node/tunnel.py PING_S)."""
        self.heard_at = time.monotonic()

    def open_stream(self) -> tuple[int, "asyncio.Queue[Inbound]"]:
        if self.closed is not None:
            raise Unreachable(f"the tunnel of {self.node_id} is closed", cause="tunnel closed")
        if self.draining:
            raise Unreachable(f"the tunnel of {self.node_id} is draining: the gateway is stopping", cause="draining")
        stream = self._next
        self._next = stream + 1 if stream < 0xFFFFFFFF else 1
        queue: asyncio.Queue[Inbound] = asyncio.Queue()
        self.streams[stream] = queue
        return stream, queue

    def end_stream(self, stream: int, *, cancel: Kind | None = None) -> None:
        """Forget the stream; with `cancel`, tell the node too (CANCEL for HTTP, WS_CLOSE for a stage link)."""
        if self.streams.pop(stream, None) is not None and cancel is not None:
            self.send_soon(cancel, stream, b"")
        if self.draining and not self.streams and self.direct is not None:
            self.direct.close(1012, "the gateway is restarting")

    def close(self, code: int, reason: str) -> None:
        """Close the connection from the gateway's side (its end then fails every stream, as any end does)."""
        if self.direct is not None:
            self.direct.close(code, reason)
            return
        task = asyncio.ensure_future(self._quietly_close(code, reason))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _quietly_close(self, code: int, reason: str) -> None:
        with contextlib.suppress(Exception):
            await self.ws.close(code=code, reason=reason)

    def drain(self) -> bool:
        """The server is shutting down (DirectSocket.shutdown): True if streams are under way (the tunnel stays
        open for them, and closes after the last), False if it can close now."""
        self.draining = True
        return bool(self.streams)

    async def send(self, kind: Kind, stream: int, payload: bytes = b"", *, phase: str = "open") -> None:
        if self.closed is not None:
            raise self.closed
        if (writer := self._writer()) is not None:
            writer.write(self.sealer.seal(kind, stream, payload))
            return
        try:
            async with self._sending:
                await self.ws.send_bytes(self.sealer.seal(kind, stream, payload))
        except Exception as exc:  # starlette/uvicorn: WebSocketDisconnect, ClientDisconnected, RuntimeError
            error = (Unreachable if phase == "open" else BrokenStream)(
                str(exc) or "tunnel closed", cause=type(exc).__name__
            )
            raise error from exc

    def send_soon(self, kind: Kind, stream: int, payload: bytes) -> None:
        """Send from synchronous code: at once when nothing is queued before it and the socket takes it, else in a
        task (the frame order is the sealing order either way)."""
        if self.closed is not None:
            return
        if (writer := self._writer()) is not None:
            writer.write(self.sealer.seal(kind, stream, payload))
            return
        task = asyncio.ensure_future(self._quietly_send(kind, stream, payload))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def _writer(self) -> DirectSocket | None:
        """Our own socket, when a frame can go out on it without a wait: no sender before it, room in the transport."""
        direct = self.direct
        return direct if direct is not None and direct.can_write and not self._sending.locked() else None

    async def _quietly_send(self, kind: Kind, stream: int, payload: bytes) -> None:
        with contextlib.suppress(Exception):
            await self.send(kind, stream, payload)

    def deliver(self, frame: Frame) -> None:
        queue = self.streams.get(frame.stream)
        if queue is not None:
            queue.put_nowait(frame)

    def fail(self, why: str) -> None:
        """The tunnel ended: every stream on it learns at once."""
        self.closed = BrokenStream(f"tunnel of {self.node_id} closed: {why}", cause="tunnel closed")
        for queue in self.streams.values():
            queue.put_nowait(self.closed)
        self.streams.clear()


class TunnelHub:
    """The gateway's open tunnels, by node."""

    def __init__(self, identity: Identity, verifier: EnvelopeVerifier, membership: Membership) -> None:
        self.identity, self.verifier, self.membership = identity, verifier, membership
        self.conns: dict[NodeId, TunnelConn] = {}
        self.opened = 0
        """Tunnels accepted since start (reconnections included)."""
        self.register_grace_s = REGISTER_GRACE_S
        self.silent_after_s = max(SILENT_BEATS * membership.config.heartbeat_interval_s, SILENT_MIN_S)
        self._scanned_at = time.monotonic()

    def get(self, node_id: NodeId) -> TunnelConn:
        conn = self.conns.get(node_id)
        if conn is None or conn.closed is not None:
            raise Unreachable(f"node {node_id} has no tunnel open to this gateway", cause="no tunnel")
        return conn

    async def serve(self, ws: WebSocket) -> None:
        """One node's tunnel, from the handshake to its end."""
        await ws.accept()
        remote = ws.client.host if ws.client else "?"
        try:
            async with asyncio.timeout(HANDSHAKE_TIMEOUT_S):
                greeted, sealer, opener = await self._greet(ws)
        except (TrustError, BadFrame, ValueError, TimeoutError, WebSocketDisconnect) as exc:
            why = exc.detail if isinstance(exc, TrustError) else (str(exc) or type(exc).__name__)
            log.warning("refused a tunnel from %s: %s", remote, why)
            with contextlib.suppress(Exception):
                await ws.send_bytes(encode(Kind.WS_CLOSE, CONTROL, why.encode()))
                await ws.close(code=1008)
            return
        node_id = NodeId(greeted.node_id)
        conn = TunnelConn(node_id, ws, remote, sealer)
        old = self.conns.get(node_id)
        if old is not None:
            old.fail("replaced by a new tunnel from the node")
        self.conns[node_id] = conn
        self.opened += 1
        log.info("tunnel open from %s (%s)", node_id, remote)
        check = asyncio.get_running_loop().call_later(self.register_grace_s, self._require_member, conn)
        try:
            await self._read(conn, opener)
        finally:
            check.cancel()
            conn.fail("the connection ended")
            if self.conns.get(node_id) is conn:  # (not when the node dialled again: its new tunnel stands)
                del self.conns[node_id]
                # nothing can reach the node now: out of rotation at once, not at its next failed probe; its
                # next heartbeat (over a new tunnel) brings it back
                self.membership.mark_failed(node_id, "its tunnel closed")
            log.info("tunnel from %s closed", node_id)

    def close_silent(self, now: float | None = None) -> int:
        """Close the tunnels on the gateway's own socket that have sent nothing, not even a ping, for
        `silent_after_s` (a node gone without closing its connection: the gateway does not ping those,
        tunnel_socket.py), at most once per `silent_after_s / 4` (the gateway's sweeper calls this often). Returns
        how many were closed."""
        now = time.monotonic() if now is None else now
        if now - self._scanned_at < self.silent_after_s / 4:
            return 0
        self._scanned_at = now
        members = self.membership.nodes
        silent = []
        for conn in self.conns.values():
            if conn.direct is None:  # read through ASGI: uvicorn's own keepalive pings stay on for it
                continue
            if conn.node_id not in members:  # not registered yet (REGISTER_GRACE_S rules): silence counts from here
                conn.heard_at = now
            elif conn.closed is None and now - conn.heard_at > self.silent_after_s:
                silent.append(conn)
        for conn in silent:
            why = f"nothing from node {conn.node_id} in {now - conn.heard_at:.0f} s"
            log.warning("closing the tunnel from %s (%s): %s", conn.node_id, conn.remote, why)
            conn.close(1001, why)
        return len(silent)

    def _require_member(self, conn: TunnelConn) -> None:
        if conn.closed is None and conn.node_id not in self.membership.nodes:
            why = f"node {conn.node_id} did not register within {self.register_grace_s:.0f} s of opening its tunnel"
            log.warning("closing the tunnel from %s (%s): %s", conn.node_id, conn.remote, why)
            conn.close(1008, why)

    async def _greet(self, ws: WebSocket) -> tuple[handshake.Hello, Sealer, Opener]:
        challenge = handshake.challenge()
        await ws.send_bytes(encode(Kind.CHALLENGE, CONTROL, json_payload({"challenge": challenge})))
        message = await ws.receive()
        data = message.get("bytes") if message["type"] == "websocket.receive" else None
        if data is None:
            raise BadFrame(f"expected the node's hello, got {message['type']} without bytes")
        frame = decode(data)
        if frame.kind != Kind.HELLO:
            raise BadFrame(f"expected the node's hello, got {frame.kind.name}")
        greeted = handshake.check_hello(self.verifier, frame.payload, challenge)
        interval = self.membership.config.heartbeat_interval_s
        body, sealer, opener = handshake.welcome(self.identity, greeted, challenge, interval)
        await ws.send_bytes(encode(Kind.WELCOME, CONTROL, body))
        return greeted, sealer, opener

    async def _read(self, conn: TunnelConn, opener: Opener) -> None:
        """Each message to `_take`, until the connection ends or a message breaks the protocol: by callback on the
        gateway's own socket (an idle tunnel then holds nothing new), else through ASGI's `receive`."""
        if conn.direct is not None:
            await conn.direct.attach(lambda data: self._take(conn, opener, data), drain=conn.drain, pinged=conn.heard)
            return
        while True:
            message = await conn.ws.receive()
            if message["type"] != "websocket.receive":
                return
            data = message.get("bytes")
            if data is None:
                return  # a text frame: not this protocol
            if self._take(conn, opener, data) is not None:
                return

    def _take(self, conn: TunnelConn, opener: Opener, data: bytes) -> str | None:
        """One message from the node; None, or why the tunnel must close."""
        conn.heard()
        try:
            frame = opener.open(data)
        except BadFrame as exc:
            log.warning("tunnel from %s sent a bad frame: %s", conn.node_id, exc)
            return f"bad frame: {exc}"
        if frame.kind == Kind.BEAT:
            self._heartbeat(conn, frame.payload, bound=True)
        elif frame.kind == Kind.HEARTBEAT:
            self._heartbeat(conn, frame.payload, bound=False)
        else:
            conn.deliver(frame)
        return None

    def _heartbeat(self, conn: TunnelConn, body: bytes, *, bound: bool) -> None:
        """A heartbeat over the tunnel, bound to the channel (BEAT) or signed (HEARTBEAT): answered as
        `POST /nodes/heartbeat` would answer it."""
        try:
            if bound:
                self.membership.channel_heartbeat(conn.node_id, body)
            else:
                self.membership.heartbeat(body)
            reply = BEAT_KEPT
        except TrustError as exc:
            self.membership.reject(exc, path="/nodes/tunnel", remote=conn.remote)
            status = 404 if isinstance(exc, UnknownNode) else 401
            answer = orjson.dumps({"error": {"type": exc.kind, "message": exc.detail}}).decode()
            reply = json_payload({"status": status, "body": answer})
        conn.send_soon(Kind.HEARTBEAT_REPLY, CONTROL, reply)


class TunnelEventStream:
    """A generation's NDJSON events as they arrive in BODY and END frames."""

    __slots__ = ("_buffer", "_conn", "_done", "_failed", "_queue", "_stream", "busy_at")

    def __init__(
        self, conn: TunnelConn, stream: int, queue: "asyncio.Queue[Inbound]", first: bytes, done: bool
    ) -> None:
        self._conn, self._stream, self._queue = conn, stream, queue
        self._buffer = first
        self._done = done
        self._failed: TransportError | None = None
        """The connection's failure, taken from the queue while looking ahead (`ready`): raised once the lines
        before it are read."""
        self.busy_at = 0.0

    def ready(self) -> bool:
        """A token line is whole in the buffer, once the frames already queued are taken in."""
        while (cut := self._buffer.find(b"\n")) < 0:
            if self._done or self._failed is not None or self._queue.empty():
                return False
            self._take(self._queue.get_nowait())
        return is_token_line(self._buffer[:cut])

    async def next(self) -> StreamEvent | None:
        while True:
            line = await self._line()
            if line is None:
                return None
            try:
                event = orjson.loads(line)
            except orjson.JSONDecodeError as exc:
                raise Malformed(str(exc), cause="JSONDecodeError") from exc
            if type(event) is not dict:
                raise Malformed(f"not an event: {line[:80]!r}")
            if "busy" in event:
                self.busy_at = asyncio.get_running_loop().time()
                continue
            return cast(StreamEvent, event)  # (what matters in it is checked against the signed receipt)

    async def _line(self) -> bytes | None:
        while True:
            cut = self._buffer.find(b"\n")
            if cut >= 0:
                line, self._buffer = self._buffer[:cut], self._buffer[cut + 1 :]
                if line.strip():
                    return line
                continue
            if self._failed is not None:
                raise self._failed
            if self._done:
                line, self._buffer = self._buffer, b""
                return line if line.strip() else None
            self._take(await self._queue.get())

    def _take(self, item: "Inbound") -> None:
        if isinstance(item, TransportError):
            self._failed = item
            return
        if item.kind == Kind.END:
            self._done = True
            self._conn.end_stream(self._stream)
        self._buffer += item.payload

    def close(self) -> None:
        if not self._done:
            self._conn.end_stream(self._stream, cancel=Kind.CANCEL)
            self._done = True


class TunnelStageChannel:
    """A pipeline stage link as a WebSocket stream inside the tunnel."""

    def __init__(self, conn: TunnelConn, stream: int, queue: "asyncio.Queue[Inbound]") -> None:
        self.conn, self.stream, self.queue = conn, stream, queue
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed or self.conn.closed is not None

    async def send(self, data: bytes) -> None:
        if self._closed:
            raise BrokenStream("stage link closed")
        await self.conn.send(Kind.WS_DATA, self.stream, data, phase="read")

    async def receive(self, timeout_s: float | None) -> bytes:
        try:
            item = await asyncio.wait_for(self.queue.get(), timeout_s)
        except TimeoutError as exc:
            raise Timeout(f"no stage frame in {timeout_s} s", cause="TimeoutError") from exc
        if isinstance(item, TransportError):
            self._closed = True
            raise item
        if item.kind != Kind.WS_DATA:
            self._closed = True
            self.conn.end_stream(self.stream)
            raise BrokenStream(f"stage connection closed ({item.payload.decode(errors='replace')})")
        return item.payload

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            self.conn.end_stream(self.stream, cancel=Kind.WS_CLOSE)


class TunnelTransport:
    """NodeTransport to outbound-only nodes, over their tunnels."""

    def __init__(self, identity: Identity, hub: TunnelHub) -> None:
        self.identity, self.hub = identity, hub

    async def start(self) -> None:
        return None

    async def aclose(self) -> None:
        for conn in list(self.hub.conns.values()):
            conn.fail("the gateway is stopping")

    async def _exchange(
        self, node_id: NodeId, method: str, path: str, body: bytes, headers: dict[str, str]
    ) -> tuple[TunnelConn, int, "asyncio.Queue[Inbound]"]:
        conn = self.hub.get(node_id)
        stream, queue = conn.open_stream()
        try:
            await conn.send(Kind.REQUEST, stream, request_payload(method, path, headers, body))
        except BaseException:
            conn.end_stream(stream)
            raise
        return conn, stream, queue

    async def _head(self, conn: TunnelConn, stream: int, queue: "asyncio.Queue[Inbound]") -> int:
        item = await queue.get()
        if isinstance(item, TransportError):
            raise Unreachable(item.detail, cause=item.cause)
        status = _status(item.payload) if item.kind == Kind.HEAD else None
        if status is None:
            conn.end_stream(stream, cancel=Kind.CANCEL)
            what = f" without a status: {item.payload[:80]!r}" if item.kind == Kind.HEAD else ""
            raise Malformed(f"expected a reply head, got {item.kind.name}{what}")
        return status

    async def _rest(self, conn: TunnelConn, stream: int, queue: "asyncio.Queue[Inbound]", limit: int) -> bytes:
        parts: list[bytes] = []
        size = 0
        while True:
            item = await queue.get()
            if isinstance(item, TransportError):
                raise item
            parts.append(item.payload)
            size += len(item.payload)
            if item.kind == Kind.END or size >= limit:
                conn.end_stream(stream, cancel=None if item.kind == Kind.END else Kind.CANCEL)
                return b"".join(parts)[:limit]

    async def generate(self, node_id: NodeId, endpoint: str, job: GenerateRequest) -> TunnelEventStream:
        payload = {**wire_payload(job), "node_id": node_id}
        body = sign_envelope(self.identity, payload, purpose="generate", now=time.time())
        headers = {"content-type": "application/json"}
        propagate.inject(headers)
        conn, stream, queue = await self._exchange(node_id, "POST", "/internal/generate", body, headers)
        try:
            status = await self._head(conn, stream, queue)
            if status != 200:
                raise refusal(
                    status, (await self._rest(conn, stream, queue, REFUSAL_CHARS * 4)).decode(errors="replace")
                )
        except BaseException:
            conn.end_stream(stream, cancel=Kind.CANCEL)
            raise
        return TunnelEventStream(conn, stream, queue, b"", False)

    async def embed(self, node_id: NodeId, endpoint: str, job: EmbedRequest, timeout_s: float) -> bytes:
        payload = {**wire_payload(job), "node_id": node_id}
        body = sign_envelope(self.identity, payload, purpose=EMBED_PURPOSE, now=time.time())
        status, answer = await self._call(
            node_id, "POST", "/internal/embed", body, timeout_s, limit=MAX_EMBED_REPLY_BYTES + 1
        )
        if status != 200:
            raise refusal(status, answer[: REFUSAL_CHARS * 4].decode(errors="replace"))
        if len(answer) > MAX_EMBED_REPLY_BYTES:
            raise Malformed(f"an embeddings answer over {MAX_EMBED_REPLY_BYTES} bytes")
        return answer

    async def load(self, node_id: NodeId, endpoint: str, payload: Mapping[str, Any], timeout_s: float) -> None:
        body = sign_envelope(self.identity, {"node_id": node_id, **payload}, purpose="load", now=time.time())
        status = await self._call(node_id, "POST", "/internal/load", body, timeout_s, limit=REFUSAL_CHARS)
        if status[0] not in (200, 202):
            raise Refused(status[0], "declined")

    async def probe(self, node_id: NodeId, endpoint: str, timeout_s: float, challenge: str) -> bytes:
        status, body = await self._call(node_id, "GET", f"/health?challenge={challenge}", b"", timeout_s)
        if status != 200:
            raise Refused(status, "unhealthy")
        return body

    async def _call(
        self, node_id: NodeId, method: str, path: str, body: bytes, timeout_s: float, *, limit: int = MAX_PROBE_BYTES
    ) -> tuple[int, bytes]:
        headers = {"content-type": "application/json"} if body else {}
        conn, stream, queue = await self._exchange(node_id, method, path, body, headers)
        try:
            async with asyncio.timeout(timeout_s):
                status = await self._head(conn, stream, queue)
                return status, await self._rest(conn, stream, queue, limit)
        except TimeoutError as exc:
            raise Timeout(f"no answer in {timeout_s:.1f} s", cause="TimeoutError") from exc
        except BrokenStream as exc:
            raise Unreachable(exc.detail, cause=exc.cause) from exc
        finally:
            conn.end_stream(stream, cancel=Kind.CANCEL)

    async def stage_link(self, node_id: NodeId, endpoint: str, timeout_s: float) -> TunnelStageChannel:
        conn = self.hub.get(node_id)
        stream, queue = conn.open_stream()
        try:
            await conn.send(Kind.WS_OPEN, stream, json_payload({"path": "/internal/stage"}))
            try:
                item = await asyncio.wait_for(queue.get(), timeout_s)
            except TimeoutError as exc:
                raise Timeout(f"the stage link did not open in {timeout_s:.1f} s", cause="TimeoutError") from exc
            if isinstance(item, TransportError):
                raise Unreachable(item.detail, cause=item.cause)
            if item.kind != Kind.WS_ACCEPT:
                raise Refused(403, f"stage link refused: {item.payload.decode(errors='replace')[:REFUSAL_CHARS]}")
        except BaseException:
            conn.end_stream(stream)
            raise
        return TunnelStageChannel(conn, stream, queue)


def _status(payload: bytes) -> int | None:
    """The status of a HEAD's `{"status": int, ...}`; None if it is not one."""
    try:
        head = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None
    status = head.get("status") if isinstance(head, dict) else None
    return status if type(status) is int else None


__all__ = ["TunnelConn", "TunnelEventStream", "TunnelHub", "TunnelStageChannel", "TunnelTransport"]
