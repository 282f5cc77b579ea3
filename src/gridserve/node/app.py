"""The node's HTTP surface: `GET /health` and the internal `POST /internal/generate` and `POST /internal/embed`
(gateway-signed)."""

import asyncio
import contextlib
import logging
import sys
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable
from typing import TYPE_CHECKING, Any, TypeVar, cast

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError

from gridserve.engines import Engine, EngineError, EngineStats, InvalidRequest
from gridserve.engines.embedding import Embeddings, embedder_for
from gridserve.node.agent import NodeAgent
from gridserve.node.dishonest import REFUSAL_TEXT, Dishonesty
from gridserve.node.faults import Faults, FaultsDisabled, FaultSpec
from gridserve.node.heap import settle_heap
from gridserve.node.metrics import NodeMetrics
from gridserve.node.receipts import RECEIPT_LIFETIME_S, Receipter
from gridserve.node.stage_link import add_stage_routes
from gridserve.trust import TrustError, sign_envelope
from gridserve.trust.challenge import answer as challenge_answer
from gridserve.types import GenerateRequest, StreamError, StreamEvent, TokenEvent
from gridserve.types.base import from_wire
from gridserve.types.embedding import EMBED_PURPOSE, EMBED_REPLY_PURPOSE, EmbedReply, EmbedRequest, encode_vector

if TYPE_CHECKING:
    from gridserve.engines.stage_engine import StageEngine

log = logging.getLogger("gridserve.node")
LOOPBACK = frozenset({"127.0.0.1", "::1", "localhost"})


def _error(status: int, kind: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"type": kind, "message": message}}, status_code=status)


class CallerGone(Exception):
    """The gateway closed the request before the first event."""


T = TypeVar("T")


async def _unless_gone(work: Awaitable[T], request: Request, poll_s: float = 0.25) -> T:
    """`work`'s result, or `CallerGone` (and the work cancelled) if the caller disconnects meanwhile."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=poll_s)
            if done:
                return task.result()
            if await request.is_disconnected():
                raise CallerGone
    except BaseException:
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        raise


def _signed_payload(agent: NodeAgent, body: bytes, purpose: str) -> dict[str, Any]:
    """The payload of a gateway-signed call to this node: signed by the gateway's key for `purpose`, fresh, never
    seen before, and addressed to this node (TrustError otherwise)."""
    envelope = agent.verifier.verify(body, purpose=purpose, expected_keyid=agent.gateway_key)
    payload = dict(envelope.payload)
    if payload.pop("node_id", None) != agent.identity.node_id:
        raise TrustError("request was signed for another node")
    return payload


def _embed_reply(agent: NodeAgent, lies: Dishonesty, job: EmbedRequest, made: Embeddings) -> bytes:
    """The answer, signed by this node (what it said is evidence against it if it is wrong)."""
    reply = EmbedReply(
        request_id=job.request_id,
        model=job.model,
        dimensions=int(made.vectors.shape[1]),
        vectors=tuple(encode_vector(v) for v in made.vectors),
        prompt_tokens=made.prompt_tokens,
    )
    signer = lies.signer(agent.identity)
    payload = reply.model_dump(mode="json")
    return sign_envelope(signer, payload, purpose=EMBED_REPLY_PURPOSE, now=time.time(), lifetime_s=RECEIPT_LIFETIME_S)


async def _first_unless_gone(events: AsyncIterator[Any], request: Request, poll_s: float = 0.25) -> Any:
    """The first event, or `CallerGone` (and the generator closed) if the caller disconnects meanwhile: a gateway
    that gave up on a slow first token (or whose client left) must not leave the work running here, taking the
    batch slots of the requests that still wait."""
    try:
        return await _unless_gone(anext(events), request, poll_s)
    except BaseException:
        aclose = getattr(events, "aclose", None)
        if aclose is not None:
            with contextlib.suppress(Exception):
                await aclose()
        raise


class _Observed:
    """A generation's events, timed into the node's metrics."""

    def __init__(self, metrics: NodeMetrics, model: str) -> None:
        self.metrics, self.model = metrics, model
        self.started = time.monotonic()
        self.last: float | None = None
        self.status = "cancelled"

    def token(self, event: TokenEvent) -> None:
        now = time.monotonic()
        if self.last is None:
            self.metrics.ttft.labels(model=self.model).observe(now - self.started)
        elif event.token_ids:
            self.metrics.itl.labels(model=self.model).observe(now - self.last)
        self.last = now
        self.metrics.tokens.labels(model=self.model).inc(len(event.token_ids))
        if event.finish_reason is not None:
            self.status = "ok"

    def done(self) -> None:
        self.metrics.requests.labels(model=self.model, status=self.status).inc()
        self.metrics.active.dec()


BUSY_EVERY_S = 0.25
"""A stream that has had no event for this long, while the engine ran other streams' steps, gets a busy line."""


