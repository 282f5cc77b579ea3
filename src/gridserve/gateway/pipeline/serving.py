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
from dataclasses import dataclass, field
from typing import Any

from gridserve.catalog.models import DTYPE_BYTES, MODELS
from gridserve.diagnostics.pipeline_doctor import diagnose_run
from gridserve.engines.text import IncrementalDecoder, StopMatcher
from gridserve.gateway.api.errors import bad_request, no_capacity
from gridserve.gateway.dispatch.dispatcher import Dispatcher
from gridserve.gateway.pipeline.candidate import pipeline_snapshot
from gridserve.gateway.pipeline.placement import Placement
from gridserve.gateway.pipeline.session import (
    LinkPool,
    ModelHead,
    PipelineSession,
    StageFailed,
    generate_tokens,
    load_head,
)
from gridserve.gateway.registry.membership import Membership, NodeRecord
from gridserve.planner.chain import NoChain, StageRoute, plan_chain
from gridserve.planner.costs import LayerCosts, PlanNode, Workload, stage_time
from gridserve.reliability import EventKind, NodeEvent
from gridserve.scheduler import NodeSnapshot
from gridserve.types import GenerateRequest, ModelOffer, NodeId, StreamEvent

log = logging.getLogger("gridserve.gateway")


@dataclass
class RunResult:
    """How a pipeline generation went, filled in as it runs (read by the request lifecycle when it ends)."""

    started: float
    prompt_tokens: int = 0
    completion_tokens: int = 0
    first_at: float | None = None
    last_at: float | None = None
    status: str = "streaming"
    error: str = ""
    failed: list[tuple[str, int, str]] = field(default_factory=list)
    """(stage node, step, why) of every stage that failed during the run, re-planned around or not."""


@dataclass
class Run:
    """What the API reply needs of a started pipeline generation."""

    session: PipelineSession
    result: RunResult
    events: AsyncIterator[StreamEvent] = field(init=False)
    on_stage_failed: Callable[[str, str], None] | None = None
    """Told each stage node that fails mid-run and why (the request lifecycle's failover hook)."""


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
        for record in self.membership.nodes.values():
            if not self.membership.can_serve(record.capability.node_id):
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
        spec, hw = MODELS.get(offer.name), record.static.hw
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

    async def start(self, job: GenerateRequest) -> Run:
        """Plan the chain and open the session on every stage; APIError if that cannot be done. The run's
        `result` says how it went once its events end."""
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
            self.pool = LinkPool(self.dispatcher.identity, self.dispatcher.transport)
        routes = self.routes(job.model)
        try:
            chain = plan_chain(routes, routes[0].n_layers if routes else 0)
            session = PipelineSession(self.pool, chain, lambda: self.routes(job.model))
            await session.open()
        except (NoChain, StageFailed) as exc:
            if isinstance(exc, StageFailed):
                self._stage_failed(exc.node_id, f"pipeline stage failed while opening: {exc}")
            raise no_capacity(f"no pipeline for {job.model}: {exc}") from exc
        self.running[job.model] = self.running.get(job.model, 0) + 1
        run = Run(session, RunResult(started=time.monotonic(), prompt_tokens=len(prompt)))
        run.events = self._events(run, head, prompt, job)
        return run

    async def aclose(self) -> None:
        """Close the links to stage nodes (at shutdown, before the transport they were opened through is closed)."""
        if self.pool is not None:
            await self.pool.aclose()

    def _stage_failed(self, node_id: str, detail: str) -> None:
        """A stage node failed its part: a failed job in its ledger, as for any node that fails a request."""
        self.membership.note(NodeEvent(node_id=node_id, kind=EventKind.JOB_FAILED, at=time.time(), detail=detail))

    def _replanned(self, run: Run, seen: int) -> int:
        """Record the stages re-planned around since the last look; returns how many re-plans are seen now."""
        for replan in run.session.replans[seen:]:
            why = f"pipeline stage failed at step {replan.at_step}; re-planned onto {', '.join(replan.replaced_by)}"
            run.result.failed.append((replan.failed, replan.at_step, why))
            self._stage_failed(replan.failed, why)
            if run.on_stage_failed is not None:
                run.on_stage_failed(replan.failed, why)
        return len(run.session.replans)

    async def _events(
        self, run: Run, head: ModelHead, prompt: list[int], job: GenerateRequest
    ) -> AsyncIterator[StreamEvent]:
        session, result = run.session, run.result
        decoder = IncrementalDecoder(head.codec.decode)
        stops = StopMatcher(job.sampling.stop)
        count, reason, seen = 0, "length", 0
        result.status = "ok"
        try:
            tokens = generate_tokens(
                session,
                prompt,
                job.sampling,
                eos_ids=head.codec.eos_ids,
                logit_mask=head.logit_mask,
                codec=head.codec,
            )
            async for token, _ in tokens:
                result.first_at = result.first_at or time.monotonic()
                result.last_at = time.monotonic()
                count += 1
                result.completion_tokens = count
                seen = self._replanned(run, seen)
                if token in head.codec.eos_ids and not job.sampling.ignore_eos:
                    reason = "stop"
                    break
                text = decoder.push(token)
                text = stops.feed(text) if count >= job.sampling.min_tokens else text  # as the engines do
                yield {"text": text, "token_ids": [token]}
                if stops.stopped:
                    reason = "stop"
                    break
            tail = "" if stops.stopped else stops.feed(decoder.finish()) + stops.flush()
            final: StreamEvent = {
                "text": tail,
                "finish_reason": reason,
                "prompt_tokens": len(prompt),
                "completion_tokens": count,
            }
            if stops.matched is not None:
                final["stop_sequence"] = stops.matched
            yield final
        except (StageFailed, NoChain) as exc:
            result.status, result.error = "failed", str(exc)
            self._replanned(run, seen)
            if isinstance(exc, StageFailed):
                why = f"pipeline stage failed at step {session.steps}, no re-plan: {exc}"
                result.failed.append((exc.node_id, session.steps, why))
                self._stage_failed(exc.node_id, why)
            yield {"error": {"message": f"pipeline failed: {exc}"}}
        except (asyncio.CancelledError, GeneratorExit):
            result.status, result.error = "cancelled", "client disconnected"
            raise
        finally:
            self.running[job.model] = max(0, self.running.get(job.model, 0) - 1)
            await session.close()
            self._remember(session, job, result)

    def _remember(self, session: PipelineSession, job: GenerateRequest, result: RunResult) -> None:
        started, first_at, count = result.started, result.first_at, result.completion_tokens
        status, error = result.status, result.error
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
