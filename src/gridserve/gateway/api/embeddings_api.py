"""`POST /v1/embeddings` in OpenAI's format, over the nodes that offer the model for embedding.

Embedding is a capability of its own (ModelOffer.tasks): the scheduler places the request only on nodes that offer
the model for `embed` (scheduler/filters.py, model-served), with the same filters, scorers and picker as any request
(the longest input as the prompt, no output tokens). The chosen node's answer is checked before the client sees it
and a sample is re-computed by the gateway's verifier (gateway/integrity/embeddings.py); a node that fails, or
answers wrongly, hands the request to the next-ranked one (gateway/dispatch/embeddings.py). The request goes through
the lifecycle as completions do (decision log, metrics), and its node's ledger gets the completed job.

Accepted: `model`, `input` (a string or a list of at most MAX_EMBED_INPUTS non-empty strings; token-id arrays are
refused), `encoding_format` (`float` or `base64`: little-endian float32, as OpenAI's), `dimensions` (only the
model's own width: no model served here is trained to be cut shorter), `user` (ignored)."""

import secrets
import time
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gridserve.catalog.tiers import DEFAULT_TIER
from gridserve.gateway.api.errors import APIError, bad_request, json_object, model_not_found, no_capacity
from gridserve.gateway.api.openai_api import ApiContext
from gridserve.gateway.dispatch.embeddings import Embedded, EmbeddingDispatch
from gridserve.gateway.integrity.embeddings import EmbeddingAudit, Integrity, expected_dimensions, most_tokens
from gridserve.gateway.lifecycle import Finished, Scope
from gridserve.gateway.lifecycle.record import NodeWork, Timing
from gridserve.gateway.registry.membership import NodeRecord
from gridserve.gateway.tenancy import ApiKey
from gridserve.gateway.tenancy.limits import CURRENT
from gridserve.prefix.blocks import CHARS_PER_TOKEN
from gridserve.reliability import EventKind, NodeEvent
from gridserve.types import ModelOffer
from gridserve.types.embedding import MAX_EMBED_INPUTS, EmbedRequest, Floats, encode_vector
from gridserve.types.node import EMBED, MAX_NAME
from gridserve.types.scheduling import Decision, ScheduleRequest

ENDPOINT = "embeddings"
"""The lifecycle's name for these requests (metrics' `endpoint` label, the decision log)."""
MAX_USER_CHARS = 256

Text = Annotated[str, Field(min_length=1)]


