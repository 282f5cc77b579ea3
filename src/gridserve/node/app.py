"""The node's HTTP surface: `GET /health` and the internal `POST /internal/generate` (gateway-signed)."""

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError

from gridserve.engines import Engine, EngineError, InvalidRequest
from gridserve.node.agent import NodeAgent
from gridserve.trust import TrustError
from gridserve.types import GenerateRequest, TokenEvent
from gridserve.types.base import from_wire

log = logging.getLogger("gridserve.node")


def _error(status: int, kind: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"type": kind, "message": message}}, status_code=status)


def _line(event: TokenEvent) -> bytes:
    return orjson.dumps(event.model_dump(exclude_defaults=True)) + b"\n"


async def _stream(first: TokenEvent | None, rest: AsyncIterator[TokenEvent]) -> AsyncIterator[bytes]:
    if first is not None:
        yield _line(first)
    try:
        async for event in rest:
            yield _line(event)
    except EngineError as exc:
        yield orjson.dumps({"error": {"type": "engine_error", "message": str(exc)}}) + b"\n"


def build_node_app(agent: NodeAgent, engine: Engine) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await engine.start()
        task = asyncio.create_task(agent.run())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await agent.aclose()
            await engine.aclose()

    app = FastAPI(title="gridserve node", lifespan=lifespan, docs_url=None, redoc_url=None)

    @app.get("/health")
    async def health() -> dict[str, object]:
        return {
            "status": "ok",
            "node_id": agent.identity.node_id,
            "registered": agent.registered.is_set(),
            "engine": engine.kind,
            "models": [o.name for o in engine.offers()],
            "active": engine.stats.active,
            "time": time.time(),
        }

    @app.post("/internal/generate")
    async def generate(request: Request) -> Response:
        body = await request.body()
        if agent.gateway_key is None:
            return _error(503, "not_registered", "this node has not registered with a gateway yet")
        try:
            envelope = agent.verifier.verify(body, purpose="generate", expected_keyid=agent.gateway_key)
            payload = dict(envelope.payload)
            if payload.pop("node_id", None) != agent.identity.node_id:
                raise TrustError("request was signed for another node")
            job = from_wire(GenerateRequest, payload)
        except TrustError as exc:
            log.warning("refused generate call: %s (%s)", exc.kind, exc.detail)
            engine.stats.note_error(f"refused generate: {exc.kind}")
            return _error(401, exc.kind, exc.detail)
        except ValidationError as exc:
            return _error(400, "invalid_request", str(exc))
        events = engine.generate(job)
        try:
            first = await anext(events)
        except StopAsyncIteration:
            first = None
        except InvalidRequest as exc:
            return _error(400, "invalid_request", str(exc))
        except EngineError as exc:
            return _error(500, "engine_error", str(exc))
        return StreamingResponse(_stream(first, events), media_type="application/x-ndjson")

    return app
