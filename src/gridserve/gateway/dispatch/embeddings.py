"""Dispatch of an embeddings request: the decision's nodes in rank order until one answers with valid vectors.

An embeddings answer is whole or nothing (no stream to resume), so there is no hedge and no mid-answer failover:
an attempt that fails (unreachable, an error status, no answer within its timeout, or an answer that fails the
integrity checks of gateway/integrity/embeddings.py) moves the request to the next-ranked live node, as a
generation that fails before its first token does (gateway/dispatch/dispatcher.py: the same attempt limit, retry
budget, ledger events and treatment of nodes that refuse the request as invalid)."""

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from gridserve.gateway.api.errors import bad_request, no_capacity, upstream_failed
from gridserve.gateway.dispatch.dispatcher import REFUSAL_NOTE_CHARS, Attempt, Dispatcher
from gridserve.gateway.integrity.embeddings import BadReply, Integrity, read_reply
from gridserve.gateway.transport import Refused, Timeout, TransportError
from gridserve.reliability import EventKind
from gridserve.types import NodeId
from gridserve.types.embedding import EmbedRequest, Floats
from gridserve.types.scheduling import Candidate, Decision

SECONDS_PER_INPUT_FLOOR = 0.5
"""An attempt's timeout grows by at least this much per input beyond the first (a batch is embedded one input
after another)."""


@dataclass
class Embedded:
    """The answer the client gets, and how it was had."""

    node_id: NodeId
    vectors: Floats
    prompt_tokens: int
    started: float
    answered: float
    attempts: list[Attempt] = field(default_factory=list)


class _Refused(Exception):
    """The node answered that the request itself is invalid (400)."""


class _Failed(Exception):
    def __init__(self, detail: str, kind: EventKind = EventKind.JOB_FAILED) -> None:
        super().__init__(detail)
        self.kind = kind


class EmbeddingDispatch:
    def __init__(self, dispatcher: Dispatcher, integrity: Integrity) -> None:
        self.d = dispatcher
        self.integrity = integrity

    def timeout(self, candidate: Candidate, inputs: int) -> float:
        """How long an attempt may take: the first-token timeout of the node's prediction for the longest input,
        times the inputs (at least SECONDS_PER_INPUT_FLOOR more per input)."""
        one = self.d.first_token_timeout(candidate)
        predicted = candidate.predicted_ttft_s or 0.0
        more = (inputs - 1) * max(SECONDS_PER_INPUT_FLOOR, self.d.policy.first_token_ttft_multiple * predicted)
        return one + more

    async def run(
        self, decision: Decision, job: EmbedRequest, on_failover: Callable[[str, str], None] | None = None
    ) -> Embedded:
        """The first valid answer among the decision's candidates (at most the policy's attempts); APIError when
        none answers. `on_failover(node, why)`: told of each failed node another is then tried after."""
        able = (c for c in decision.ranked_for_dispatch() if self.d.live(c.node_id))
        candidates = list(itertools.islice(able, self.d.policy.dispatch_attempts))
        if not candidates:
            raise no_capacity(decision.explanation) if not decision.eligible_count else upstream_failed("no live node")
        attempts: list[Attempt] = []
        refused: list[NodeId] = []
        for n, candidate in enumerate(candidates):
            if n and not self.d.budget.allow_retry():
                attempts.append(Attempt(candidate.node_id, "skipped", "retry budget exhausted"))
                break
            if n:
                self.d.metrics.retries.inc()
                if on_failover is not None:
                    on_failover(attempts[-1].node_id, attempts[-1].detail)
            try:
                embedded = await self._attempt(candidate, job)
            except _Refused as exc:
                refused.append(candidate.node_id)
                attempts.append(Attempt(candidate.node_id, "failed", f"refused the request as invalid: {exc}"))
                continue
            except _Failed as exc:
                attempts.append(Attempt(candidate.node_id, "failed", str(exc)))
                self.d.budget.failure()
                self.d.node_failed(candidate.node_id, f"embeddings: {exc}", exc.kind)
                continue
            for node_id in refused:  # another node served it: refusing it was wrong
                self.d.node_failed(node_id, "refused as invalid an embeddings request another node served")
            self.d.budget.success()
            embedded.attempts = [*attempts, Attempt(candidate.node_id, "served")]
            return embedded
        if refused and all(a.node_id in refused for a in attempts if a.outcome == "failed"):
            raise bad_request(
                f"{len(refused)} node(s) embedding with {job.model} refused the request as invalid (the usual cause: "
                "an input longer than the model's context as the node counts tokens)",
                param="input",
            )
        detail = "; ".join(f"{a.node_id[:10]}: {a.detail}" for a in attempts)
        raise upstream_failed(f"every node tried failed to embed ({detail})")

    async def _attempt(self, candidate: Candidate, job: EmbedRequest) -> Embedded:
        node_id = candidate.node_id
        record = self.d.membership.nodes.get(node_id)
        if record is None:
            raise _Failed("node left the grid")
        started = time.monotonic()
        limit = self.timeout(candidate, len(job.inputs))
        self.d.membership.request_started(node_id)
        try:
            body = await self.d.transport.embed(node_id, record.capability.endpoint, job, limit)
        except Refused as exc:
            if exc.status == 400:
                raise _Refused((exc.message or "rejected by node")[:REFUSAL_NOTE_CHARS]) from exc
            raise _Failed(f"answered {exc.status}: {exc.body}") from exc
        except Timeout as exc:
            raise _Failed(f"no answer in {limit:.1f} s", EventKind.JOB_TIMED_OUT) from exc
        except TransportError as exc:
            self.d.membership.mark_failed(node_id, f"dispatch failed: {exc.why}")
            raise _Failed(f"unreachable ({exc.why})") from exc
        finally:
            self.d.membership.request_ended(node_id)
        try:
            vectors, tokens = read_reply(self.d.membership.verifier, body, record.capability.public_key, job)
        except BadReply as exc:
            self.integrity.incident(node_id, job.request_id, str(exc))
            raise _Failed(f"invalid answer ({exc})") from exc
        return Embedded(node_id, vectors, tokens, started, time.monotonic())


__all__ = ["Embedded", "EmbeddingDispatch"]
