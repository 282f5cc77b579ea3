"""The node transport over HTTP with aiohttp (its stream reader costs a fraction of httpx's per chunk).

Requests to a node are signed with the gateway's key (trust/envelope.py); a generation is an NDJSON stream,
one event per line. Every call into aiohttp happens inside the error boundary of `errors.py`, so nothing but
the transport's own error tree leaves this module.
"""

import asyncio
import ssl
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any, Protocol, cast

import aiohttp
import orjson
from opentelemetry import propagate

from gridserve.gateway.transport.base import is_token_line
from gridserve.gateway.transport.errors import (
    BrokenStream,
    Malformed,
    Refused,
    TransportError,
    Unreachable,
    map_errors,
    refusal,
    translate,
)
from gridserve.trust import Identity, sign_envelope
from gridserve.types import GenerateRequest, NodeId, StreamEvent
from gridserve.types.base import wire_payload
from gridserve.types.embedding import EMBED_PURPOSE, MAX_EMBED_REPLY_BYTES, EmbedRequest

JSON_HEADERS = {"content-type": "application/json"}
MAX_STAGE_FRAME = 64 * 1024 * 1024
"""Largest frame a stage link carries (a long prompt's hidden states in float32)."""
STAGE_CLOSE_TIMEOUT_S = 1.0
"""How long closing a stage link waits for the node's close reply: a link is closed when its stage failed, and a
hung node must not hold up the re-plan."""


class LineSource(Protocol):
    """What a stream is read from: aiohttp's response body (or asyncio's StreamReader in tests)."""

    async def read(self, n: int) -> bytes:
        """Up to `n` bytes of what has arrived, waiting only while nothing has; b"" at the end."""
        ...


READ_BYTES = 1 << 16
MAX_LINE_BYTES = 16 << 20
"""Longest event line a node may send (a token's line is a few hundred bytes; the last one, with counts, a few KB)."""


class HttpEventStream:
    """A node's NDJSON generation stream. Blank lines are skipped; a line that is not a JSON object is Malformed;
    a connection that breaks mid-stream is a BrokenStream. It reads whatever has arrived at once and keeps the
    whole lines (`ready`: a token among them is next)."""

    __slots__ = ("_close", "_content", "_lines", "_tail", "busy_at")

    def __init__(self, content: LineSource, close: Callable[[], None]) -> None:
        self._content = content
        self._close = close
        self._lines: deque[bytes] = deque()
        self._tail = b""
        self.busy_at = 0.0

    def ready(self) -> bool:
        return bool(self._lines) and is_token_line(self._lines[0])

    async def next(self) -> StreamEvent | None:
        while True:
            event = await self._line()
            if event is None or "busy" not in event:
                return event
            self.busy_at = asyncio.get_running_loop().time()

    async def _line(self) -> StreamEvent | None:
        try:
            while not self._lines:
                if not await self._fill():
                    return None
            line = self._lines.popleft()
            event = orjson.loads(line)
        except Exception as exc:  # (the happy path pays nothing for this: zero-cost try)
            mapped = translate(exc, "read")
            if mapped is None:
                raise
            raise mapped from exc
        if type(event) is not dict:
            raise Malformed(f"not an event: {line[:80]!r}")
        return cast(StreamEvent, event)  # (a JSON object; what matters in it is checked against the signed receipt)

    async def _fill(self) -> bool:
        """Read what has arrived into whole lines (blank ones dropped); False at the end with none left."""
        data = await self._content.read(READ_BYTES)
        if not data:
            tail, self._tail = self._tail, b""
            if tail.strip():
                self._lines.append(tail)  # a last line without its newline
                return True
            return False
        *whole, self._tail = (self._tail + data).split(b"\n")
        if len(self._tail) > MAX_LINE_BYTES:
            raise Malformed(f"a line longer than {MAX_LINE_BYTES} bytes")
        self._lines.extend(line for line in whole if line and not line.isspace())
        return True

    def close(self) -> None:
        self._close()


