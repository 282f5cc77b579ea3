"""Dispatch: open a generation on the best node that answers, hedged, with retries before the first token.

- An attempt that fails before its first token moves to the next-ranked node (invisible to the client).
- **Hedging**: if the first token has not come by the hedge delay (the node's predicted p95 TTFT), the
  runner-up gets the same request; the first to stream wins and the other is cancelled (its connection is
  closed, which cancels the work on the node).
- Retries and hedges draw on a retry budget (gRPC retry throttling), so a failing grid does not drown in
  them. A failover of a stream already under way is not throttled (the client holds half an answer); it is
  bounded per request by `max_failovers` instead (gateway/dispatch/generation.py).
- An attempt waits at most the first-token timeout, and is abandoned as soon as its node is marked down.

The per-token path uses aiohttp (its stream reader costs a fraction of httpx's per chunk; see DESIGN.md).
"""

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson

from gridserve.gateway.config import GatewayConfig
from gridserve.gateway.api.errors import APIError, bad_request, no_capacity, upstream_failed
from gridserve.gateway.registry.membership import LIVE, Membership
from gridserve.gateway.ops.metrics import GatewayMetrics
from gridserve.gateway.dispatch.retry_budget import RetryBudget
from gridserve.reliability import EventKind, NodeEvent
from gridserve.trust import Identity, sign_envelope
from gridserve.types import GenerateRequest, NodeId
from gridserve.types.scheduling import Candidate, Decision

log = logging.getLogger("gridserve.gateway")
WATCH_S = 0.1
"""How often a waiting attempt checks whether its node has been marked down."""


@dataclass
class Attempt:
    node_id: str
    outcome: str
    detail: str = ""


@dataclass
class NodeStream:
    """An open generation on one node; `first` is its first event, already received."""

    node_id: NodeId
    first: dict[str, Any]
    response: aiohttp.ClientResponse
    started: float
    first_at: float
    attempts: list[Attempt] = field(default_factory=list)
    hedged: bool = False
    hedge_delay_s: float | None = None

    async def events(self) -> AsyncGenerator[dict[str, Any]]:
        yield self.first
        async for line in self.response.content:
            if line.strip():
                yield orjson.loads(line)

    def close(self) -> None:
        self.response.close()


class NodeFailed(Exception):
    pass


class NotResumable(NodeFailed):
    """The node cannot continue another node's generation (its engine does not take token ids)."""


