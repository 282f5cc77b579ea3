"""The per-token path as raw ASGI: `POST /v1/chat/completions`, `/v1/completions`, `/v1/responses` and
`/v1/messages` (each a Surface over the one chat core: gateway/api/surface.py); and the per-node path:
`POST /nodes/heartbeat` (thousands per second on a large grid).

Everything else goes to the FastAPI app. Skipping the middleware stack and StreamingResponse saves
several wrapped `send` calls per token (DESIGN.md: raw ASGI + aiohttp keeps ~100% of direct throughput).
"""

import asyncio
import logging
from collections.abc import AsyncIterator

import orjson
from starlette.types import ASGIApp, Receive, Scope, Send

from gridserve.gateway.api.anthropic_api import COUNT_TOKENS, MESSAGES
from gridserve.gateway.api.errors import APIError, unauthorized
from gridserve.gateway.api.head_with_body import HEAD_WITH_BODY, hold_head
from gridserve.gateway.api.openai_api import CHAT, TEXT, ApiContext, Reply, complete
from gridserve.gateway.api.responses_api import RESPONSES
from gridserve.gateway.api.surface import Surface, openai_error
from gridserve.gateway.registry.membership import Membership, UnknownNode
from gridserve.gateway.tenancy import ApiKey, Tenancy
from gridserve.gateway.tenancy.limits import CALLER, CURRENT
from gridserve.trust import TrustError

log = logging.getLogger("gridserve.gateway")
ROUTES: dict[str, Surface] = {
    "/v1/chat/completions": CHAT,
    "/v1/completions": TEXT,
    "/v1/responses": RESPONSES,
    "/v1/messages": MESSAGES,
    "/v1/messages/count_tokens": COUNT_TOKENS,
}
HEARTBEAT = "/nodes/heartbeat"


class TooLarge(Exception):
    pass


class HotPath:
    def __init__(
        self,
        app: ASGIApp,
        api: ApiContext,
        tenancy: Tenancy,
        max_body_bytes: int,
        membership: Membership | None = None,
    ) -> None:
        self.app = app
        self.api = api
        self.membership = membership
        self.tenancy = tenancy
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if path == HEARTBEAT and scope["method"] == "POST" and self.membership is not None:
            await self._heartbeat(self.membership, scope, receive, send)
            return
        surface = ROUTES.get(path)
        if surface is None or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        try:
            key = self._authorize(scope)
            body = await self._read_body(scope, receive)
        except APIError as exc:
            await _send_error(send, exc, surface)
            return
        except TooLarge:
            await _send_error(
                send,
                APIError(
                    413, f"Request body exceeds the limit of {self.max_body_bytes} bytes.", code="request_too_large"
                ),
                surface,
            )
            return
        admitted, caller = CURRENT.set(None), CALLER.set(key.key_id)
        try:
            with _DisconnectWatch(receive) as client:
                held = HEAD_WITH_BODY in (scope.get("extensions") or ())
                await self._answer(body, surface, send, client, key, held)
        finally:
            admission = CURRENT.get()
            if admission is not None:  # the request is over: its key's place in flight frees
                admission.close()
            CURRENT.reset(admitted)
            CALLER.reset(caller)

    async def _answer(
        self, body: bytes, surface: Surface, send: Send, client: "_DisconnectWatch", key: ApiKey, held: bool
    ) -> None:
        """Schedule, dispatch and stream in this task; a client that disconnects cancels it, which cancels the
        request on the node, retries and hedges included. `held`: a stream's head goes out with its first chunk
        (gateway/api/head_with_body.py)."""
        try:
            client.arm()
            try:
                reply = await complete(self.api, body, surface, key)
            finally:
                client.disarm()  # the error answers below are sent disarmed: a disconnect then cancels nothing
        except asyncio.CancelledError:
            if not client.gone():
                raise
            log.info("client disconnected before the first token; request cancelled")
            return
        except APIError as exc:
            await _send_error(send, exc, surface)
            return
        except Exception as exc:
            log.exception("internal error")
            await _send_error(
                send,
                APIError(500, f"Internal error: {type(exc).__name__}", type_="api_error", code="internal"),
                surface,
            )
            return
        if held and reply.stream is not None:
            hold_head(send)
        await send({"type": "http.response.start", "status": 200, "headers": reply.headers})
        if reply.stream is None:
            await send({"type": "http.response.body", "body": reply.body})
        else:
            await _stream(reply, send, client)

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

    def _authorize(self, scope: Scope) -> ApiKey:
        """An API key as OpenAI's clients send it (`Authorization: Bearer`) or Anthropic's (`x-api-key`)."""
        for name, value in scope["headers"]:
            token = value[7:].strip() if name == b"authorization" and value[:7].lower() == b"bearer " else None
            if name == b"x-api-key":
                token = value.strip()
            key = self.tenancy.authenticate(token.decode(errors="replace")) if token is not None else None
            if key is not None:
                return key
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


class _DisconnectWatch:
    """One task per request waits for the client's `http.disconnect`; while the request is armed (scheduling and
    dispatch up to the first token, then the stream) that cancels the request's task, and the cancellation lands
    at the await the task is suspended on, inside the armed part. Leaving the block stops the watch."""

    def __init__(self, receive: Receive) -> None:
        self._receive = receive
        task = asyncio.current_task()
        assert task is not None, "a request runs in a task"
        self._task = task
        self._armed = self._fired = self._cancelled = False
        self._watcher: asyncio.Task[None] | None = None

    def __enter__(self) -> "_DisconnectWatch":
        self._watcher = asyncio.ensure_future(self._watch())
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._watcher is not None
        self._watcher.cancel()

    async def _watch(self) -> None:
        while (await self._receive())["type"] != "http.disconnect":
            pass
        self._fired = True
        if self._armed:
            self._cancelled = True
            self._task.cancel()

    def arm(self) -> None:
        """From here a disconnect cancels the request's task (at once if the client has already gone)."""
        if self._fired:
            raise asyncio.CancelledError
        self._armed = True

    def disarm(self) -> None:
        self._armed = False

    def gone(self) -> bool:
        """Whether the client disconnected: True takes back the cancellation it caused, so the task goes on to
        end the request quietly."""
        if self._cancelled:
            self._cancelled = False
            self._task.uncancel()
        return self._fired


async def _send_json(send: Send, status: int, body: bytes) -> None:
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _send_error(send: Send, exc: APIError, surface: Surface | None = None) -> None:
    body = surface.error(exc) if surface is not None else openai_error(exc)
    await send(
        {
            "type": "http.response.start",
            "status": exc.status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *exc.headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def _stream(reply: Reply, send: Send, client: _DisconnectWatch) -> None:
    """Send SSE chunks; a client disconnect cancels the stream (and with it the work on the node)."""
    assert reply.stream is not None
    chunks: AsyncIterator[bytes] = reply.stream
    try:
        client.arm()
        async for chunk in chunks:
            if chunk:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        client.disarm()
        await send({"type": "http.response.body", "body": b"", "more_body": False})
    except asyncio.CancelledError:
        if not client.gone():
            raise
        log.info("client disconnected; generation cancelled")
    finally:
        client.disarm()
        aclose = getattr(chunks, "aclose", None)
        if aclose is not None:
            await aclose()