class EmbeddingRequest(BaseModel):
    """OpenAI's embeddings request, as far as the gateway serves it."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str = Field(min_length=1, max_length=MAX_NAME)
    input: Text | Annotated[list[Text], Field(min_length=1, max_length=MAX_EMBED_INPUTS)] = Field(
        description=f"the text to embed, or a list of at most {MAX_EMBED_INPUTS} texts (token-id arrays are refused)"
    )
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1, description="only the model's own width")
    user: str | None = Field(None, max_length=MAX_USER_CHARS)

    def inputs(self) -> tuple[str, ...]:
        return (self.input,) if isinstance(self.input, str) else tuple(self.input)


def parse(body: bytes) -> EmbeddingRequest:
    """The request, or a 400 naming the parameter at fault."""
    raw = json_object(body)
    if "input" in raw:
        _check_input(raw["input"])
    try:
        return EmbeddingRequest.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        raise bad_request(f"Invalid request: {param}: {first['msg']}", param=param) from exc


def _check_input(value: object) -> None:
    """`input` as the gateway takes it, or a 400 saying what is wrong with it where (the schema's union would
    answer with one error per branch)."""
    if isinstance(value, str):
        if not value:
            raise bad_request("Invalid request: input: the text is empty.", param="input")
        return
    if not isinstance(value, list):
        raise bad_request("Invalid request: input: must be a string or a list of strings.", param="input")
    if any(isinstance(v, int | list) and not isinstance(v, bool) for v in value):
        raise bad_request(
            "Invalid request: input as token ids is not accepted (nodes of different models tokenise differently): "
            "send the text.",
            param="input",
        )
    if not 1 <= len(value) <= MAX_EMBED_INPUTS:
        raise bad_request(
            f"Invalid request: input holds {len(value)} texts; from 1 to {MAX_EMBED_INPUTS} per request.",
            param="input",
        )
    for i, text in enumerate(value):
        if not isinstance(text, str) or not text:
            what = "is empty" if isinstance(text, str) else "is not a string"
            raise bad_request(f"Invalid request: input.{i}: the text {what}.", param=f"input.{i}")


def _check_dimensions(req: EmbeddingRequest) -> None:
    if req.dimensions is None:
        return
    width = expected_dimensions(req.model)
    if width != req.dimensions:
        own = f" its own {width}" if width is not None else " none but its own"
        raise bad_request(
            f"Invalid request: {req.model} does not give vectors of {req.dimensions} dimensions (it gives{own}; "
            "no model served here is trained to be cut shorter).",
            param="dimensions",
        )


def _embed_offer(record: NodeRecord, model: str) -> ModelOffer | None:
    return next((o for o in record.capability.models if o.name == model and o.layers is None and o.serves(EMBED)), None)


def decide(ctx: ApiContext, job: EmbedRequest) -> Decision:
    """Schedule the request over the live nodes (only offers of the model for embedding pass the filters): 404 for
    a model no live node serves, 400 for one served for generation only, or inputs too long for its context."""
    serving = ctx.membership.live_models().get(job.model, [])
    if not serving:
        raise model_not_found(job.model)
    embedders = [r for r in serving if _embed_offer(r, job.model) is not None]
    if not embedders:
        raise bad_request(
            f"The model '{job.model}' is not served for embeddings: the live nodes serving it offer it for chat and "
            "text completions only.",
            param="model",
        )
    longest = max(len(text) for text in job.inputs) // CHARS_PER_TOKEN + 1
    request = ScheduleRequest(
        request_id=job.request_id,
        model=job.model,
        prompt_tokens=longest,
        max_tokens=0,
        tier=DEFAULT_TIER,
        task=EMBED,
    )
    decision = ctx.scheduler.schedule(request, ctx.membership.snapshots(), ctx.rng, time.time())
    ctx.metrics.decisions.labels(outcome="placed" if decision.chosen else "none").inc()
    for name, count in decision.rejected_by_filter.items():
        ctx.metrics.filter_rejections.labels(filter=name).inc(count)
    if decision.chosen is None:
        live = {r.capability.node_id for r in embedders}
        reasons = [r for r in decision.rejections if r.node_id in live]
        if reasons and all(r.filter == "context-fit" for r in reasons):
            raise bad_request(f"An input is longer than the context of {job.model}: {reasons[0].reason}", param="input")
        raise no_capacity(decision.explanation)
    return decision


@dataclass
class EmbeddingService:
    """The route's state, one owner each: dispatch (with the integrity incidents) and the sampled audits."""

    ctx: ApiContext
    dispatch: EmbeddingDispatch
    audit: EmbeddingAudit

    @classmethod
    def of(cls, ctx: ApiContext) -> "EmbeddingService":
        return cls(ctx, EmbeddingDispatch(ctx.dispatcher, Integrity(ctx.membership)), EmbeddingAudit(ctx.auditor))


@dataclass(frozen=True)
class Answer:
    """What the route sends: the JSON body and the headers naming the decision and the node."""

    body: bytes
    headers: dict[str, str]


async def embed(service: EmbeddingService, body: bytes, key: ApiKey | None = None) -> Answer:
    """Answer an embeddings request; with `key`, within its limits (requests, tokens, concurrency, budget)."""
    req = parse(body)
    _check_dimensions(req)
    ctx = service.ctx
    job = EmbedRequest(request_id="emb-" + secrets.token_hex(12), model=req.model, inputs=req.inputs())
    if key is None or ctx.tenancy is None:
        return await _embed(service, req, job)
    tokens = sum(len(text) for text in job.inputs) // CHARS_PER_TOKEN + 1
    await ctx.tenancy.reserve(key)
    admission = ctx.tenancy.admit(key, model=job.model, tier=None, tokens=tokens)
    admitted = CURRENT.set(admission)  # the lifecycle charges the tokens used to it
    try:
        answer = await _embed(service, req, job)
    finally:
        admission.close()
        CURRENT.reset(admitted)
    answer.headers.update((k.decode(), v.decode()) for k, v in admission.headers)
    return answer


