"""Serving a model over a pipeline of stage nodes through the OpenAI API.

A request for a model that no live node holds whole, but that a chain of live stage nodes covers, is run
over that chain (gateway/pipeline/session.py): the gateway tokenises, drives each step, picks tokens and streams
the text like any other answer. Each run's chain, per-stage timings and re-plans are kept for
`GET /admin/pipelines` and the doctor.
"""

import asyncio
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import orjson

from gridserve.catalog.hardware import HARDWARE
from gridserve.catalog.models import DTYPE_BYTES, MODELS
from gridserve.diagnostics.pipeline_doctor import diagnose_run
from gridserve.engines.text import IncrementalDecoder, StopMatcher
from gridserve.gateway.dispatch.dispatcher import Dispatcher
from gridserve.gateway.api.errors import APIError, bad_request
from gridserve.gateway.registry.membership import LIVE, Membership, NodeRecord
from gridserve.gateway.pipeline.session import LinkPool, ModelHead, PipelineSession, StageFailed, generate_tokens, load_head
from gridserve.gateway.pipeline.candidate import pipeline_snapshot
from gridserve.gateway.pipeline.placement import Placement
from gridserve.gateway.api.sse import DONE, ChunkFormatter
from gridserve.planner.chain import NoChain, StageRoute, plan_chain
from gridserve.planner.costs import LayerCosts, PlanNode, Workload, stage_time
from gridserve.reliability.state import ReliabilityState
from gridserve.scheduler import NodeSnapshot
from gridserve.types import GenerateRequest, ModelOffer, NodeId

log = logging.getLogger("gridserve.gateway")
BLOCKED = frozenset({ReliabilityState.EJECTED, ReliabilityState.QUARANTINED, ReliabilityState.BANNED})
"""A stage node in one of these states is left out of every chain."""


@dataclass
class Run:
    """What the API reply needs of a started pipeline generation."""

    session: PipelineSession
    events: AsyncIterator[dict[str, Any]]