async def _busy_between(events: AsyncIterator[TokenEvent], stats: EngineStats) -> AsyncGenerator[TokenEvent | int]:
    """The events, with the engine's step count in between each BUSY_EVERY_S without one while the engine made
    progress on other work (a long prefill of another prompt on a CPU node): the gateway then knows the node is
    busy, not hung (docs/protocol.md). An engine that counts no steps gets the events as they are."""
    if stats.steps is None:
        async for event in events:
            yield event
        return
    step = stats.steps
    pending = asyncio.ensure_future(anext(events))
    try:
        while True:
            done, _ = await asyncio.wait({pending}, timeout=BUSY_EVERY_S)
            if not done:
                if stats.steps != step:
                    step = stats.steps
                    yield step
                continue
            try:
                event = pending.result()
            except StopAsyncIteration:
                return
            yield event
            step = stats.steps
            pending = asyncio.ensure_future(anext(events))
    finally:
        if not pending.done():
            pending.cancel()
            with contextlib.suppress(BaseException):
                await pending


async def _stream(
    first: TokenEvent | None,
    rest: AsyncIterator[TokenEvent],
    seen: _Observed,
    engine: Engine,
    receipts: Receipter,
    generation: AsyncIterator[TokenEvent],
) -> AsyncIterator[bytes]:
    """The NDJSON lines of a generation. However it ends (finished, failed, or closed when the caller went away),
    the engine's own generator (`generation`, under the wrappers `rest` is made of) is closed before this one is:
    its cleanup gives back the batch slot and the KV cache, and its request stops counting as active."""
    try:
        if first is not None:
            seen.token(first)
            yield receipts.line(first)
        async with contextlib.aclosing(_busy_between(rest, engine.stats)) as paced:
            async for event in paced:
                if isinstance(event, int):
                    yield b'{"busy":%d}\n' % event
                    continue
                seen.token(event)
                yield receipts.line(event)
    except EngineError as exc:
        seen.status = "failed"
        yield _engine_error(engine, str(exc))
    finally:
        seen.done()
        aclose = getattr(generation, "aclose", None)
        if aclose is not None:
            await aclose()