class Dispatcher:
    def __init__(
        self, config: GatewayConfig, membership: Membership, identity: Identity, metrics: GatewayMetrics
    ) -> None:
        self.config = config
        self.membership = membership
        self.identity = identity
        self.metrics = metrics
        self.session: aiohttp.ClientSession | None = None
        self.budget = RetryBudget(max_tokens=config.retry_budget_tokens, tokens=config.retry_budget_tokens)

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, keepalive_timeout=30)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.config.connect_timeout_s)
        self.session = aiohttp.ClientSession(connector=connector, timeout=timeout)

    async def aclose(self) -> None:
        if self.session is not None:
            await self.session.close()

    # -- timeouts derived from predictions ------------------------------------------------------------
    def hedge_delay(self, candidate: Candidate) -> float:
        """The node's predicted p95 TTFT: the roofline prediction times the p95 of its observed/predicted ratios
        (twice the calibrated prediction until 8 requests are observed), within [hedge_min_s, first-token timeout]."""
        predicted = candidate.predicted_ttft_s or 0.0
        record = self.membership.nodes.get(candidate.node_id)
        p95 = record.ttft_ratio_p95() if record is not None else None
        delay = predicted / candidate.calibration[0] * p95 if p95 is not None else 2.0 * predicted
        return min(max(delay, self.config.hedge_min_s), self.first_token_timeout(candidate))

    def first_token_timeout(self, candidate: Candidate) -> float:
        return max(self.config.first_token_timeout_s, 10.0 * (candidate.predicted_ttft_s or 0.0))

    def stall_timeout(self, candidate: Candidate | None) -> float:
        """No token for this long mid-stream means the node stalled: `stall_itl_multiple` x its predicted ITL,
        at least `stall_min_s` (`stall_unpredicted_s` without a prediction)."""
        itl = candidate.predicted_itl_s if candidate is not None else None
        if itl is None:
            return self.config.stall_unpredicted_s
        return max(self.config.stall_min_s, self.config.stall_itl_multiple * itl)

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
        candidates = [c for c in decision.ranked_for_dispatch() if c.node_id not in exclude and self.live(c.node_id)]
        candidates = candidates[: self.config.dispatch_attempts]
        if not candidates:
            if not decision.candidates:
                raise no_capacity(decision.explanation)
            raise upstream_failed("no other node can take this request")
        race = _Race(self, job, iter(candidates), hedge=hedge and self.config.hedging, throttled=throttled)
        return await race.run()

    async def ask_to_load(self, node_id: str, payload: dict[str, Any], timeout_s: float = 5.0) -> bool | None:
        """POST a gateway-signed load request to the node's /internal/load (a model to pre-warm, or a layer
        range to run): True if the node took it, False if it refused, None if it could not be reached."""
        record = self.membership.nodes.get(NodeId(node_id))
        if record is None or self.session is None:
            return None
        body = sign_envelope(self.identity, {"node_id": node_id, **payload}, purpose="load", now=time.time())
        try:
            async with self.session.post(
                record.capability.endpoint + "/internal/load",
                data=body,
                headers={"content-type": "application/json"},
                timeout=aiohttp.ClientTimeout(total=timeout_s),
            ) as resp:
                return resp.status in (200, 202)
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            log.warning("load request %s to %s failed: %s", payload, node_id, type(exc).__name__)
            return None

    def live(self, node_id: str) -> bool:
        record = self.membership.nodes.get(NodeId(node_id))
        return record is not None and record.state in LIVE

    async def attempt(self, node_id: NodeId, job: GenerateRequest) -> NodeStream:
        record = self.membership.nodes.get(node_id)
        if record is None or self.session is None:
            raise NodeFailed("node left the grid")
        payload = {**job.model_dump(mode="json"), "node_id": node_id}
        body = sign_envelope(self.identity, payload, purpose="generate", now=time.time())
        started = time.monotonic()
        self.membership.request_started(node_id)
        try:
            response = await self.session.post(
                record.capability.endpoint + "/internal/generate",
                data=body,
                headers={"content-type": "application/json"},
            )
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            self.membership.request_ended(node_id)
            self.membership.mark_failed(node_id, f"dispatch failed: {type(exc).__name__}")
            raise NodeFailed(f"unreachable ({type(exc).__name__})") from exc
        except BaseException:
            self.membership.request_ended(node_id)
            raise
        try:
            return await self._first_event(node_id, job, response, started)
        except BaseException:
            self.membership.request_ended(node_id)
            response.close()
            raise

    async def _first_event(
        self, node_id: NodeId, job: GenerateRequest, response: aiohttp.ClientResponse, started: float
    ) -> NodeStream:
        if response.status == 400:
            error = (await response.json()).get("error", {})
            message = str(error.get("message", "rejected by node"))
            if job.resume:
                raise NotResumable(message)
            raise bad_request(message)
        if response.status != 200:
            text = (await response.text())[:300]
            raise NodeFailed(f"answered {response.status}: {text}")
        try:
            line = await response.content.readline()
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise NodeFailed(f"stream broke before the first token ({type(exc).__name__})") from exc
        if not line:
            raise NodeFailed("stream ended before the first token")
        first = orjson.loads(line)
        if "error" in first:
            raise NodeFailed(f"engine error: {first['error'].get('message', '')}")
        return NodeStream(node_id=node_id, first=first, response=response, started=started, first_at=time.monotonic())

    def finished(self, node_id: NodeId) -> None:
        self.membership.request_ended(node_id)

    def node_failed(self, node_id: NodeId, detail: str, kind: EventKind = EventKind.JOB_FAILED) -> None:
        self.membership.note(NodeEvent(node_id=node_id, kind=kind, at=time.time(), detail=detail))


class _Race:
    """Attempts on ranked candidates: the next starts when one fails (a retry) or when the leader is late
    (a hedge); the first to deliver a token wins and the rest are cancelled."""

    def __init__(
        self, dispatcher: Dispatcher, job: GenerateRequest, queue: Iterator[Candidate], *, hedge: bool, throttled: bool
    ) -> None:
        self.d = dispatcher
        self.job = job
        self.queue = queue
        self.hedge = hedge
        self.throttled = throttled
        self.attempts: list[Attempt] = []
        self.running: dict[asyncio.Task[NodeStream], tuple[Candidate, float]] = {}
        self.hedged = False
        self.hedge_delay: float | None = None

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
                    winner.attempts = [*self.attempts, Attempt(winner.node_id, "served")]
                    winner.hedged, winner.hedge_delay_s = self.hedged, self.hedge_delay
                    self.d.budget.success()
                    return winner
                if hedge_at is not None and time.monotonic() >= hedge_at:
                    hedge_at = None
                    self.hedged = self._launch_next("hedge")
        finally:
            await self._cancel_rest()
        detail = "; ".join(f"{a.node_id[:10]}: {a.detail}" for a in self.attempts)
        raise upstream_failed(f"every node tried failed before the first token ({detail})")

    async def _step(self, hedge_at: float | None) -> NodeStream | None:
        now = time.monotonic()
        wake = min([WATCH_S + now, *(deadline for _, deadline in self.running.values())])
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
            self._failed(candidate, str(exc), counts=not isinstance(exc, NotResumable))
        self._abandon_lost(time.monotonic())
        return None

    def _abandon_lost(self, now: float) -> None:
        """Attempts on nodes marked down, or past their first-token timeout, are given up."""
        for task, (candidate, deadline) in list(self.running.items()):
            why, kind = "", EventKind.JOB_FAILED
            if not self.d.live(candidate.node_id):
                why = "node marked down while waiting for the first token"
            elif now >= deadline:
                why, kind = f"no first token in {self.d.first_token_timeout(candidate):.1f} s", EventKind.JOB_TIMED_OUT
            if why:
                task.cancel()
                del self.running[task]
                self._failed(candidate, why, counts=True, kind=kind)

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


__all__ = ["Attempt", "Dispatcher", "NodeFailed", "NodeStream"]
