"""Dispatch: call the chosen node, fall back to the next-ranked node if it fails before the first token.

The per-token path uses aiohttp (its stream reader costs a fraction of httpx's per chunk; see DESIGN.md).
"""

import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson

from gridserve.gateway.config import GatewayConfig
from gridserve.gateway.errors import bad_request, no_capacity, upstream_failed
from gridserve.gateway.membership import Membership
from gridserve.gateway.metrics import GatewayMetrics
from gridserve.gateway.retry_budget import RetryBudget
from gridserve.reliability import EventKind, NodeEvent
from gridserve.trust import Identity, sign_envelope
from gridserve.types import GenerateRequest, NodeId
from gridserve.types.scheduling import Decision

log = logging.getLogger("gridserve.gateway")


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

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        yield self.first
        try:
            async for line in self.response.content:
                if line.strip():
                    yield orjson.loads(line)
        finally:
            self.response.release()

    def close(self) -> None:
        self.response.close()


class NodeFailed(Exception):
    pass


class Dispatcher:
    def __init__(
        self, config: GatewayConfig, membership: Membership, identity: Identity, metrics: GatewayMetrics
    ) -> None:
        self.config = config
        self.membership = membership
        self.identity = identity
        self.metrics = metrics
        self.session: aiohttp.ClientSession | None = None
        self.budget = RetryBudget()

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, keepalive_timeout=30)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.config.connect_timeout_s)
        self.session = aiohttp.ClientSession(connector=connector, timeout=timeout)

    async def aclose(self) -> None:
        if self.session is not None:
            await self.session.close()

    async def open(self, decision: Decision, job: GenerateRequest) -> NodeStream:
        """Open the stream on the best node that answers; raises APIError when none does."""
        attempts: list[Attempt] = []
        for candidate in decision.candidates[: self.config.dispatch_attempts]:
            if attempts:
                if not self.budget.allow_retry():
                    attempts.append(Attempt(candidate.node_id, "skipped", "retry budget exhausted"))
                    break
                self.metrics.retries.inc()
            try:
                stream = await self._try(candidate.node_id, job)
            except NodeFailed as exc:
                self.budget.failure()
                attempts.append(Attempt(candidate.node_id, "failed", str(exc)))
                self.membership.note(
                    NodeEvent(
                        node_id=candidate.node_id,
                        kind=EventKind.JOB_FAILED,
                        at=time.time(),
                        detail=f"before first token: {exc}",
                    )
                )
                continue
            self.budget.success()
            stream.attempts = [*attempts, Attempt(candidate.node_id, "served")]
            return stream
        if not decision.candidates:
            raise no_capacity(decision.explanation)
        detail = "; ".join(f"{a.node_id[:10]}: {a.detail}" for a in attempts)
        raise upstream_failed(f"every node tried failed before the first token ({detail})")

    async def _try(self, node_id: NodeId, job: GenerateRequest) -> NodeStream:
        record = self.membership.nodes.get(node_id)
        if record is None or self.session is None:
            raise NodeFailed("node left the grid")
        payload = {**job.model_dump(mode="json"), "node_id": node_id}
        body = sign_envelope(self.identity, payload, purpose="generate", now=time.time())
        started = time.monotonic()
        record.outstanding += 1
        try:
            response = await self.session.post(
                record.capability.endpoint + "/internal/generate",
                data=body,
                headers={"content-type": "application/json"},
            )
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            record.outstanding -= 1
            self.membership.mark_failed(node_id, f"dispatch failed: {type(exc).__name__}")
            raise NodeFailed(f"unreachable ({type(exc).__name__})") from exc
        try:
            return await self._first_event(node_id, response, started)
        except BaseException:
            record.outstanding -= 1
            response.close()
            raise

    async def _first_event(self, node_id: NodeId, response: aiohttp.ClientResponse, started: float) -> NodeStream:
        if response.status == 400:
            error = (await response.json()).get("error", {})
            raise bad_request(str(error.get("message", "rejected by node")))
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
        record = self.membership.nodes.get(node_id)
        if record is not None:
            record.outstanding = max(0, record.outstanding - 1)


__all__ = ["Attempt", "Dispatcher", "NodeStream"]
