"""The node's end of a tunnel (`gridserve node --outbound-only`): the node opens no listening socket; it dials each of
its gateways, keeps that WebSocket open, and serves what arrives on it with its own HTTP app, in this process.

Each REQUEST the gateway sends runs through the node's ASGI app exactly as an HTTP request would (the same
signature checks, faults, metrics, streaming and receipts), and what the app sends back goes out as HEAD, BODY and
END frames; a CANCEL is the client disconnecting, which stops the work as a closed HTTP connection does. A WS_OPEN
runs the app's WebSocket route (a pipeline stage link) over the same connection. Only the routes the gateway
calls go through (`ROUTES`): fault injection stays local.

A lost connection is dialled again after a jittered, growing wait (0.2 s up to 5 s); heartbeats go over the
tunnel while it is up and over HTTP while it is not.
"""

import asyncio
import contextlib
import logging
import random
import ssl
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import aiohttp
import orjson

from gridserve.trust import EnvelopeVerifier, FreshnessPolicy, Identity, TrustError
from gridserve.tunnel import handshake
from gridserve.tunnel.channel import Opener, Sealer
from gridserve.tunnel.wire import (
    CONTROL,
    MAX_FRAME,
    BadFrame,
    Kind,
    decode,
    encode,
    json_payload,
    split_request,
    websocket_url,
)

log = logging.getLogger("gridserve.node")
Message = MutableMapping[str, Any]
ASGIApp = Callable[
    [MutableMapping[str, Any], Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]], Awaitable[None]
]
ROUTES = frozenset(
    {"/health", "/internal/generate", "/internal/embed", "/internal/load", "/internal/stage", "/metrics"}
)
"""What the gateway may call through a tunnel (fault injection is for this machine only)."""
BACKOFF_MIN_S = 0.2
BACKOFF_MAX_S = 5.0
HANDSHAKE_TIMEOUT_S = 10.0
HEARTBEAT_TIMEOUT_S = 5.0
PING_S = 10.0
"""WebSocket pings from the node: a connection whose pong does not come within half of this is closed and dialled
again (aiohttp's rule). Not shorter: a gateway busy for a moment (a collection, a burst) must not cost every node its
tunnel and every stream on it a failover. The gateway finds a silent node sooner, by its probes."""


class TunnelClosed(ConnectionError):
    """The tunnel's connection ended."""