class _ClosingStream(StreamingResponse):
    """A StreamingResponse that closes its body when the response ends, however it ends. Starlette's leaves the body
    generator suspended when the caller goes away while a chunk is being sent (the tunnel's sends wait on the
    gateway's connection, so a cancel often comes then), and the generation would hold its engine slot and count as
    active until the garbage collector found it: seconds on an idle node (measured: a hedge's cancelled loser still
    "active" 8 s later)."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()


def _engine_error(engine: Engine, message: str) -> bytes:
    line = StreamEvent(error=StreamError(type="engine_error", message=message))
    return orjson.dumps(line) + b"\n"


async def _dishonest(
    events: AsyncIterator[TokenEvent], lies: Dishonesty, job: GenerateRequest
) -> AsyncIterator[TokenEvent]:
    """Dishonest modes that change the stream: `truncate` stops after half the tokens and claims the length
    limit; `alter_output` replaces every 4th token; `corrupt_tool_args` the digits of tool calls."""
    after = lies.truncate_after(job.sampling.max_tokens)
    fmt = job.sampling.response_format
    calling = fmt is not None and fmt.type == "tool_calls"
    sent = 0
    async for event in events:
        if after is not None and sent >= after and event.finish_reason is None:
            yield TokenEvent(finish_reason="length", completion_tokens=sent)
            return
        altered = lies.alter(event, sent, calling)
        sent += len(event.token_ids)
        yield altered


def _digest(engine: Engine, model: str) -> str:
    return next((o.weights_digest for o in engine.offers() if o.name == model), "")


def build_node_app(
    agent: NodeAgent, engine: Engine, faults: Faults | None = None, lies: Dishonesty | None = None
) -> FastAPI:
    faults = faults or Faults(allowed=False)
    lies = lies or Dishonesty()
    metrics = NodeMetrics()
    agent.faults = faults

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await engine.start()
        settle_heap("the engine started")
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
    loading: set[asyncio.Task[None]] = set()

    @app.get("/health")
    async def health(challenge: str = "") -> dict[str, object]:
        """`challenge`: the gateway's probe nonce, signed with this node's key (trust/challenge.py)."""
        await faults.network_delay()
        return {
            "status": "ok",
            "node_id": agent.identity.node_id,
            "challenge_signature": challenge_answer(agent.identity, challenge) if challenge else "",
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
            payload = _signed_payload(agent, body, "generate")
            job = from_wire(GenerateRequest, payload)
        except TrustError as exc:
            log.warning("refused generate call: %s (%s)", exc.kind, exc.detail)
            engine.stats.note_error(f"refused generate: {exc.kind}")
            return _error(401, exc.kind, exc.detail)
        except ValidationError as exc:
            return _error(400, "invalid_request", str(exc))
        traceparent = request.headers.get("traceparent")  # W3C trace context of the gateway's dispatch span
        if traceparent and log.isEnabledFor(logging.DEBUG):
            log.debug("generate %s in trace %s", job.request_id, traceparent, extra={"traceparent": traceparent})
        await faults.network_delay()
        if lies.refuses:
            return _error(400, "invalid_request", REFUSAL_TEXT)
        injected = faults.take_error()
        if injected is not None:
            engine.stats.note_error(injected)
            metrics.errors.labels(kind=engine.stats.errors[-1].kind).inc()
            metrics.requests.labels(model=job.model, status="failed").inc()
            return StreamingResponse(iter([_engine_error(engine, injected)]), media_type="application/x-ndjson")
        if job.model in engine.loadable():  # a cold start: announce the model once it is loaded
            task = asyncio.create_task(agent.load(job.model))  # (loads once: the engine holds a lock)
            loading.add(task)
            task.add_done_callback(loading.discard)
        seen = _Observed(metrics, job.model)
        metrics.active.inc()
        generation = engine.generate(job)
        events = _dishonest(faults.apply(generation, engine.stats), lies, job)
        try:
            first = await _first_unless_gone(events, request)
        except CallerGone:
            seen.done()  # counted as cancelled; the engine's work stopped with the generator
            return _error(499, "client_closed_request", "the gateway closed the request before its first token")
        except StopAsyncIteration:
            first = None
        except InvalidRequest as exc:
            seen.status = "invalid"
            seen.done()
            return _error(400, "invalid_request", str(exc))
        except EngineError as exc:
            seen.status = "failed"
            seen.done()
            return _error(500, "engine_error", str(exc))
        receipts = Receipter(agent, payload, _digest(engine, job.model), lies)
        lines = _stream(first, events, seen, engine, receipts, generation)
        return _ClosingStream(lines, media_type="application/x-ndjson")

    @app.post("/internal/embed")
    async def embed(request: Request) -> Response:
        """Embeddings of the inputs, checked and refused as a generation is; the answer is signed by this node."""
        body = await request.body()
        if agent.gateway_key is None:
            return _error(503, "not_registered", "this node has not registered with a gateway yet")
        try:
            job = from_wire(EmbedRequest, _signed_payload(agent, body, EMBED_PURPOSE))
        except TrustError as exc:
            log.warning("refused embed call: %s (%s)", exc.kind, exc.detail)
            engine.stats.note_error(f"refused embed: {exc.kind}")
            return _error(401, exc.kind, exc.detail)
        except ValidationError as exc:
            return _error(400, "invalid_request", str(exc))
        await faults.network_delay()
        if lies.refuses:
            return _error(400, "invalid_request", REFUSAL_TEXT)
        injected = faults.take_error()
        if injected is not None:
            engine.stats.note_error(injected)
            metrics.requests.labels(model=job.model, status="failed").inc()
            return _error(500, "engine_error", injected)
        embedder = embedder_for(engine, engine.offers(), job.model)
        if embedder is None:
            return _error(404, "not_served", f"this node does not embed with {job.model}")
        try:
            made = await _unless_gone(embedder.embed(job.model, job.inputs), request)
        except CallerGone:
            metrics.requests.labels(model=job.model, status="cancelled").inc()
            return _error(499, "client_closed_request", "the gateway closed the request before its answer")
        except InvalidRequest as exc:
            metrics.requests.labels(model=job.model, status="invalid").inc()
            return _error(400, "invalid_request", str(exc))
        except EngineError as exc:
            metrics.requests.labels(model=job.model, status="failed").inc()
            return _error(500, "engine_error", str(exc))
        metrics.requests.labels(model=job.model, status="ok").inc()
        return Response(_embed_reply(agent, lies, job, made), media_type="application/json")

    @app.post("/internal/load")
    async def load(request: Request) -> Response:
        """Pre-warm: the gateway (signed) asks this node to load a model it has on disk."""
        if agent.gateway_key is None:
            return _error(503, "not_registered", "this node has not registered with a gateway yet")
        try:
            envelope = agent.verifier.verify(await request.body(), purpose="load", expected_keyid=agent.gateway_key)
            if envelope.payload.get("node_id") != agent.identity.node_id:
                raise TrustError("request was signed for another node")
        except TrustError as exc:
            engine.stats.note_error(f"refused load: {exc.kind}")
            return _error(401, exc.kind, exc.detail)
        model = str(envelope.payload.get("model", ""))
        layers = envelope.payload.get("layers")
        if layers is not None:
            return _assign(model, layers)
        if model not in engine.loadable():
            resident = model in {o.name for o in engine.offers()}
            return JSONResponse(
                {"model": model, "status": "resident" if resident else "unknown"}, status_code=200 if resident else 404
            )
        task = asyncio.create_task(agent.load(model))
        loading.add(task)
        task.add_done_callback(loading.discard)
        return JSONResponse({"model": model, "status": "loading"}, status_code=202)

    def _assign(model: str, layers: Any) -> Response:
        """The gateway's planner assigns this stage node a layer range of `model`."""
        if model not in getattr(engine, "stage_models", tuple)():
            return _error(404, "not_a_stage", f"this node does not take layer assignments for {model!r}")
        if not (isinstance(layers, list) and len(layers) == 2 and all(type(x) is int for x in layers)):
            return _error(400, "bad_layers", "layers must be [start, end]")
        task = asyncio.create_task(agent.assign_layers(layers[0], layers[1]))
        loading.add(task)
        task.add_done_callback(loading.discard)
        return JSONResponse({"model": model, "layers": layers, "status": "loading"}, status_code=202)

    @app.get("/metrics")
    async def prometheus() -> Response:
        metrics.faults.set(len(faults.spec.active()))
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    _fault_routes(app, faults)
    stage = _stage_engine(engine)
    if stage is not None:
        add_stage_routes(app, agent, stage)
    return app


