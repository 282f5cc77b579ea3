"""Dispatch: open a generation on the best node that answers, hedged, with retries before the first token.

- An attempt that fails before its first token moves to the next-ranked node (invisible to the client).
- **Hedging**: if the first token has not come by the hedge delay (the node's predicted p95 TTFT), the
  runner-up gets the same request; the first to stream wins and the other is cancelled (its connection is
  closed, which cancels the work on the node).
- Retries and hedges draw on a retry budget (gRPC retry throttling), so a failing grid does not drown in
  them. A failover of a stream already under way is not throttled (the client holds half an answer); it is
  bounded per request by `max_failovers` instead (gateway/dispatch/generation.py).
- An attempt waits at most the first-token timeout, and is abandoned as soon as its node is marked down.

The timings are the dispatch policy's (gridserve/policy/dispatch.py, which the simulator runs too). Nodes are
reached only through a NodeTransport (gateway/transport/), and only its error tree is caught here.
"""

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any

from gridserve.gateway.api.errors import APIError, bad_request, no_capacity, upstream_failed
from gridserve.gateway.config import GatewayConfig
from gridserve.gateway.dispatch.retry_budget import RetryBudget
from gridserve.gateway.ops.metrics import GatewayMetrics
from gridserve.gateway.registry.membership import Membership
from gridserve.gateway.transport import (
    AiohttpTransport,
    EventStream,
    Malformed,
    NodeTransport,
    Refused,
    TransportError,
)
from gridserve.reliability import EventKind
from gridserve.reliability import NodeEvent as LedgerEvent
from gridserve.trust import Identity
from gridserve.types import GenerateRequest, NodeId, StreamEvent
from gridserve.types.scheduling import Candidate, Decision

log = logging.getLogger("gridserve.gateway")


@dataclass
class Attempt:
    node_id: str
    outcome: str
    detail: str = ""


@dataclass
class NodeStream:
    """An open generation on one node; `first` is its first event, already received, `source` the rest."""

    node_id: NodeId
    first: StreamEvent
    source: EventStream
    started: float
    first_at: float
    attempts: list[Attempt] = field(default_factory=list)
    hedged: bool = False
    hedge_delay_s: float | None = None

    async def events(self) -> AsyncGenerator[StreamEvent]:
        """Every event from the first (no stall guard: Generation adds one). Raises the transport's errors."""
        yield self.first
        while (event := await self.source.next()) is not None:
            yield event

    def close(self) -> None:
        self.source.close()


REFUSAL_NOTE_CHARS = 200
"""How much of a node's refusal text is kept, for the attempt's record (operators), never for the client."""


class NodeFailed(Exception):
    pass


class NotResumable(NodeFailed):
    """The node cannot continue another node's generation (its engine does not take token ids)."""


class Refusal(NodeFailed):
    """The node answered that the request itself is invalid (a 400). Only the other nodes can tell whether it was
    right: the request goes on to the next one, a node that refused what another served is charged a failed job,
    and the client never sees the node's text (a node could put anything there)."""


