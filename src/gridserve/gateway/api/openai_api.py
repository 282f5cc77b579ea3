"""`/v1/models`, `/v1/chat/completions`, `/v1/completions`."""

import asyncio
import logging
import random
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson
from pydantic import ValidationError

from gridserve.catalog.models import MODELS
from gridserve.catalog.tiers import DEFAULT_TIER
from gridserve.engines import grammar
from gridserve.gateway.api import tools
from gridserve.gateway.api.answers import (
    Calls,
    PipelineRun,
    Source,
    WholeModel,
    abandon,
    collect,
    collect_many,
    sse,
    sse_many,
)
from gridserve.gateway.api.errors import (
    APIError,
    bad_request,
    json_object,
    model_not_found,
    no_capacity,
    unsupported_parameter,
)
from gridserve.gateway.api.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    GridOptions,
    SamplingFields,
    unsupported,
)
from gridserve.gateway.api.sse import ChunkFormatter
from gridserve.gateway.api.surface import Renderer, Surface, openai_error
from gridserve.gateway.dispatch.dispatcher import Dispatcher
from gridserve.gateway.dispatch.generation import Generation
from gridserve.gateway.dispatch.prefixes import PrefixAffinity
from gridserve.gateway.integrity.audit import Auditor
from gridserve.gateway.integrity.receipts import ReceiptChecker
from gridserve.gateway.lifecycle import Lifecycle, Scope
from gridserve.gateway.ops.decisions import DecisionLog
from gridserve.gateway.ops.metrics import GatewayMetrics
from gridserve.gateway.ops.outcomes import Traces
from gridserve.gateway.pipeline.candidate import is_pipeline
from gridserve.gateway.pipeline.serving import Pipelines
from gridserve.gateway.registry.membership import Membership, NodeRecord
from gridserve.gateway.tenancy.limits import CURRENT, Admission
from gridserve.prefix.blocks import CHARS_PER_TOKEN
from gridserve.scheduler import KERNEL_POOL, Scheduler, UnknownTier
from gridserve.scheduler.snapshot import NodeSnapshot
from gridserve.types import ChatMessage, GenerateRequest, NodeId, SamplingParams
from gridserve.types.node import GENERATE
from gridserve.types.scheduling import Decision, ScheduleRequest
from gridserve.types.wire import ResponseFormat

if TYPE_CHECKING:
    from gridserve.gateway.api.responses_api import ResponseStore
    from gridserve.gateway.tenancy import ApiKey, Tenancy

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
    "logprobs": "log probabilities",
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
    responses: "ResponseStore | None" = None
    """Stored responses of the Responses API (gateway/api/responses_api.py; None: none are kept)."""
    tenancy: "Tenancy | None" = None
    """API keys' limits and usage (gateway/tenancy/; None: keys are not limited)."""


def parse(body: bytes, model: type[SamplingFields]) -> Any:
    raw = json_object(body)
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
        logprobs=_logprobs(req),
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


def _logprobs(req: SamplingFields) -> int | None:
    """How many alternatives each token's log-probability comes with (None: no log-probabilities)."""
    if isinstance(req, CompletionRequest):
        return req.logprobs
    if not isinstance(req, ChatCompletionRequest):
        return None
    if req.top_logprobs is not None and not req.logprobs:
        raise bad_request("Invalid request: top_logprobs needs logprobs set to true.", param="top_logprobs")
    return (req.top_logprobs or 0) if req.logprobs else None


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
    if pipeline is None and not any(GENERATE in _tasks(r, job.model) for r in serving):
        raise bad_request(
            f"The model '{job.model}' is served for embeddings only (POST /v1/embeddings), not for generation.",
            param="model",
        )
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
            ctx.scheduler.warm(background=True)  # (warmed at start already, unless the app was built without it)
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


def _tasks(record: NodeRecord, model: str) -> tuple[str, ...]:
    """What the node serves `model` for (a model it can load but has not: generation)."""
    offer = next((o for o in record.capability.models if o.name == model and o.layers is None), None)
    return offer.tasks if offer is not None else (GENERATE,)


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


async def _read_chat(ctx: ApiContext, body: bytes) -> SamplingFields:
    return parse(body, ChatCompletionRequest)  # type: ignore[no-any-return]


async def _read_text(ctx: ApiContext, body: bytes) -> SamplingFields:
    return parse(body, CompletionRequest)  # type: ignore[no-any-return]


def _chunks(ctx: ApiContext, req: SamplingFields, response_id: str, model: str) -> Renderer:
    chat = isinstance(req, ChatCompletionRequest)
    return ChunkFormatter(chat=chat, response_id=response_id, model=model, include_usage=req.include_usage())


CHAT = Surface("chat", "chat", "chatcmpl-", _read_chat, _chunks, openai_error)
TEXT = Surface("text", "text", "cmpl-", _read_text, _chunks, openai_error)


