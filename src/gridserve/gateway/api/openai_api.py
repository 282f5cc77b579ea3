"""`/v1/models`, `/v1/chat/completions`, `/v1/completions`."""

import asyncio
import contextlib
import logging
import random
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson
from pydantic import ValidationError

from gridserve.catalog.models import MODELS
from gridserve.catalog.tiers import DEFAULT_TIER
from gridserve.engines import grammar
from gridserve.gateway.api import tools
from gridserve.gateway.api.errors import APIError, bad_request, model_not_found, no_capacity, unsupported_parameter
from gridserve.gateway.api.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    GridOptions,
    SamplingFields,
    unsupported,
)
from gridserve.gateway.api.sse import DONE, ChunkFormatter
from gridserve.gateway.dispatch.dispatcher import Dispatcher
from gridserve.gateway.dispatch.generation import Generation, GenerationFailed
from gridserve.gateway.dispatch.prefixes import PrefixAffinity
from gridserve.gateway.integrity.audit import Auditor
from gridserve.gateway.integrity.receipts import ReceiptChecker
from gridserve.gateway.lifecycle import Finished, Lifecycle, Scope, from_generation, from_pipeline
from gridserve.gateway.ops.decisions import DecisionLog
from gridserve.gateway.ops.metrics import GatewayMetrics
from gridserve.gateway.ops.outcomes import Traces
from gridserve.gateway.pipeline.candidate import is_pipeline
from gridserve.gateway.pipeline.serving import Pipelines, Run
from gridserve.gateway.registry.membership import Membership, NodeRecord
from gridserve.prefix.blocks import CHARS_PER_TOKEN
from gridserve.reliability import EventKind, NodeEvent, Severity
from gridserve.scheduler import KERNEL_POOL, Scheduler, UnknownTier
from gridserve.scheduler.snapshot import NodeSnapshot
from gridserve.types import ChatMessage, GenerateRequest, NodeId, SamplingParams, StreamEvent
from gridserve.types.scheduling import Decision, ScheduleRequest
from gridserve.types.wire import ResponseFormat

log = logging.getLogger("gridserve.gateway")
DEFAULT_MAX_TOKENS = {"chat": 256, "text": 16}
OPTION_FILTERS = {"price-ceiling": "gridserve.max_price_per_mtok", "runtime": "gridserve.engines"}
"""Filters that apply a request's own options (rejected by these alone: a 400 naming the option, not a 503)."""
TIER_FILTERS = {"tier-hardware": "gridserve.tier", "throughput-floor": "gridserve.tier"}
"""The same, when the request names its tier."""
FEATURE_NAMES = {
    "top_k": "top-k sampling",
    "repetition_penalty": "a repetition penalty",
    "min_tokens": "a minimum length",
    "ignore_eos": "generating past the end-of-sequence token",
    "response_format": "structured output",
    "tools": "tool calling",
}


@dataclass
class ApiContext:
    membership: Membership
    dispatcher: Dispatcher
    decisions: DecisionLog
    metrics: GatewayMetrics
    scheduler: Scheduler
    """The profile's decisions (it owns the compiled kernel and the numpy generator tied to `rng`)."""
    rng: random.Random
    traces: Traces
    receipts: ReceiptChecker
    auditor: Auditor
    lifecycle: Lifecycle
    on_request: Callable[[str], None] = lambda model: None
    """Told the model of every accepted request (demand, for pre-warming)."""
    pipelines: Pipelines | None = None
    """Models no live node holds whole, served over chains of stage nodes."""
    prefixes: PrefixAffinity | None = None
    """Which nodes probably hold a prompt's prefix in their KV cache (None: prefix-blind routing)."""