class Dispatcher:
    def __init__(
        self,
        config: GatewayConfig,
        membership: Membership,
        identity: Identity,
        metrics: GatewayMetrics,
        transport: NodeTransport | None = None,
    ) -> None:
        self.config = config
        self.policy = config.dispatch
        self.membership = membership
        self.identity = identity
        self.metrics = metrics
        self.transport: NodeTransport = transport or AiohttpTransport(
            identity, connect_timeout_s=config.connect_timeout_s
        )
        self.budget = RetryBudget(
            max_tokens=self.policy.retry_budget_tokens,
            token_ratio=self.policy.retry_token_ratio,
            tokens=self.policy.retry_budget_tokens,
        )

    async def start(self) -> None:
        await self.transport.start()

    async def aclose(self) -> None:
        await self.transport.aclose()

    # -- timeouts derived from predictions (the policy's rules, with what this gateway observed) ----------
    def hedge_delay(self, candidate: Candidate) -> float:
        """The node's predicted p95 TTFT (DispatchPolicy.hedge_delay), from the p95 of the observed/predicted
        TTFT ratios the membership holds for it."""
        record = self.membership.nodes.get(candidate.node_id)
        p95 = record.ttft_ratio_p95() if record is not None else None
        return self.policy.hedge_delay(candidate.predicted_ttft_s, candidate.calibration[0], p95)

    def first_token_timeout(self, candidate: Candidate) -> float:
        return self.policy.first_token_timeout(candidate.predicted_ttft_s, cold=candidate.cold)

    def stall_timeout(self, candidate: Candidate | None, *, resumable: bool = True, takeover: bool = True) -> float:
        """The policy's stall timeout for the node's predicted ITL (None: unpredicted); on an interleaved node, for
        its longest step between two tokens if that is longer (another prompt's prefill chunk)."""
        itl = candidate.predicted_itl_s if candidate is not None else None
        if itl is not None and candidate is not None and candidate.step_s is not None:
            itl = max(itl, candidate.step_s)
        return self.policy.stall_timeout(itl, resumable=resumable, takeover=takeover)

    # -- opening a generation -------------------------------------------------------------------------
    async def open(
        self,
        decision: Decision,
        job: GenerateRequest,
        *,
        exclude: frozenset[str] = frozenset(),
        hedge: bool = True,
        throttled: bool = True,
    ) -> NodeStream:
        """Open the stream on the best node that answers; raises APIError when none does."""
        able = (c for c in decision.ranked_for_dispatch() if c.node_id not in exclude and self.live(c.node_id))
        candidates = list(itertools.islice(able, self.policy.dispatch_attempts))
        if not candidates:
            if not decision.eligible_count:
                raise no_capacity(decision.explanation)
            raise upstream_failed("no other node can take this request")
        race = _Race(self, job, candidates, hedge=hedge and self.policy.hedging, throttled=throttled)
        return await race.run()

    async def ask_to_load(self, node_id: str, payload: dict[str, Any], timeout_s: float = 5.0) -> bool | None:
        """Ask the node (gateway-signed) to load a model to pre-warm, or a layer range to run: True if the node
        took it, False if it refused, None if it could not be reached."""
        record = self.membership.nodes.get(NodeId(node_id))
        if record is None:
            return None
        try:
            await self.transport.load(NodeId(node_id), record.capability.endpoint, payload, timeout_s)
        except Refused:
            return False
        except TransportError as exc:
            log.warning("load request %s to %s failed: %s", payload, node_id, exc.why)
            return None
        return True

    def can_take_over(self, decision: Decision, exclude: frozenset[str]) -> bool:
        """Whether a live node outside `exclude` is left among the decision's candidates (a failover target)."""
        return any(c.node_id not in exclude and self.live(c.node_id) for c in decision.ranked_for_dispatch())

    def live(self, node_id: str) -> bool:
        """Whether the node may be given work now: live and not ejected, quarantined or banned (one predicate,
        registry/record.py can_serve)."""
        return self.membership.can_serve(node_id)

    async def attempt(self, node_id: NodeId, job: GenerateRequest) -> NodeStream:
        """Open the generation on one node and wait for its first event; the node counts the attempt as
        outstanding until `finished` (or until this raises)."""
        record = self.membership.nodes.get(node_id)
        if record is None:
            raise NodeFailed("node left the grid")
        started = time.monotonic()
        self.membership.request_started(node_id)
        try:
            source = await self._open(node_id, record.capability.endpoint, job)
            try:
                first = await _first_event(source)
            except BaseException:
                source.close()
                raise
        except BaseException:
            self.membership.request_ended(node_id)
            raise
        return NodeStream(node_id=node_id, first=first, source=source, started=started, first_at=time.monotonic())

    async def _open(self, node_id: NodeId, endpoint: str, job: GenerateRequest) -> EventStream:
        try:
            return await self.transport.generate(node_id, endpoint, job)
        except Refused as exc:
            if exc.status == 400:  # the node refused the request itself, not for want of health
                message = exc.message or "rejected by node"
                if job.resume:
                    raise NotResumable(message) from exc
                raise Refusal(message[:REFUSAL_NOTE_CHARS]) from exc
            raise NodeFailed(f"answered {exc.status}: {exc.body}") from exc
        except TransportError as exc:
            self.membership.mark_failed(node_id, f"dispatch failed: {exc.why}")
            raise NodeFailed(f"unreachable ({exc.why})") from exc

    def finished(self, node_id: NodeId) -> None:
        self.membership.request_ended(node_id)

    def node_failed(self, node_id: NodeId, detail: str, kind: EventKind = EventKind.JOB_FAILED) -> None:
        self.membership.note(LedgerEvent(node_id=node_id, kind=kind, at=time.time(), detail=detail))