async def complete(ctx: ApiContext, body: bytes, surface: Surface, key: "ApiKey | None" = None) -> Reply:
    """Answer `body` on `surface`; with `key`, within its limits (its admission is `CURRENT` from here on)."""
    req = await surface.read(ctx, body)
    try:
        detached = await surface.detached(ctx, req, surface, key) if surface.detached is not None else None
        return detached if detached is not None else await _admitted(ctx, req, surface, key)
    except APIError as exc:  # raised by the core: named as the client's API names it
        raise surface.renamed(exc) from None


async def _admitted(ctx: ApiContext, req: SamplingFields, surface: Surface, key: "ApiKey | None") -> Reply:
    job, prompt_tokens = to_job(req, surface.kind, surface.id_prefix + secrets.token_hex(12))
    admitted = await admit(ctx, req, job, prompt_tokens, key)
    reply = await run_admitted(ctx, req, job, prompt_tokens, surface)
    reply.headers.extend(admitted)
    return reply


async def admit(
    ctx: ApiContext, req: SamplingFields, job: GenerateRequest, prompt_tokens: int, key: "ApiKey | None"
) -> list[tuple[bytes, bytes]]:
    """Within `key`'s limits and budget (a 429 otherwise): its admission is `CURRENT` from here on. The headers
    that say where the key stands."""
    if key is None or ctx.tenancy is None:
        return []
    await ctx.tenancy.reserve(key)
    reserve = prompt_tokens + job.sampling.max_tokens * req.n
    admission = ctx.tenancy.admit(key, model=job.model, tier=req.gridserve.tier, tokens=reserve)
    CURRENT.set(admission)
    return admission.headers


async def run_admitted(
    ctx: ApiContext, req: SamplingFields, job: GenerateRequest, prompt_tokens: int, surface: Surface
) -> Reply:
    """An admitted request (its admission `CURRENT`) placed, generated and answered, once there is room: it waits
    its turn in the fair queue while the model's nodes are full."""
    admission = CURRENT.get()
    if admission is not None and ctx.tenancy is not None:
        await ctx.tenancy.wait_for_room(admission, job.model)
    return await _complete(ctx, req, job, prompt_tokens, surface)


async def _complete(
    ctx: ApiContext, req: SamplingFields, job: GenerateRequest, prompt_tokens: int, surface: Surface
) -> Reply:
    if ctx.pipelines is not None and ctx.pipelines.placement.needed(job.model):  # `--layers auto` nodes only
        await ctx.pipelines.placement.place(job.model)
    if req.n > 1:
        return await _choices(ctx, req, job, prompt_tokens, surface)
    opened = await _open(ctx, req, job, prompt_tokens, surface.kind)
    return await _reply(ctx, req, opened, surface)


@dataclass
class _Opened:
    """A request placed and under way: its decision, the headers that say where, and its events' source."""

    decision: Decision
    headers: list[tuple[bytes, bytes]]
    source: Source
    job: GenerateRequest
    prompt_tokens: int
    """The prompt's tokens as the gateway counted them."""

    def calls(self, ctx: ApiContext) -> Calls | None:
        fmt = self.job.sampling.response_format
        return Calls(ctx, self.source, fmt) if fmt is not None and fmt.type == "tool_calls" else None


async def _open(ctx: ApiContext, req: SamplingFields, job: GenerateRequest, prompt_tokens: int, kind: str) -> _Opened:
    """Schedule `job` and open its stream on the chosen node (or the chosen pipeline's chain)."""
    scope = ctx.lifecycle.begin(kind)
    cached = ctx.prefixes.lookup(scope, job, prompt_tokens) if ctx.prefixes is not None else ()
    decision = decide(ctx, job, prompt_tokens, req.gridserve, cached)
    ctx.lifecycle.decided(scope, decision)
    if is_pipeline(decision.chosen):
        return await _pipelined(ctx, scope, decision, job, kind, prompt_tokens)
    gen = Generation(ctx.dispatcher, decision, job, hedge=_hedges(req.gridserve.hedge, CURRENT.get()))
    try:
        await gen.open()
    except APIError as exc:
        ctx.lifecycle.not_opened(scope, decision, exc.message)
        raise
    stream = gen.stream
    log.info(
        "dispatched %s (decision %s) to %s",
        job.request_id,
        decision.decision_id,
        stream.node_id,
        extra={"request_id": job.request_id, "decision_id": decision.decision_id, "node_id": stream.node_id},
    )
    headers = [(b"x-gridserve-decision", decision.decision_id.encode()), (b"x-gridserve-node", stream.node_id.encode())]
    admission = CURRENT.get()
    ctx.lifecycle.opened(
        scope,
        decision,
        stream.node_id,
        queue_wait_s=round(admission.queue_wait_s, 6) if admission is not None else 0.0,
        attempts=[a.__dict__ for a in stream.attempts],
        hedged=stream.hedged,
        hedge_delay_s=None if stream.hedge_delay_s is None else round(stream.hedge_delay_s, 6),
        ttft_s=round(stream.first_at - stream.started, 6),
    )
    return _Opened(decision, headers, WholeModel(ctx, scope, gen, kind), job, prompt_tokens)