async def _embed(service: EmbeddingService, req: EmbeddingRequest, job: EmbedRequest) -> Answer:
    ctx = service.ctx
    scope = ctx.lifecycle.begin(ENDPOINT)
    decision = decide(ctx, job)
    ctx.on_request(job.model)
    ctx.lifecycle.decided(scope, decision)
    try:
        done = await service.dispatch.run(decision, job, lambda node, why: ctx.lifecycle.failover(scope, node, why))
    except APIError as exc:
        ctx.lifecycle.not_opened(scope, decision, exc.message)
        raise
    ctx.lifecycle.opened(scope, decision, done.node_id, attempts=[a.__dict__ for a in done.attempts])
    paid = min(done.prompt_tokens, most_tokens(job.inputs))
    await _finished(ctx, scope, decision, done, paid)
    record = ctx.membership.nodes.get(done.node_id)
    service.audit.maybe_audit(done.node_id, _embed_offer(record, job.model) if record else None, job, done.vectors)
    headers = {"x-gridserve-decision": decision.decision_id, "x-gridserve-node": done.node_id}
    return Answer(orjson.dumps(response(req, done.vectors, paid), option=orjson.OPT_SERIALIZE_NUMPY), headers)


async def _finished(ctx: ApiContext, scope: Scope, decision: Decision, done: Embedded, paid: int) -> None:
    """The lifecycle's end of the request (decision log, metrics, settlement: `paid`, the input tokens the node
    embedded on its signed count up to what the inputs can hold, at the price per token decided for it, charged to
    the key) and the node's completed job in the ledger (an embedding has no first token: the lifecycle's
    timing-based records, calibration and traces, leave it out)."""
    took = done.answered - done.started
    candidate = decision.candidate(done.node_id)
    price = candidate.price_per_mtok if candidate is not None else None  # per input token: what the node embedded
    end = Finished(
        decision=decision,
        endpoint=ENDPOINT,
        status="ok",
        error="",
        served_by=done.node_id,
        work=(
            NodeWork(
                node_id=done.node_id,
                outcome="ok",
                tokens=paid,
                price_per_mtok=price,
                embedded=True,
                claimed=done.prompt_tokens if done.prompt_tokens != paid else None,
            ),
        ),
        prompt_tokens=paid,
        completion_tokens=0,
        duration_s=time.monotonic() - scope.arrived,
        timing=Timing(ttft_s=None, itl_s=None),
        failovers=sum(1 for a in done.attempts if a.outcome == "failed"),
    )
    settled = ctx.lifecycle.finished(scope, end)
    await ctx.lifecycle.commit(end, settled)
    inputs = int(done.vectors.shape[0])
    within = took <= float(decision.requirements["ttft_slo_s"]) * inputs
    ctx.membership.note(
        NodeEvent(
            node_id=done.node_id,
            kind=EventKind.JOB_COMPLETED,
            at=time.time(),
            within_slo=within,
            detail=f"embeddings: {inputs} input(s) in {took:.3f} s",
        )
    )


def response(req: EmbeddingRequest, vectors: Floats, prompt_tokens: int) -> dict[str, Any]:
    """OpenAI's embeddings answer: one entry per input, in order; `base64`: each vector's little-endian float32."""
    data: list[dict[str, Any]] = []
    for index, vector in enumerate(vectors):
        value: Any = encode_vector(vector) if req.encoding_format == "base64" else vector
        data.append({"object": "embedding", "index": index, "embedding": value})
    return {
        "object": "list",
        "data": data,
        "model": req.model,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }


__all__ = ["EmbeddingRequest", "EmbeddingService", "decide", "embed", "parse", "response"]