class HttpStageChannel:
    """A WebSocket to a stage node's `/internal/stage`."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws

    @property
    def closed(self) -> bool:
        return self.ws.closed

    async def send(self, data: bytes) -> None:
        with map_errors("read"):
            await self.ws.send_bytes(data)

    async def receive(self, timeout_s: float | None) -> bytes:
        with map_errors("read"):
            msg = await asyncio.wait_for(self.ws.receive(), timeout_s)
        if msg.type != aiohttp.WSMsgType.BINARY:
            raise BrokenStream(f"stage connection closed ({msg.type.name}: {msg.extra or ''})")
        data: bytes = msg.data
        return data

    async def aclose(self) -> None:
        with map_errors("read"):
            await self.ws.close()


class AiohttpTransport:
    """The gateway's connection pool to its nodes (no per-host limit: one node may stream hundreds of answers)."""

    def __init__(
        self, identity: Identity, *, connect_timeout_s: float = 3.0, verify: ssl.SSLContext | bool = True
    ) -> None:
        self.identity = identity
        self.connect_timeout_s = connect_timeout_s
        self.verify = verify
        """How https:// nodes are verified: a context trusting a private CA, or True (the system's trust store);
        never off."""
        self.session: aiohttp.ClientSession | None = None
        """The pool (None until started)."""

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, keepalive_timeout=30, ssl=self.verify)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.connect_timeout_s)
        self.session = aiohttp.ClientSession(connector=connector, timeout=timeout)

    async def aclose(self) -> None:
        if self.session is not None:
            await self.session.close()

    def _pool(self) -> aiohttp.ClientSession:
        if self.session is None or self.session.closed:
            raise Unreachable("the transport is not started")
        return self.session

    async def generate(self, node_id: NodeId, endpoint: str, job: GenerateRequest) -> HttpEventStream:
        payload = {**wire_payload(job), "node_id": node_id}
        body = sign_envelope(self.identity, payload, purpose="generate", now=time.time())
        headers = dict(JSON_HEADERS)
        propagate.inject(headers)  # W3C traceparent of the request's dispatch span, when tracing is on
        with map_errors("open"):
            response = await self._pool().post(endpoint + "/internal/generate", data=body, headers=headers)
        if response.status != 200:
            try:
                raise await _refusal(response)
            finally:
                response.close()
        return HttpEventStream(response.content, response.close)

    async def embed(self, node_id: NodeId, endpoint: str, job: EmbedRequest, timeout_s: float) -> bytes:
        payload = {**wire_payload(job), "node_id": node_id}
        body = sign_envelope(self.identity, payload, purpose=EMBED_PURPOSE, now=time.time())
        headers = dict(JSON_HEADERS)
        propagate.inject(headers)
        timeout = aiohttp.ClientTimeout(total=timeout_s)
        with map_errors("open"):
            response = await self._pool().post(
                endpoint + "/internal/embed", data=body, headers=headers, timeout=timeout
            )
        try:
            if response.status != 200:
                raise await _refusal(response)
            return await _whole(response.content, MAX_EMBED_REPLY_BYTES)
        finally:
            response.close()

    async def load(self, node_id: NodeId, endpoint: str, payload: Mapping[str, Any], timeout_s: float) -> None:
        body = sign_envelope(self.identity, {"node_id": node_id, **payload}, purpose="load", now=time.time())
        timeout = aiohttp.ClientTimeout(total=timeout_s)
        with map_errors("open"):
            async with self._pool().post(
                endpoint + "/internal/load", data=body, headers=JSON_HEADERS, timeout=timeout
            ) as resp:
                if resp.status not in (200, 202):
                    raise Refused(resp.status, resp.reason or "declined")

    async def probe(self, node_id: NodeId, endpoint: str, timeout_s: float, challenge: str) -> bytes:
        timeout = aiohttp.ClientTimeout(total=timeout_s)
        with map_errors("open"):
            async with self._pool().get(endpoint + "/health", params={"challenge": challenge}, timeout=timeout) as resp:
                body = await resp.content.read(MAX_PROBE_BYTES)
                if resp.status != 200:
                    raise Refused(resp.status, resp.reason or "unhealthy")
                return body

    async def stage_link(self, node_id: NodeId, endpoint: str, timeout_s: float) -> HttpStageChannel:
        url = endpoint.replace("http://", "ws://", 1).replace("https://", "wss://", 1) + "/internal/stage"
        with map_errors("open"):
            ws = await self._pool().ws_connect(
                url,
                max_msg_size=MAX_STAGE_FRAME,
                timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=STAGE_CLOSE_TIMEOUT_S),
                heartbeat=None,
            )
        return HttpStageChannel(ws)


MAX_PROBE_BYTES = 64 * 1024
"""The most of a /health answer read (a node's is a few hundred bytes)."""


async def _whole(content: aiohttp.StreamReader, limit: int) -> bytes:
    """The whole body; Malformed past `limit` bytes."""
    parts: list[bytes] = []
    size = 0
    with map_errors("read"):
        async for chunk in content.iter_chunked(64 * 1024):
            size += len(chunk)
            if size > limit:
                raise Malformed(f"an answer over {limit} bytes")
            parts.append(chunk)
    return b"".join(parts)


async def _refusal(response: aiohttp.ClientResponse) -> Refused:
    with map_errors("read"):
        text = await response.text(errors="replace")
    return refusal(response.status, text)


__all__ = ["AiohttpTransport", "HttpEventStream", "HttpStageChannel", "LineSource", "TransportError"]
