"""The per-token path as raw ASGI: `POST /v1/chat/completions` and `POST /v1/completions`; and the per-node
path: `POST /nodes/heartbeat` (thousands per second on a large grid).

Everything else goes to the FastAPI app. Skipping the middleware stack and StreamingResponse saves
several wrapped `send` calls per token (DESIGN.md: raw ASGI + aiohttp keeps ~100% of direct throughput).
"""

import asyncio
import contextlib
import hmac
import logging
from collections.abc import AsyncIterator, Coroutine
from typing import Any

import orjson
from starlette.types import ASGIApp, Receive, Scope, Send

from gridserve.gateway.api.errors import APIError, unauthorized
from gridserve.gateway.api.openai_api import ApiContext, Reply, complete
from gridserve.gateway.registry.membership import Membership, UnknownNode
from gridserve.trust import TrustError

log = logging.getLogger("gridserve.gateway")
ROUTES = {"/v1/chat/completions": "chat", "/v1/completions": "text"}
HEARTBEAT = "/nodes/heartbeat"


class TooLarge(Exception):
    pass


class HotPath:
    def __init__(
        self,
        app: ASGIApp,
        api: ApiContext,
        api_keys: tuple[str, ...],
        max_body_bytes: int,
        membership: Membership | None = None,
    ) -> None:
        self.app = app
        self.api = api
        self.membership = membership
        self.keys = tuple(k.encode() for k in api_keys if k)
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if path == HEARTBEAT and scope["method"] == "POST" and self.membership is not None:
            await self._heartbeat(self.membership, scope, receive, send)
            return
        kind = ROUTES.get(path)
        if kind is None or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        try:
            self._authorize(scope)
            body = await self._read_body(scope, receive)
            reply = await _unless_disconnected(complete(self.api, body, kind), receive)
            if reply is None:
                log.info("client disconnected before the first token; request cancelled")
                return
        except APIError as exc:
            await _send_error(send, exc)
            return
        except TooLarge:
            await _send_error(
                send,
                APIError(
                    413, f"Request body exceeds the limit of {self.max_body_bytes} bytes.", code="request_too_large"
                ),
            )
            return
        except Exception as exc:
            log.exception("internal error")
            await _send_error(
                send, APIError(500, f"Internal error: {type(exc).__name__}", type_="api_error", code="internal")
            )
            return
        await send({"type": "http.response.start", "status": 200, "headers": reply.headers})
        if reply.stream is None:
            await send({"type": "http.response.body", "body": reply.body})
        else:
            await _stream(reply, receive, send)

    async def _heartbeat(self, membership: Membership, scope: Scope, receive: Receive, send: Send) -> None:
        """A node's signed heartbeat (the same checks and answers as every node message), verified and applied on
        the event loop. Verifying on a thread instead, to overlap the ~56 us Ed25519 check with the loop, cost far
        more than it saved: the hand-off and the GIL passing between the threads took ~300 us of CPU per heartbeat,
        and the gateway saturated at ~1,700 heartbeats/s instead of ~4,000 (docs/architecture.md, "Heartbeat
        ingest")."""
        try:
            membership.heartbeat(await self._read_body(scope, receive))
        except TooLarge:
            await _send_error(send, APIError(413, "heartbeat too large", code="request_too_large"))
            return
        except APIError as exc:
            await _send_error(send, exc)
            return
        except TrustError as exc:
            client = scope.get("client")
            membership.reject(exc, path=HEARTBEAT, remote=client[0] if client else "?")
            status = 404 if isinstance(exc, UnknownNode) else 401
            await _send_json(send, status, orjson.dumps({"error": {"type": exc.kind, "message": exc.detail}}))
            return
        await _send_json(send, 200, b'{"ok":true}')

    def _authorize(self, scope: Scope) -> None:
        for name, value in scope["headers"]:
            if name == b"authorization" and value[:7].lower() == b"bearer ":
                token = value[7:].strip()
                if any(hmac.compare_digest(token, key) for key in self.keys):
                    return
        raise unauthorized()

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes:
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit() and int(value) > self.max_body_bytes:
                raise TooLarge
        parts: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise APIError(400, "client disconnected", code="client_disconnected")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                raise TooLarge
            parts.append(chunk)
            if not message.get("more_body", False):
                return b"".join(parts)


async def _unless_disconnected(work: Coroutine[Any, Any, Reply], receive: Receive) -> Reply | None:
    """Run `work` (scheduling, dispatch, waiting for the first token) unless the client disconnects first: then
    cancel it, which cancels the request on the node, retries and hedges included, and return None."""
    task = asyncio.ensure_future(work)

    async def gone() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(gone())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for pending in (task, watcher) if not task.done() else (watcher,):
            pending.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):  # the client is gone: nobody to tell
                await pending
    if task.cancelled():
        return None
    return task.result()


async def _send_json(send: Send, status: int, body: bytes) -> None:
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _send_error(send: Send, exc: APIError) -> None:
    body = exc.response().body
    await send(
        {
            "type": "http.response.start",
            "status": exc.status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def _stream(reply: Reply, receive: Receive, send: Send) -> None:
    """Send SSE chunks; a client disconnect cancels the stream (and with it the work on the node)."""
    assert reply.stream is not None
    chunks: AsyncIterator[bytes] = reply.stream
    current = asyncio.current_task()
    finished = False

    async def watch() -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                if not finished and current is not None:
                    current.cancel()
                return

    watcher = asyncio.create_task(watch())
    try:
        async for chunk in chunks:
            if chunk:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        finished = True
        await send({"type": "http.response.body", "body": b"", "more_body": False})
    except asyncio.CancelledError:
        if not watcher.done():
            raise
        log.info("client disconnected; generation cancelled")
    finally:
        finished = True
        watcher.cancel()
        aclose = getattr(chunks, "aclose", None)
        if aclose is not None:
            await aclose()