async def _pipelined(
    ctx: ApiContext, scope: Scope, decision: Decision, job: GenerateRequest, kind: str, prompt_tokens: int
) -> _Opened:
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
    return _Opened(decision, headers, PipelineRun(ctx, scope, run, decision, kind), job, prompt_tokens)


async def _reply(ctx: ApiContext, req: SamplingFields, opened: _Opened, surface: Surface) -> Reply:
    decision, headers, source = opened.decision, opened.headers, opened.source
    if req.gridserve.explain:
        headers.append((b"x-gridserve-explain", decision.explanation.encode("ascii", "replace")))
    fmt = surface.renderer(ctx, req, decision.request_id, decision.model)
    if req.stream:
        if isinstance(fmt, ChunkFormatter) and req.continuous_usage():
            fmt.continuous(opened.prompt_tokens)
        headers += [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
        return Reply(headers=headers, stream=sse(ctx, source, fmt, opened.calls(ctx)))
    whole = await collect(ctx, source, fmt, opened.calls(ctx))
    if req.gridserve.explain:
        whole["gridserve"] = summary(decision, source.served_by())
    headers.append((b"content-type", b"application/json"))
    return Reply(headers=headers, body=orjson.dumps(whole))


def _choice(job: GenerateRequest, i: int) -> GenerateRequest:
    """Choice `i` of `n`: its own request id and, when sampled, the seed plus `i` (choice 0 is the request itself,
    so `n` = 1 and the first of `n` give the same answer)."""
    if i == 0:
        return job
    sampling = job.sampling
    if sampling.seed is not None and not sampling.greedy:
        sampling = sampling.model_copy(update={"seed": (sampling.seed + i) % 2**63})
    return job.model_copy(update={"request_id": f"{job.request_id}-{i}", "sampling": sampling})


async def _choices(
    ctx: ApiContext, req: SamplingFields, job: GenerateRequest, prompt_tokens: int, surface: Surface
) -> Reply:
    """`n` > 1: each choice scheduled and dispatched as its own request, all at once (on one node or several),
    merged into one answer."""
    if surface.renderer is not CHAT.renderer:
        raise bad_request("Invalid request: n > 1 is for the chat and text completions APIs.", param="n")
    if req.stream and req.continuous_usage():
        raise bad_request(
            "Invalid request: stream_options.continuous_usage_stats is not supported with n > 1.",
            param="stream_options",
        )
    opened = await _open_all(ctx, req, [_choice(job, i) for i in range(req.n)], prompt_tokens, surface.kind)
    created = int(time.time())
    fmts = [
        ChunkFormatter(
            chat=surface.kind == "chat", response_id=job.request_id, model=job.model, created=created, index=i
        )
        for i in range(req.n)
    ]
    names = (b"x-gridserve-decision", b"x-gridserve-node", b"x-gridserve-pipeline")
    headers = [(name, b",".join(v for o in opened for k, v in o.headers if k == name)) for name in names]
    headers = [(name, value) for name, value in headers if value]
    if req.gridserve.explain:
        said = " | ".join(o.decision.explanation for o in opened)
        headers.append((b"x-gridserve-explain", said.encode("ascii", "replace")))
    sources, calls = [o.source for o in opened], [o.calls(ctx) for o in opened]
    if req.stream:
        headers += [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
        return Reply(headers=headers, stream=sse_many(ctx, sources, fmts, calls, req.include_usage()))
    whole = await collect_many(ctx, sources, fmts, calls)
    if req.gridserve.explain:
        each = [summary(o.decision, o.source.served_by()) for o in opened]
        whole["gridserve"] = {**each[0], "choices": each}
    headers.append((b"content-type", b"application/json"))
    return Reply(headers=headers, body=orjson.dumps(whole))


async def _open_all(
    ctx: ApiContext, req: SamplingFields, jobs: list[GenerateRequest], prompt_tokens: int, kind: str
) -> list[_Opened]:
    """Place and open every job at once; if one cannot be (or the client leaves meanwhile), the others are not left
    running: those still opening are cancelled, those open are abandoned (their end recorded as cancelled)."""
    tasks = [asyncio.ensure_future(_open(ctx, req, job, prompt_tokens, kind)) for job in jobs]
    try:
        await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        placed = [t.result() for t in tasks if not t.cancelled() and t.exception() is None]
        await asyncio.shield(asyncio.gather(*(abandon(ctx, o.source) for o in placed)))
        raise
    return [t.result() for t in tasks]


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
                "tasks": sorted({t for r in records for t in _tasks(r, name)}),
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
                "tasks": [GENERATE],
                "pipeline": True,
            }
        )
    return {"object": "list", "data": data}


def _hedges(asked: bool | None, admission: Admission | None) -> bool:
    """Whether the request may be hedged: as the client asked, else unless its key is of the batch class."""
    if asked is not None:
        return asked
    return admission is None or admission.key.policy.priority != "batch"


__all__ = ["CHAT", "TEXT", "ApiContext", "Reply", "admit", "complete", "list_models", "run_admitted", "to_job"]