async def _first_event(source: EventStream) -> StreamEvent:
    try:
        first = await source.next()
    except Malformed as exc:
        raise NodeFailed(f"malformed first event ({exc.why})") from exc
    except TransportError as exc:
        raise NodeFailed(f"stream broke before the first token ({exc.why})") from exc
    if first is None:
        raise NodeFailed("stream ended before the first token")
    if "error" in first:
        raise NodeFailed(f"engine error: {error_message(first)}")
    return first


def error_message(event: StreamEvent) -> str:
    """The message of a node's `{"error": {...}}` event (whatever shape the error took)."""
    error = event.get("error")
    return str(error.get("message", "")) if isinstance(error, dict) else str(error)


class _Race:
    """Attempts on ranked candidates: the next starts when one fails (a retry) or when the leader is late
    (a hedge); the first to deliver a token wins and the rest are cancelled."""

    def __init__(
        self, dispatcher: Dispatcher, job: GenerateRequest, candidates: list[Candidate], *, hedge: bool, throttled: bool
    ) -> None:
        self.d = dispatcher
        self.job = job
        self.candidates = candidates
        self.queue = iter(candidates)
        self.hedge = hedge
        self.throttled = throttled
        self.attempts: list[Attempt] = []
        self.running: dict[asyncio.Task[NodeStream], tuple[Candidate, float]] = {}
        self.hedged = False
        self.hedge_delay: float | None = None
        self.refused: list[NodeId] = []
        """Nodes that answered that the request is invalid."""

    def _launch(self, candidate: Candidate) -> None:
        task = asyncio.create_task(self.d.attempt(candidate.node_id, self.job))
        self.running[task] = (candidate, time.monotonic() + self.d.first_token_timeout(candidate))

    def _launch_next(self, why: str) -> bool:
        candidate = next(self.queue, None)
        if candidate is None:
            return False
        if self.throttled and not self.d.budget.allow_retry():
            self.attempts.append(Attempt(candidate.node_id, "skipped", f"retry budget exhausted ({why})"))
            return False
        (self.d.metrics.hedges if why == "hedge" else self.d.metrics.retries).inc()
        self._launch(candidate)
        return True

    async def run(self) -> NodeStream:
        first = next(self.queue)
        self._launch(first)
        self.hedge_delay = self.d.hedge_delay(first) if self.hedge else None
        hedge_at = time.monotonic() + self.hedge_delay if self.hedge_delay is not None else None
        try:
            while self.running:
                winner = await self._step(hedge_at)
                if winner is not None:
                    self._charge_refusals()
                    winner.attempts = [*self.attempts, Attempt(winner.node_id, "served")]
                    winner.hedged, winner.hedge_delay_s = self.hedged, self.hedge_delay
                    self.d.budget.success()
                    return winner
                if hedge_at is not None and time.monotonic() >= hedge_at:
                    hedge_at = None
                    self.hedged = self._launch_next("hedge")
        finally:
            await self._cancel_rest()
        if self.refused and all(a.node_id in self.refused for a in self.attempts if a.outcome == "failed"):
            raise bad_request(
                f"{len(self.refused)} node(s) serving {self.job.model} refused the request as invalid (the usual "
                "cause: the prompt plus max_tokens exceeds the model's context as the node counts tokens; the gateway "
                "does not pass on text written by nodes)"
            )
        detail = "; ".join(f"{a.node_id[:10]}: {a.detail}" for a in self.attempts)
        raise upstream_failed(f"every node tried failed before the first token ({detail})")

    def _charge_refusals(self) -> None:
        """Another node served the request: each node that refused it as invalid was wrong, a failed job."""
        for node_id in self.refused:
            self.d.node_failed(node_id, "refused as invalid a request another node served")

    async def _step(self, hedge_at: float | None) -> NodeStream | None:
        now = time.monotonic()
        wake = min([self.d.policy.watch_s + now, *(deadline for _, deadline in self.running.values())])
        if hedge_at is not None:
            wake = min(wake, hedge_at)
        done, _ = await asyncio.wait(self.running, timeout=max(0.0, wake - now), return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            candidate, _ = self.running.pop(task)
            exc = task.exception()
            if exc is None:
                return task.result()
            if isinstance(exc, APIError):
                raise exc
            if isinstance(exc, Refusal):
                self.refused.append(candidate.node_id)
                self._failed(candidate, f"refused the request as invalid: {exc}", counts=False)
                continue
            self._failed(candidate, str(exc), counts=not isinstance(exc, NotResumable))
        self._abandon_lost(time.monotonic())
        return None

    def _abandon_lost(self, now: float) -> None:
        """Attempts on nodes marked down, or past their first-token timeout, are given up."""
        for task, (candidate, deadline) in list(self.running.items()):
            why, kind = "", EventKind.JOB_FAILED
            if not self.d.live(candidate.node_id) and not self._lone_and_only_late(candidate):
                why = "node marked down or taken out of rotation while waiting for the first token"
            elif now >= deadline:
                why, kind = f"no first token in {self.d.first_token_timeout(candidate):.1f} s", EventKind.JOB_TIMED_OUT
            if why:
                task.cancel()
                del self.running[task]
                self._failed(candidate, why, counts=True, kind=kind)

    def _lone_and_only_late(self, candidate: Candidate) -> bool:
        """A node marked down only for not answering in time (not ejected, quarantined or banned), with no other
        node left to answer: its attempt waits on, up to the first-token timeout. Giving it up would only fail the
        request: a lone node slowed by its machine (a CPU node computing a long prefill misses its probes) is not a
        dead one, and a dead one breaks its connection. The same rule as mid-stream (DispatchPolicy.stall_timeout,
        takeover=False)."""
        if not self.d.membership.trusted(candidate.node_id):
            return False
        if any(other.node_id != candidate.node_id for other, _ in self.running.values()):
            return False
        tried = {a.node_id for a in self.attempts} | {c.node_id for c, _ in self.running.values()}
        return not any(c.node_id not in tried and self.d.live(c.node_id) for c in self.candidates)

    def _failed(
        self, candidate: Candidate, detail: str, *, counts: bool, kind: EventKind = EventKind.JOB_FAILED
    ) -> None:
        self.attempts.append(Attempt(candidate.node_id, "failed", detail))
        if counts:
            self.d.budget.failure()
            self.d.node_failed(candidate.node_id, f"before first token: {detail}", kind)
        if not self.running:
            self._launch_next("retry")

    async def _cancel_rest(self) -> None:
        for task in self.running:
            task.cancel()
        for task in list(self.running):
            with contextlib.suppress(BaseException):
                stream = await task
                stream.close()
                self.d.finished(stream.node_id)
        self.running.clear()


__all__ = ["Attempt", "Dispatcher", "NodeFailed", "NodeStream", "NotResumable", "Refusal", "error_message"]