def _stage_engine(engine: Engine) -> "StageEngine | None":
    """The engine as a pipeline stage, or None; without importing torch for a node that runs no stage (a light
    node in front of an upstream server has no torch installed: its module is loaded only if one was made)."""
    module = sys.modules.get("gridserve.engines.stage_engine")
    if module is None or not isinstance(engine, module.StageEngine):
        return None
    return cast("StageEngine", engine)


def _fault_routes(app: FastAPI, faults: Faults) -> None:
    def refuse(request: Request) -> JSONResponse | None:
        if not faults.allowed:
            return _error(403, "faults_disabled", str(FaultsDisabled()))
        host = request.client.host if request.client else ""
        if host not in LOOPBACK:
            return _error(403, "forbidden", "fault injection is accepted from this machine only")
        return None

    @app.get("/faults")
    async def show(request: Request) -> Response:
        refused = refuse(request)
        return refused or JSONResponse({"faults": faults.spec.model_dump(), "active": list(faults.spec.active())})

    @app.post("/faults")
    async def inject(request: Request) -> Response:
        refused = refuse(request)
        if refused:
            return refused
        try:
            spec = FaultSpec.model_validate_json(await request.body())
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            return _error(400, "invalid_request", f"invalid fault: {where}: {first['msg']}")
        faults.set(spec)
        log.warning("faults injected: %s", ", ".join(spec.active()) or "none")
        return JSONResponse({"faults": spec.model_dump(), "active": list(spec.active())})

    @app.delete("/faults")
    async def clear(request: Request) -> Response:
        refused = refuse(request)
        if refused:
            return refused
        faults.clear()
        return JSONResponse({"faults": faults.spec.model_dump(), "active": []})