class NodeTunnel:
    """One tunnel to one gateway, kept open for the life of the node."""

    def __init__(
        self,
        identity: Identity,
        app: ASGIApp,
        gateway_url: str,
        *,
        verify: ssl.SSLContext | bool = True,
        gateway_key: Callable[[], str | None] = lambda: None,
        learned_key: Callable[[str], None] = lambda key: None,
    ) -> None:
        self.identity, self.app, self.gateway_url = identity, app, gateway_url
        self.verify = verify
        self.gateway_key, self.learned_key = gateway_key, learned_key
        """The gateway key this node pinned or registered with (None: the first welcome's key is learned)."""
        self.verifier = EnvelopeVerifier(FreshnessPolicy(), time.time)
        self.connected = asyncio.Event()
        self.connections = 0
        """How many times the tunnel was opened (1 + reconnections)."""
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._sealer: Sealer | None = None
        self._opener: Opener | None = None
        self._channel_beats = False
        """The gateway at the other end takes BEAT frames (its welcome said so)."""
        self._sending = asyncio.Lock()
        """Frames go out in the order they were sealed (the gateway checks their counter)."""
        self._gone: dict[int, asyncio.Event] = {}
        self._sockets: dict[int, asyncio.Queue[Message]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._heartbeat: asyncio.Future[tuple[int, bytes]] | None = None

    async def run(self) -> None:
        """Keep the tunnel open until cancelled: dial, serve, and after a loss dial again (jittered backoff)."""
        delay = BACKOFF_MIN_S
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_connect=5.0)) as http:
            while True:
                opened = time.monotonic()
                try:
                    await self._connect_and_serve(http)
                except (aiohttp.ClientError, OSError, TrustError, BadFrame, TunnelClosed) as exc:
                    log.warning("tunnel to %s: %s", self.gateway_url, _why(exc))
                finally:
                    self._lost()
                if time.monotonic() - opened > 10 * BACKOFF_MAX_S:
                    delay = BACKOFF_MIN_S  # it had been up a while: a fresh loss starts the backoff over
                wait = random.uniform(delay / 2, delay)
                log.info("tunnel to %s: dialling again in %.1f s", self.gateway_url, wait)
                await asyncio.sleep(wait)
                delay = min(delay * 2, BACKOFF_MAX_S)

    async def heartbeat(self, body: bytes, bare: bytes | None = None) -> tuple[int, bytes] | None:
        """Send a heartbeat over the tunnel: `bare` (the payload's JSON) as a BEAT when the gateway takes them and it
        is given, else `body` (the signed envelope) as a HEARTBEAT. Returns (the status and body the HTTP endpoint
        would answer), or None when the tunnel is down (the caller sends it over HTTP)."""
        ws = self._ws
        if ws is None or not self.connected.is_set() or self._heartbeat is not None:
            return None
        self._heartbeat = asyncio.get_running_loop().create_future()
        try:
            if bare is not None and self._channel_beats:
                await self.send_frame(Kind.BEAT, CONTROL, bare)
            else:
                await self.send_frame(Kind.HEARTBEAT, CONTROL, body)
            return await asyncio.wait_for(self._heartbeat, HEARTBEAT_TIMEOUT_S)
        except (aiohttp.ClientError, OSError, TimeoutError, TunnelClosed):
            return None
        finally:
            self._heartbeat = None

    async def _connect_and_serve(self, http: aiohttp.ClientSession) -> None:
        url = websocket_url(self.gateway_url)
        async with http.ws_connect(url, ssl=self.verify, max_msg_size=MAX_FRAME, heartbeat=PING_S) as ws:
            async with asyncio.timeout(HANDSHAKE_TIMEOUT_S):  # (not wait_for: on 3.11 it can swallow a cancel)
                await self._greet(ws)
            self._ws = ws
            self.connections += 1
            self.connected.set()
            log.info("tunnel to %s open", self.gateway_url)
            async for msg in ws:
                if msg.type != aiohttp.WSMsgType.BINARY:
                    break
                self._on_frame(msg.data)
            raise TunnelClosed(f"closed by the gateway ({ws.close_code})")

    async def _greet(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        first = decode(await _binary(ws))
        if first.kind != Kind.CHALLENGE:
            raise BadFrame(f"expected the gateway's challenge, got {first.kind.name}")
        challenge = orjson.loads(first.payload).get("challenge", "")
        greeting = handshake.hello(self.identity, str(challenge))
        await ws.send_bytes(encode(Kind.HELLO, CONTROL, greeting.body))
        reply = decode(await _binary(ws))
        if reply.kind == Kind.WS_CLOSE:
            raise TunnelClosed(f"refused: {reply.payload.decode(errors='replace')}")
        if reply.kind != Kind.WELCOME:
            raise BadFrame(f"expected the gateway's welcome, got {reply.kind.name}")
        welcomed = handshake.check_welcome(
            self.verifier, reply.payload, greeting, node_id=self.identity.node_id, gateway_key=self.gateway_key()
        )
        self._sealer, self._opener = welcomed.sealer, welcomed.opener
        self._channel_beats = welcomed.channel_beats
        self.learned_key(welcomed.gateway_key)

    def _on_frame(self, data: bytes) -> None:
        assert self._opener is not None, "frames are read after the greeting"
        frame = self._opener.open(data)
        kind, stream = frame.kind, frame.stream
        if kind == Kind.REQUEST:  # its disconnect event now: a CANCEL right behind it must find it
            self._gone[stream] = asyncio.Event()
            self._spawn(self._http(stream, frame.payload))
        elif kind == Kind.CANCEL:
            gone = self._gone.get(stream)
            if gone is not None:
                gone.set()
        elif kind == Kind.WS_OPEN:
            self._sockets[stream] = asyncio.Queue()
            self._spawn(self._websocket(stream, frame.payload))
        elif kind == Kind.WS_DATA:
            queue = self._sockets.get(stream)
            if queue is not None:
                queue.put_nowait({"type": "websocket.receive", "bytes": frame.payload})
        elif kind == Kind.WS_CLOSE:
            queue = self._sockets.get(stream)
            if queue is not None:
                queue.put_nowait({"type": "websocket.disconnect", "code": 1000})
        elif kind == Kind.HEARTBEAT_REPLY and self._heartbeat is not None and not self._heartbeat.done():
            reply = orjson.loads(frame.payload)
            self._heartbeat.set_result((int(reply["status"]), str(reply.get("body", "")).encode()))

    def _spawn(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _lost(self) -> None:
        """The connection ended: every exchange on it sees its client go (the work stops, as when an HTTP
        connection drops)."""
        self._ws, self._sealer, self._opener = None, None, None
        self.connected.clear()
        for gone in self._gone.values():
            gone.set()
        for queue in self._sockets.values():
            queue.put_nowait({"type": "websocket.disconnect", "code": 1006})
        if self._heartbeat is not None and not self._heartbeat.done():
            self._heartbeat.set_exception(TunnelClosed("tunnel lost"))

    async def send_frame(self, kind: Kind, stream: int, payload: bytes = b"") -> None:
        """Seal and send one frame (frames go out in the order they were sealed: the gateway checks the counter)."""
        ws, sealer = self._ws, self._sealer
        if ws is None or ws.closed or sealer is None:
            raise OSError("tunnel closed")
        async with self._sending:
            await ws.send_bytes(sealer.seal(kind, stream, payload))

    async def _http(self, stream: int, payload: bytes) -> None:
        """One HTTP exchange through the node's app."""
        gone = self._gone.get(stream) or asyncio.Event()
        try:
            meta, body = split_request(payload)
        except (BadFrame, ValueError) as exc:
            self._gone.pop(stream, None)
            await self._reply_error(stream, 400, f"bad tunnel request: {exc}")
            return
        path, _, query = str(meta["path"]).partition("?")
        if path not in ROUTES:
            self._gone.pop(stream, None)
            await self._reply_error(stream, 404, f"{path} is not served through the tunnel")
            return
        scope = _scope("http", path, query, meta.get("headers", {}), method=str(meta["method"]))
        try:
            await self.app(scope, _http_receive(body, gone), _HttpSend(self, stream, gone))
        except OSError:
            pass  # the tunnel went while answering: the gateway has seen the stream break
        except Exception:
            log.exception("tunnel request %s failed", path)
        finally:
            self._gone.pop(stream, None)

    async def _reply_error(self, stream: int, status: int, message: str) -> None:
        body = orjson.dumps({"error": {"type": "tunnel", "message": message}})
        with contextlib.suppress(OSError, aiohttp.ClientError):
            await self.send_frame(Kind.HEAD, stream, json_payload({"status": status}))
            await self.send_frame(Kind.END, stream, body)

    async def _websocket(self, stream: int, payload: bytes) -> None:
        """A WebSocket route (the pipeline stage link) through the node's app."""
        queue = self._sockets[stream]
        try:
            meta = orjson.loads(payload)
            path = str(meta.get("path", ""))
            if path not in ROUTES:
                await self.send_frame(Kind.WS_CLOSE, stream, json_payload({"code": 1008, "reason": "no such route"}))
                return
            queue.put_nowait({"type": "websocket.connect"})
            await self.app(_scope("websocket", path, "", {}), queue.get, _WsSend(self, stream))
        except (OSError, aiohttp.ClientError):
            pass
        except Exception:
            log.exception("tunnel websocket failed")
        finally:
            self._sockets.pop(stream, None)


def _scope(kind: str, path: str, query: str, headers: dict[str, str], *, method: str = "GET") -> dict[str, Any]:
    scope: dict[str, Any] = {
        "type": kind,
        "asgi": {"version": "3.0", "spec_version": "2.3"},  # 2.3: the app listens for the disconnect itself
        "http_version": "1.1",
        "scheme": "http" if kind == "http" else "ws",
        "path": path,
        "raw_path": path.encode(),
        "query_string": query.encode(),
        "root_path": "",
        "headers": [(k.lower().encode(), str(v).encode()) for k, v in headers.items()],
        "client": ("tunnel", 0),  # not loopback: nothing local-only is reachable through the tunnel
        "server": ("tunnel", 0),
        "state": {},
    }
    if kind == "http":
        scope["method"] = method
    else:
        scope["subprotocols"] = []
    return scope


def _http_receive(body: bytes, gone: asyncio.Event) -> Callable[[], Awaitable[Message]]:
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    return receive


class _HttpSend:
    """The app's `send` for one HTTP exchange: its messages as HEAD, BODY and END frames."""

    __slots__ = ("gone", "stream", "tunnel")

    def __init__(self, tunnel: NodeTunnel, stream: int, gone: asyncio.Event) -> None:
        self.tunnel, self.stream, self.gone = tunnel, stream, gone

    async def __call__(self, message: Message) -> None:
        if self.gone.is_set():
            raise OSError("the gateway closed this request")
        kind = message["type"]
        if kind == "http.response.start":
            headers = {k.decode(): v.decode() for k, v in message.get("headers", ()) if k == b"content-type"}
            await self.tunnel.send_frame(
                Kind.HEAD, self.stream, json_payload({"status": message["status"], "headers": headers})
            )
        elif kind == "http.response.body":
            body = message.get("body", b"")
            if message.get("more_body", False):
                if body:
                    await self.tunnel.send_frame(Kind.BODY, self.stream, body)
            else:
                await self.tunnel.send_frame(Kind.END, self.stream, body)


class _WsSend:
    __slots__ = ("stream", "tunnel")

    def __init__(self, tunnel: NodeTunnel, stream: int) -> None:
        self.tunnel, self.stream = tunnel, stream

    async def __call__(self, message: Message) -> None:
        kind = message["type"]
        if kind == "websocket.accept":
            await self.tunnel.send_frame(Kind.WS_ACCEPT, self.stream)
        elif kind == "websocket.send":
            data = message.get("bytes")
            if data is None:
                data = str(message.get("text", "")).encode()
            await self.tunnel.send_frame(Kind.WS_DATA, self.stream, data)
        elif kind == "websocket.close":
            reason = {"code": message.get("code", 1000), "reason": message.get("reason") or ""}
            await self.tunnel.send_frame(Kind.WS_CLOSE, self.stream, json_payload(reason))


async def _binary(ws: aiohttp.ClientWebSocketResponse) -> bytes:
    msg = await ws.receive()
    if msg.type != aiohttp.WSMsgType.BINARY:
        raise TunnelClosed(f"closed during the handshake ({msg.type.name}: {msg.extra or ''})")
    data: bytes = msg.data
    return data


def _why(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__