class Pipelines:
    def __init__(self, membership: Membership, dispatcher: Dispatcher, keep: int = 100) -> None:
        self.membership, self.dispatcher = membership, dispatcher
        self.heads: dict[str, ModelHead] = {}
        self.pool: LinkPool | None = None
        self.recent: deque[dict[str, Any]] = deque(maxlen=keep)
        self.layer_costs: dict[tuple[str, str, str], LayerCosts] = {}
        self.layer_s: dict[str, float] = {}
        """Node -> measured stage compute, seconds per layer per step (moving average)."""
        self.running: dict[str, int] = {}
        """Model -> pipeline runs in flight (the virtual node's load)."""
        self.placement = Placement(membership, dispatcher, lambda model: self.candidate(model, time.time()) is not None)

    def routes(self, model: str) -> list[StageRoute]:
        """Live stage nodes of `model`, each costed as the seconds it adds to a decode step."""
        spec = MODELS.get(model)
        found = []
        now = time.time()
        for record in self.membership.nodes.values():
            if record.state not in LIVE or self.membership.book.state(record.capability.node_id, now) in BLOCKED:
                continue
            for offer in record.capability.models:
                if offer.name != model or offer.layers is None:
                    continue
                cap = record.capability
                n_layers = spec.layers if spec else offer.layers.end
                start, end = offer.layers.start, offer.layers.end
                found.append(
                    StageRoute(
                        cap.node_id, cap.endpoint, cap.public_key, start, end, n_layers, self._cost(record, offer)
                    )
                )
        return found

    def _cost(self, record: NodeRecord, offer: ModelOffer) -> float:
        """Round trip from the gateway plus the stage's compute per step: measured on this node (seconds per
        layer per step, moving average of its pipeline runs) when known, else the planner's roofline for its
        card (planner/costs.py)."""
        assert offer.layers is not None
        layers = offer.layers.end - offer.layers.start
        rtt = (record.rtt_ms or 1.0) / 1e3
        measured = self.layer_s.get(record.capability.node_id)
        if measured is not None:
            return rtt + measured * layers
        spec, hw = MODELS.get(offer.name), HARDWARE.get(record.capability.hardware.accelerator)
        if spec is None or hw is None:
            return rtt + 0.01 * layers
        dtype = offer.dtype if offer.dtype in DTYPE_BYTES else "float16"
        key = (offer.name, dtype, offer.quantization)
        costs = self.layer_costs.get(key) or self.layer_costs.setdefault(key, LayerCosts.of(spec, *key[1:]))
        node = PlanNode.of(record.capability.node_id, hw)
        return rtt + stage_time(costs, node, offer.layers.start, offer.layers.end, Workload(context_tokens=512))

    def learn(self, session: PipelineSession) -> None:
        """Each stage's measured compute per layer per step, into its moving average."""
        for t in session.timings.values():
            if t.steps:
                sample = t.compute_s / t.steps / max(1, t.end - t.start)
                old = self.layer_s.get(t.node_id)
                self.layer_s[t.node_id] = sample if old is None else 0.8 * old + 0.2 * sample

    def candidate(self, model: str, now: float) -> NodeSnapshot | None:
        """The best chain for `model` as one virtual node for the scheduler (None: no chain covers it)."""
        spec = MODELS.get(model)
        routes = self.routes(model)
        if spec is None or not routes:
            return None
        try:
            chain = plan_chain(routes, routes[0].n_layers)
        except NoChain:
            return None
        records = [self.membership.nodes[NodeId(r.node_id)] for r in chain]
        return pipeline_snapshot(spec, chain, records, self.membership.book, now, self.running.get(model, 0))

    def serves(self, model: str) -> bool:
        """A chain of live stage nodes covers the model (and no live node holds it whole)."""
        routes = self.routes(model)  # (first: on a grid without stage nodes this is all a request pays)
        if not routes or model in self.membership.live_models():
            return False
        try:
            plan_chain(routes, routes[0].n_layers)
        except NoChain:
            return False
        return True

    def models(self) -> list[str]:
        """Models served over pipelines only: covered by a chain, or placeable on `--layers auto` nodes."""
        records = self.membership.nodes.values()
        names = {o.name for r in records for o in r.capability.models if o.layers is not None}
        names |= {m for r in records for m in r.capability.stage_models}
        return sorted(n for n in names if self.serves(n) or self.placement.needed(n))

    async def head(self, model: str) -> ModelHead:
        if model not in self.heads:
            self.heads[model] = await asyncio.to_thread(load_head, model)
        return self.heads[model]

    async def start(self, job: GenerateRequest, on_end: Callable[[str, str], None] | None = None) -> Run:
        """Plan the chain and open the session on every stage; APIError if that cannot be done. `on_end(status,
        error)` is called when the run ends ("ok", "failed" or "cancelled")."""
        head = await self.head(job.model)
        prompt = (
            head.codec.encode_chat(job.messages)
            if job.messages is not None
            else head.codec.encode_prompt(job.prompt or "")
        )
        spec = MODELS.get(job.model)
        if spec is not None and len(prompt) + job.sampling.max_tokens > spec.max_context:
            raise bad_request(
                f"prompt ({len(prompt)} tokens) + max_tokens exceed the context of {job.model} "
                f"({spec.max_context} tokens)",
                param="max_tokens",
            )
        if self.pool is None:
            assert self.dispatcher.session is not None
            self.pool = LinkPool(self.dispatcher.identity, self.dispatcher.session)
        routes = self.routes(job.model)
        try:
            chain = plan_chain(routes, routes[0].n_layers if routes else 0)
            session = PipelineSession(self.pool, chain, lambda: self.routes(job.model))
            await session.open()
        except (NoChain, StageFailed) as exc:
            raise APIError(503, f"no pipeline for {job.model}: {exc}", type_="api_error", code="no_capacity") from exc
        self.running[job.model] = self.running.get(job.model, 0) + 1
        return Run(session, self._events(session, head, prompt, job, on_end))

    async def _events(
        self,
        session: PipelineSession,
        head: ModelHead,
        prompt: list[int],
        job: GenerateRequest,
        on_end: Callable[[str, str], None] | None,
    ) -> AsyncIterator[dict[str, Any]]:
        decoder = IncrementalDecoder(head.codec.decode)
        stops = StopMatcher(job.sampling.stop)
        started = time.monotonic()
        first_at: float | None = None
        count, reason, status, error = 0, "length", "ok", ""
        try:
            tokens = generate_tokens(
                session, prompt, job.sampling, eos_ids=head.codec.eos_ids, logit_mask=head.logit_mask
            )
            async for token, _ in tokens:
                first_at = first_at or time.monotonic()
                count += 1
                if token in head.codec.eos_ids:
                    reason = "stop"
                    break
                text = stops.feed(decoder.push(token))
                yield {"text": text, "token_ids": [token]}
                if stops.stopped:
                    reason = "stop"
                    break
            tail = "" if stops.stopped else stops.feed(decoder.finish()) + stops.flush()
            yield {"text": tail, "finish_reason": reason, "prompt_tokens": len(prompt), "completion_tokens": count}
        except (StageFailed, NoChain) as exc:
            status, error = "failed", str(exc)
            yield {"error": {"message": f"pipeline failed: {exc}"}}
        except (asyncio.CancelledError, GeneratorExit):
            status, error = "cancelled", "client disconnected"
            raise
        finally:
            self.running[job.model] = max(0, self.running.get(job.model, 0) - 1)
            await session.close()
            self._remember(session, job, started, first_at, count, status, error)
            if on_end is not None:
                on_end(status, error)

    def _remember(
        self,
        session: PipelineSession,
        job: GenerateRequest,
        started: float,
        first_at: float | None,
        count: int,
        status: str,
        error: str,
    ) -> None:
        end = time.monotonic()
        entry: dict[str, Any] = {
            "session": session.session,
            "request_id": job.request_id,
            "model": job.model,
            "status": status,
            "error": error or None,
            "chain": [{"node_id": r.node_id, "layers": [r.start, r.end]} for r in session.chain],
            "stages": [t.as_dict() for t in session.timings.values()],
            "replans": [r.__dict__ for r in session.replans],
            "completion_tokens": count,
            "steps": session.steps,
            "forward_s": round(session.forward_s, 6),
            "ttft_s": round(first_at - started, 6) if first_at else None,
            "tokens_per_s": round((count - 1) / (end - first_at), 3)
            if first_at and count > 1 and end > first_at
            else None,
            "finished_at": time.time(),
        }
        entry["diagnosis"] = diagnose_run(entry).as_dict()
        self.learn(session)
        self.recent.append(entry)
        log.info(
            "pipeline %s for %s: %s, %d tokens over %d stages, %d re-plans",
            session.session,
            job.request_id,
            status,
            count,
            len(session.chain),
            len(session.replans),
        )


async def pipeline_sse(run: Run, fmt: ChunkFormatter, include_usage: bool) -> AsyncIterator[bytes]:
    yield fmt.role()
    async for event in run.events:
        if "error" in event:
            yield fmt.error(str(event["error"]["message"]), "node_failed")
            return
        if event.get("text"):
            yield fmt.text(event["text"])
        if event.get("finish_reason"):
            yield fmt.finish(event["finish_reason"])
            if include_usage:
                yield fmt.usage(int(event["prompt_tokens"]), int(event["completion_tokens"]))
    yield DONE


async def pipeline_whole(run: Run, fmt: ChunkFormatter) -> bytes:
    parts: list[str] = []
    final: dict[str, Any] = {}
    async for event in run.events:
        if "error" in event:
            raise APIError(502, str(event["error"]["message"]), type_="api_error", code="node_failed")
        parts.append(event.get("text", ""))
        final = event
    whole = fmt.whole(
        "".join(parts),
        str(final.get("finish_reason") or "stop"),
        int(final.get("prompt_tokens", 0)),
        int(final.get("completion_tokens", 0)),
    )
    return orjson.dumps(whole)