def parse(body: bytes, model: type[SamplingFields]) -> Any:
    try:
        raw = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise bad_request(f"Request body is not valid JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise bad_request("Request body must be a JSON object.")
    refused = unsupported(raw, chat=model is ChatCompletionRequest)
    if refused is not None:
        raise unsupported_parameter(*refused)
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        raise bad_request(f"Invalid request: {param}: {first['msg']}", param=param) from exc


def to_job(req: SamplingFields, kind: str, request_id: str) -> tuple[GenerateRequest, int]:
    max_tokens = req.max_completion_tokens or req.max_tokens or DEFAULT_MAX_TOKENS[kind]
    if req.min_tokens is not None and req.min_tokens > max_tokens:
        raise bad_request(
            f"Invalid request: min_tokens ({req.min_tokens}) exceeds max_tokens ({max_tokens}).", param="min_tokens"
        )
    fmt = _response_format(req.response_format)
    described = ""
    if isinstance(req, ChatCompletionRequest):
        calls, described = tools.tool_format(req.tools, req.tool_choice, req.parallel_tool_calls)
        if calls is not None and fmt is not None:
            raise bad_request(
                "Invalid request: an answer is either tool calls or a response_format, not both.", param="tool_choice"
            )
        fmt = calls or fmt
    if fmt is not None and (req.ignore_eos or req.min_tokens):
        raise bad_request(
            "Invalid request: response_format ends the answer where its format does; it cannot be combined with "
            "ignore_eos or min_tokens.",
            param="response_format",
        )
    sampling = SamplingParams(
        max_tokens=max_tokens,
        temperature=req.temperature,
        top_p=req.top_p,
        seed=req.seed,
        stop=req.stop_list(),
        top_k=max(0, req.top_k or 0),
        repetition_penalty=req.repetition_penalty or 1.0,
        min_tokens=req.min_tokens or 0,
        ignore_eos=bool(req.ignore_eos),
        response_format=fmt,
    )
    if sampling.seed is None and not sampling.greedy:
        # the gateway's own draw: the answer is as random to the client as without one, and a verifier can
        # re-execute it token by token (gateway/integrity/audit.py); nodes cannot tell it from a client's seed
        sampling = sampling.model_copy(update={"seed": secrets.randbits(63)})
    if isinstance(req, ChatCompletionRequest):
        if described or tools.uses_tools(req.messages):
            messages = tools.render(req.messages, described)
        else:
            messages = tuple(ChatMessage(role=m.role, content=m.text()) for m in req.messages)
        chars = sum(len(m.content) for m in messages)
        job = GenerateRequest(request_id=request_id, model=req.model, messages=messages, sampling=sampling)
    else:
        assert isinstance(req, CompletionRequest)
        prompt = req.prompt_text()
        chars = len(prompt)
        job = GenerateRequest(request_id=request_id, model=req.model, prompt=prompt, sampling=sampling)
    return job, chars // CHARS_PER_TOKEN


def _response_format(raw: dict[str, Any] | None) -> ResponseFormat | None:
    """OpenAI's `response_format` as the node's, checked to compile to a grammar (a 400 naming what is wrong)."""
    kind = (raw or {}).get("type", "text")
    if raw is None or kind == "text":
        return None
    if kind == "json_object":
        return ResponseFormat(type="json_object")
    if kind != "json_schema":
        raise bad_request(
            f"Invalid request: response_format.type must be text, json_object or json_schema, not {kind!r}.",
            param="response_format.type",
        )
    spec = raw.get("json_schema")
    schema = spec.get("schema") if isinstance(spec, dict) else None
    if not isinstance(spec, dict) or not isinstance(schema, dict):
        raise bad_request(
            "Invalid request: response_format.json_schema.schema must be a JSON schema (an object).",
            param="response_format.json_schema.schema",
        )
    name, strict = spec.get("name", ""), spec.get("strict", False)
    if not isinstance(name, str) or len(name) > 64 or not isinstance(strict, bool | None):
        raise bad_request(
            "Invalid request: response_format.json_schema.name must be a string of at most 64 characters and "
            "strict a boolean.",
            param="response_format.json_schema",
        )
    try:
        fmt = ResponseFormat(
            type="json_schema", schema_text=orjson.dumps(schema).decode(), name=name, strict=bool(strict)
        )
    except ValidationError as exc:
        raise bad_request(
            f"Invalid request: response_format.json_schema: {exc.errors()[0]['msg']}.",
            param="response_format.json_schema",
        ) from exc
    problem = grammar.check(fmt)
    if problem:
        raise bad_request(
            f"Invalid request: response_format.json_schema.schema cannot be generated: {problem}",
            param="response_format.json_schema.schema",
        )
    return fmt


def decide(
    ctx: ApiContext,
    job: GenerateRequest,
    prompt_tokens: int,
    options: GridOptions,
    cached: tuple[tuple[str, int], ...] = (),
) -> Decision:
    """Schedule the request over the live nodes and, where stage nodes cover the model, its best pipeline (one
    candidate among the nodes: gateway/pipeline/candidate.py)."""
    serving = ctx.membership.live_models().get(job.model, [])
    now = time.time()
    pipeline = ctx.pipelines.candidate(job.model, now) if ctx.pipelines is not None else None
    if not serving and pipeline is None:
        raise model_not_found(job.model)
    if job.sampling.features():
        _require_features(job, serving, pipeline)
    ctx.on_request(job.model)
    contexts = [_context(r, job.model) for r in serving]
    context = max(contexts + ([pipeline.capability.models[0].max_context] if pipeline is not None else []))
    if job.sampling.max_tokens > context:
        raise bad_request(
            f"max_tokens ({job.sampling.max_tokens}) exceeds the context of {job.model} ({context} tokens).",
            param="max_tokens",
        )
    request = ScheduleRequest(
        request_id=job.request_id,
        model=job.model,
        prompt_tokens=prompt_tokens,
        max_tokens=job.sampling.max_tokens,
        tier=options.tier or DEFAULT_TIER,
        max_price_per_mtok=options.max_price_per_mtok,
        ttft_slo_s=options.ttft_slo_s,
        tpot_slo_s=options.tpot_slo_s,
        engines=tuple(options.engines) if options.engines else None,
        features=job.sampling.features(),
        cached_tokens=cached,
    )
    try:
        snapshots = ctx.membership.snapshots()
        if pipeline is not None:
            snapshots.append(pipeline)
        if len(snapshots) >= KERNEL_POOL:
            ctx.scheduler.warm(background=True)  # once: the compiled kernel, for grids large enough to want it
        decision = ctx.scheduler.schedule(request, snapshots, ctx.rng, now)
    except UnknownTier as exc:
        raise bad_request(str(exc), param="gridserve.tier") from exc
    ctx.metrics.decisions.labels(outcome="placed" if decision.chosen else "none").inc()
    for name, count in decision.rejected_by_filter.items():
        ctx.metrics.filter_rejections.labels(filter=name).inc(count)
    if decision.chosen is None:
        live = {r.capability.node_id for r in serving} | ({pipeline.node_id} if pipeline is not None else set())
        reasons = [r for r in decision.rejections if r.node_id in live]
        if reasons and all(r.filter == "context-fit" for r in reasons):
            raise bad_request(
                f"prompt plus max_tokens exceed the context of {job.model}: {reasons[0].reason}", param="max_tokens"
            )
        params = {**OPTION_FILTERS, **(TIER_FILTERS if options.tier else {})}
        if reasons and all(r.filter in params for r in reasons):  # the request's own options exclude every node
            raise bad_request(
                f"no live node meets the request's options: {decision.explanation}", param=params[reasons[0].filter]
            )
        raise no_capacity(decision.explanation)
    return decision


def _require_features(job: GenerateRequest, serving: list[NodeRecord], pipeline: NodeSnapshot | None) -> None:
    """A 400 naming the first feature the request turns on that no live node (nor the model's pipeline) honours for
    the model: never served as though the parameter were absent. A node that holds the model but has not loaded it
    has not said yet (its offer comes with the weights): it does not count."""
    offers = [o for r in serving for o in r.capability.models if o.name == job.model and o.layers is None]
    if pipeline is not None:
        offers += [o for o in pipeline.capability.models if o.name == job.model]
    for name in job.sampling.features():
        if not any(name in o.features for o in offers):
            raise unsupported_parameter(name, f"{FEATURE_NAMES[name]} from {job.model}", by_no_node=True)


def _context(record: NodeRecord, model: str) -> int:
    offer = next((o for o in record.capability.models if o.name == model), None)
    if offer is not None:
        return offer.max_context
    spec = MODELS.get(model)  # loadable, not resident: the catalogue's context
    return spec.max_context if spec else 0


@dataclass
class Reply:
    """A response before transport: whole JSON (`body`) or an SSE stream (`stream`)."""

    headers: list[tuple[bytes, bytes]]
    body: bytes = b""
    stream: AsyncIterator[bytes] | None = None


async def complete(ctx: ApiContext, body: bytes, kind: str) -> Reply:
    model_type = ChatCompletionRequest if kind == "chat" else CompletionRequest
    req = parse(body, model_type)
    request_id = ("chatcmpl-" if kind == "chat" else "cmpl-") + secrets.token_hex(12)
    job, prompt_tokens = to_job(req, kind, request_id)
    if ctx.pipelines is not None and ctx.pipelines.placement.needed(job.model):  # `--layers auto` nodes only
        await ctx.pipelines.placement.place(job.model)
    scope = ctx.lifecycle.begin(kind)
    cached = ctx.prefixes.lookup(scope, job, prompt_tokens) if ctx.prefixes is not None else ()
    decision = decide(ctx, job, prompt_tokens, req.gridserve, cached)
    ctx.lifecycle.decided(scope, decision)
    if is_pipeline(decision.chosen):
        return await _pipelined(ctx, scope, decision, req, job, kind)
    gen = Generation(ctx.dispatcher, decision, job, hedge=req.gridserve.hedge)
    try:
        await gen.open()
    except APIError as exc:
        ctx.lifecycle.not_opened(scope, decision, exc.message)
        raise
    stream = gen.stream
    log.info(
        "dispatched %s (decision %s) to %s",
        request_id,
        decision.decision_id,
        stream.node_id,
        extra={"request_id": request_id, "decision_id": decision.decision_id, "node_id": stream.node_id},
    )
    headers = [(b"x-gridserve-decision", decision.decision_id.encode()), (b"x-gridserve-node", stream.node_id.encode())]
    ctx.lifecycle.opened(
        scope,
        decision,
        stream.node_id,
        attempts=[a.__dict__ for a in stream.attempts],
        hedged=stream.hedged,
        hedge_delay_s=None if stream.hedge_delay_s is None else round(stream.hedge_delay_s, 6),
        ttft_s=round(stream.first_at - stream.started, 6),
    )
    source = _WholeModel(ctx, scope, gen, kind)
    return await _reply(ctx, req, decision, headers, source, kind, job)


async def _pipelined(
    ctx: ApiContext, scope: Scope, decision: Decision, req: SamplingFields, job: GenerateRequest, kind: str
) -> Reply:
    """The scheduler chose the pipeline candidate: run the request over its chain of stage nodes."""
    assert ctx.pipelines is not None
    try:
        run = await ctx.pipelines.start(job)
    except APIError as exc:
        ctx.lifecycle.not_opened(scope, decision, exc.message)
        raise
    run.on_stage_failed = lambda node_id, why: ctx.lifecycle.failover(scope, node_id, why)
    nodes = ",".join(r.node_id for r in run.session.chain)
    ctx.lifecycle.opened(scope, decision, decision.chosen or "", chain=nodes)
    headers = [
        (b"x-gridserve-decision", decision.decision_id.encode()),
        (b"x-gridserve-pipeline", run.session.session.encode()),
        (b"x-gridserve-node", nodes.encode()),
    ]
    return await _reply(ctx, req, decision, headers, _Pipeline(ctx, scope, run, decision, kind), kind, job)


class _Source:
    """One serving path's events, and how the request ended as the lifecycle records it."""

    scope: Scope

    def events(self) -> AsyncIterator[StreamEvent]:
        raise NotImplementedError

    async def close(self) -> None:
        """Release the work (the client left, or the answer ended)."""

    def finished(self, status: str, error: str, last: StreamEvent) -> Finished:
        raise NotImplementedError

    def served_by(self) -> str:
        raise NotImplementedError


class _WholeModel(_Source):
    def __init__(self, ctx: ApiContext, scope: Scope, gen: Generation, kind: str) -> None:
        self.ctx, self.scope, self.gen, self.kind = ctx, scope, gen, kind
        gen.on_failover = lambda failed: ctx.lifecycle.failover(scope, failed.node_id, failed.detail)

    def events(self) -> AsyncIterator[StreamEvent]:
        return self.gen.events()

    async def close(self) -> None:
        self.gen.close()

    def finished(self, status: str, error: str, last: StreamEvent) -> Finished:
        return from_generation(self.gen, self.kind, status=status, error=error, last=last)

    def served_by(self) -> str:
        return self.gen.segment.node_id


class _Pipeline(_Source):
    def __init__(self, ctx: ApiContext, scope: Scope, run: Run, decision: Decision, kind: str) -> None:
        self.ctx, self.scope, self.run, self.decision, self.kind = ctx, scope, run, decision, kind

    def events(self) -> AsyncIterator[StreamEvent]:
        return self.run.events

    async def close(self) -> None:
        aclose = getattr(self.run.events, "aclose", None)
        if aclose is not None:
            await aclose()

    def finished(self, status: str, error: str, last: StreamEvent) -> Finished:
        return from_pipeline(self.run, self.decision, self.kind, status=status, error=error)

    def served_by(self) -> str:
        return self.decision.chosen or ""


async def _reply(
    ctx: ApiContext,
    req: SamplingFields,
    decision: Decision,
    headers: list[tuple[bytes, bytes]],
    source: _Source,
    kind: str,
    job: GenerateRequest,
) -> Reply:
    if req.gridserve.explain:
        headers.append((b"x-gridserve-explain", decision.explanation.encode("ascii", "replace")))
    fmt = ChunkFormatter(chat=kind == "chat", response_id=decision.request_id, model=decision.model)
    answer_format = job.sampling.response_format
    calls = (
        _Calls(ctx, source, answer_format) if answer_format is not None and answer_format.type == "tool_calls" else None
    )
    if req.stream:
        headers.append((b"content-type", b"text/event-stream"))
        headers.append((b"cache-control", b"no-cache"))
        return Reply(headers=headers, stream=_sse(ctx, source, fmt, req.include_usage(), calls))
    whole = await _collect(ctx, source, fmt, calls)
    if req.gridserve.explain:
        whole["gridserve"] = summary(decision, source.served_by())
    headers.append((b"content-type", b"application/json"))
    return Reply(headers=headers, body=orjson.dumps(whole))


async def _drain(ctx: ApiContext, source: _Source) -> AsyncIterator[StreamEvent]:
    """The path's events, with the request's end recorded by the lifecycle whatever happens; a generation that
    cannot go on ends with an `error` event."""
    status, error = "ok", ""
    last: StreamEvent = {}
    try:
        async for event in source.events():
            if "error" in event:
                status, error = "failed", str(event["error"].get("message", "node failed"))
            last = event
            yield event
    except GenerationFailed as exc:
        status, error = "failed", str(exc)
        yield {"error": {"message": error}}
    except (asyncio.CancelledError, GeneratorExit):
        status, error = "cancelled", "client disconnected"
        raise
    except BaseException as exc:
        status, error = "failed", f"{type(exc).__name__}: {exc}"
        raise
    finally:
        if status != "ok":
            await _quietly(source.close())
        end = source.finished(status, error, last)
        settled = ctx.lifecycle.finished(source.scope, end)
        if status != "ok":  # no answer to hold back: stored in the background
            await ctx.lifecycle.commit(end, settled)
    await source.close()
    await ctx.lifecycle.commit(end, settled)  # the answer ends only once its tokens are settled


async def _quietly(awaitable: Awaitable[None]) -> None:
    with contextlib.suppress(Exception):
        await awaitable


class _Calls:
    """An answer that may be tool calls: held back from the stream once it starts as calls, then turned into
    OpenAI's `tool_calls` (finish_reason `tool_calls`) when it ends by itself. A call that its grammar does not
    allow (only a node not decoding under it can send one) is an integrity incident at the node that served it,
    and the client gets the answer as text."""

    def __init__(self, ctx: ApiContext, source: _Source, answer_format: ResponseFormat) -> None:
        self.ctx, self.source, self.format = ctx, source, answer_format
        self.held: list[str] | None = None
        """The answer so far once it is known to be calls (None: not known yet, or text)."""
        self.decided = False

    def hold(self, text: str) -> bool:
        """Whether `text` (the next non-empty piece) is held back as part of calls."""
        if not self.decided:
            self.decided = True
            if not self.format.optional or text.startswith("<"):
                self.held = []
        if self.held is None:
            return False
        self.held.append(text)
        return True

    def finish(self, reason: str) -> tuple[list[dict[str, Any]] | None, str, str]:
        """(the calls, the finish reason, the held text to send as text when the answer is not whole calls)."""
        text = "".join(self.held or [])
        if self.held is None or reason != "stop":
            return None, reason, text
        problem = tools.validate(text, self.format)
        made = tools.parse_calls(text) if not problem else None
        if made is None:
            self._incident(problem or "the answer is not tool calls")
            return None, reason, text
        return [c.openai(index=i) for i, c in enumerate(made)], "tool_calls", ""

    def _incident(self, problem: str) -> None:
        node = self.source.served_by()
        log.warning("invalid tool call from %s: %s", node, problem)
        self.ctx.membership.note(
            NodeEvent(
                node_id=node,
                kind=EventKind.INCIDENT,
                at=time.time(),
                severity=Severity.SEVERE,
                detail=f"integrity: tool call outside its grammar: {problem}",
            )
        )


async def _sse(
    ctx: ApiContext, source: _Source, fmt: ChunkFormatter, include_usage: bool, calls: _Calls | None = None
) -> AsyncIterator[bytes]:
    yield fmt.role()
    async for event in _drain(ctx, source):
        if "error" in event:
            yield fmt.error(str(event["error"].get("message", "node failed")), "node_failed")
            return
        text = event.get("text")
        if text and not (calls is not None and calls.hold(text)):
            yield fmt.text(text)
        reason = event.get("finish_reason")
        if reason:
            if calls is not None:
                made, reason, held = calls.finish(reason)
                if made:
                    yield fmt.tool_calls(made)
                elif held:
                    yield fmt.text(held)
            yield fmt.finish(reason)
            if include_usage:
                yield fmt.usage(
                    int(event.get("prompt_tokens", 0)),
                    int(event.get("completion_tokens", 0)),
                    int(event.get("cached_tokens", 0)),
                )
    yield DONE


async def _collect(
    ctx: ApiContext, source: _Source, fmt: ChunkFormatter, calls: _Calls | None = None
) -> dict[str, Any]:
    parts: list[str] = []
    final: StreamEvent = {}
    async for event in _drain(ctx, source):
        if "error" in event:
            raise APIError(
                502,
                f"node failed mid-generation: {event['error'].get('message', '')}",
                type_="api_error",
                code="node_failed",
            )
        parts.append(event.get("text", ""))
        final = event
    text, reason, made = "".join(parts), str(final.get("finish_reason") or "stop"), None
    if calls is not None and text:
        calls.hold(text)
        made, reason, _ = calls.finish(reason)
    return fmt.whole(
        text,
        reason,
        int(final.get("prompt_tokens", 0)),
        int(final.get("completion_tokens", 0)),
        int(final.get("cached_tokens", 0)),
        tool_calls=made,
    )


def summary(decision: Decision, served_by: str) -> dict[str, Any]:
    """The inline explanation (request option `gridserve.explain`)."""
    chosen = decision.candidate(served_by)
    return {
        "decision_id": decision.decision_id,
        "served_by": served_by,
        "explanation": decision.explanation,
        "score": chosen.score if chosen else None,
        "margin": decision.margin,
        "predicted_ttft_s": chosen.predicted_ttft_s if chosen else None,
        "price_per_mtok": chosen.price_per_mtok if chosen else None,
        "eligible": decision.eligible_count,
        "rejected": decision.rejected_count,
    }


def list_models(ctx: ApiContext) -> dict[str, Any]:
    data = []
    for name, records in sorted(ctx.membership.live_models().items()):
        # labelled by the attested digest (a gateway accepts `emulated:` digests only with --allow-emulated),
        # not by what a node says of its hardware
        emulated = all(
            o.weights_digest.startswith("emulated:") for r in records for o in r.capability.models if o.name == name
        )
        data.append(
            {
                "id": name,
                "object": "model",
                "created": int(min(r.registered_at for r in records)),
                "owned_by": "gridserve",
                "nodes": len(records),
                "emulated": emulated,
            }
        )
    pipelines = ctx.pipelines
    for name in pipelines.models() if pipelines is not None else []:
        assert pipelines is not None
        stages = pipelines.routes(name)
        nodes = ctx.membership.nodes
        created = min((nodes[NodeId(r.node_id)].registered_at for r in stages if r.node_id in nodes), default=0.0)
        data.append(
            {
                "id": name,
                "object": "model",
                "created": int(created),
                "owned_by": "gridserve",
                "nodes": len(stages),
                "emulated": False,
                "pipeline": True,
            }
        )
    return {"object": "list", "data": data}


__all__ = ["ApiContext", "complete", "list_models"]
