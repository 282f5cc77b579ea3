"""One request's generation across nodes: hedged open, a stall guard per token, and mid-stream failover.

When the serving node dies (its connection breaks), reports an engine error, or stalls (no token within
the stall timeout derived from its predicted ITL), the generation continues on the next-ranked live node
from the prompt plus the completion tokens the client already has (`GenerateRequest.resume`). Every node
event carries the ids of the tokens behind its text, so the gateway knows exactly where the client's text
ends; the new node replays those tokens through its detokeniser and stop matcher without sending them and
continues at completion position len(resume). The client sees one uninterrupted stream: with greedy
decoding the text equals an uninterrupted run, and seeded sampling continues deterministically because the
draw at each position depends only on (seed, position) (engines/sampling.py).
"""

import math
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from gridserve.gateway.api.errors import APIError
from gridserve.gateway.dispatch.dispatcher import Dispatcher, NodeFailed, NodeStream, error_message
from gridserve.gateway.dispatch.stall import Stalled, StallWatch
from gridserve.gateway.transport import Malformed, TransportError
from gridserve.reliability import EventKind
from gridserve.types import GenerateRequest, NodeId, StreamEvent
from gridserve.types.scheduling import Decision
from gridserve.types.wire import TokenLogprob

LOGPROB_SLACK = 1e-6
"""A log-probability may exceed 0 by float rounding, by no more."""


class GenerationFailed(Exception):
    """The generation cannot go on: no node could take it over (the message says why)."""


@dataclass
class Segment:
    """The part of a generation one node produced."""

    node_id: NodeId
    started: float
    first_at: float
    last_at: float
    job: GenerateRequest
    """The request as sent to this node (with `resume` after a failover)."""
    resumed_from: int = 0
    ids: list[int] = field(default_factory=list)
    """The token ids this node sent."""
    unnamed_chunks: int = 0
    unnamed_chars: int = 0
    """Text this node sent without naming its tokens (an upstream server): chunks and characters."""
    unnamed_text: list[str] = field(default_factory=list)
    """That text (compared by redundancy checks: gateway/integrity/redundancy.py)."""
    logprobs: list[tuple[float, tuple[float, ...]]] = field(default_factory=list)
    """What the node claimed for each of `ids` when the request asked for log-probabilities: the token's and its
    alternatives' (audited)."""
    scored_tokens: list[str] = field(default_factory=list)
    """The tokens those are for, as the node wrote them (a redundancy check aligns an answer without ids by them)."""
    tokens: int = 0
    outcome: str = "streaming"
    detail: str = ""
    final: StreamEvent = field(default_factory=lambda: StreamEvent())

    def as_dict(self) -> dict[str, Any]:
        return {
            "node_id": self.node_id,
            "resumed_from": self.resumed_from,
            "tokens": self.tokens,
            "outcome": self.outcome,
            "detail": self.detail,
            "ttft_s": round(self.first_at - self.started, 6),
        }


class Generation:
    def __init__(self, dispatcher: Dispatcher, decision: Decision, job: GenerateRequest, *, hedge: bool) -> None:
        self.d = dispatcher
        self.decision = decision
        self.job = job
        self.hedge = hedge
        self.segments: list[Segment] = []
        self.emitted: list[int] = []
        self.resumable = True
        self.failovers = 0
        self.on_failover: Callable[[Segment], None] | None = None
        """Told of each segment whose node failed once another node has taken the generation over."""
        self._stream: NodeStream | None = None

    # -- state --------------------------------------------------------------------------------------
    @property
    def stream(self) -> NodeStream:
        assert self._stream is not None, "open() first"
        return self._stream

    @property
    def segment(self) -> Segment:
        return self.segments[-1]

    @property
    def first(self) -> Segment:
        return self.segments[0]

    def tried(self) -> frozenset[str]:
        return frozenset(s.node_id for s in self.segments)

    # -- running ------------------------------------------------------------------------------------
    async def open(self) -> None:
        """Open on the best node that answers (hedged); raises APIError when none does."""
        self._begin(await self.d.open(self.decision, self.job, hedge=self.hedge), self.job)

    def _begin(self, stream: NodeStream, job: GenerateRequest) -> None:
        self._stream = stream
        self.segments.append(
            Segment(
                node_id=stream.node_id,
                started=stream.started,
                first_at=stream.first_at,
                last_at=stream.first_at,
                job=job,
                resumed_from=len(job.resume),
            )
        )

    def ready(self) -> bool:
        """A token from the node serving the request is already here (see `EventStream.ready`)."""
        return self._stream is not None and self._stream.source.ready()

    async def events(self) -> AsyncIterator[StreamEvent]:
        """Node events with failover folded in: token events, then one final event (or GenerationFailed).

        No event within the stall timeout (of the gateway's running time) raises Stalled; the timeout is read per
        event, so a stream found unresumable gets the longer one from then on. The per-token path is this one
        loop (no generator per layer): at 64 streams each layer cost about 1% of the gateway's CPU."""
        while True:
            stream = self.stream
            short, long = self._stall_timeouts(stream.node_id)
            watch = StallWatch(stream.source, self._patience(stream.node_id), self.d.policy.stall_busy_max_s)
            event: StreamEvent | None = stream.first
            try:
                while event is not None:
                    if "error" in event:
                        raise NodeFailed(f"engine error: {error_message(event)}")
                    self._account(event)
                    yield event
                    if event.get("finish_reason"):
                        self._close_segment("ok")
                        return
                    event = await watch.next(short if self.resumable else long)
                raise NodeFailed("stream ended before its last event")
            except (NodeFailed, TransportError) as exc:
                detail, lost = _failure(exc)
                self._node_failed(detail, lost=lost, stalled=isinstance(exc, Stalled))
                final = await self._fail_over(detail)
                if final is not None:
                    yield final
                    return
                if self.on_failover is not None:
                    self.on_failover(self.segments[-2])
            finally:
                watch.close()

    def _stall_timeouts(self, node_id: NodeId) -> tuple[float, float]:
        """The node's stall timeouts while its stream is resumable, and once it is not."""
        candidate = self.decision.candidate(node_id)
        return self.d.stall_timeout(candidate), self.d.stall_timeout(candidate, resumable=False)

    def _patience(self, node_id: NodeId) -> Callable[[float], float]:
        candidate = self.decision.candidate(node_id)

        def patience(waited_s: float) -> float:
            """More time when no live node could take the stream over (the policy's rule; the simulator's too)."""
            takeover = self.d.can_take_over(self.decision, self.tried())
            return self.d.stall_timeout(candidate, resumable=self.resumable, takeover=takeover) - waited_s

        return patience

    def _account(self, event: StreamEvent) -> None:
        ids = event.get("token_ids") or ()
        segment = self.segment
        if event.get("text") and not ids:
            segment.unnamed_chunks += 1
            segment.unnamed_chars += len(event["text"])
            segment.unnamed_text.append(event["text"])
            if not event.get("finish_reason"):
                self.resumable = False  # an engine that does not name its tokens cannot be continued elsewhere
        self.emitted.extend(ids)
        if "logprobs" in event:
            scored = checked_logprobs(event.pop("logprobs"), segment.job.sampling.logprobs, len(ids))
            if scored:
                event["logprobs"] = scored
                segment.logprobs.extend((e["logprob"], tuple(t["logprob"] for t in e["top_logprobs"])) for e in scored)
                segment.scored_tokens.extend(e["token"] for e in scored)
        segment.ids.extend(ids)
        segment.tokens += len(ids)
        segment.last_at = time.monotonic()
        if event.get("finish_reason"):
            segment.final = event

    def _close_segment(self, outcome: str, detail: str = "") -> None:
        segment = self.segment
        if segment.outcome == "streaming":
            segment.outcome, segment.detail = outcome, detail
            self.stream.close()
            self.d.finished(segment.node_id)

    def _node_failed(self, detail: str, *, lost: bool, stalled: bool) -> None:
        node_id = self.segment.node_id
        self._close_segment("failed", detail)
        kind = EventKind.JOB_STALLED if stalled else EventKind.JOB_FAILED
        self.d.node_failed(node_id, f"mid-stream after {len(self.emitted)} tokens: {detail}", kind)
        if lost:
            self.d.membership.mark_failed(node_id, f"stream broke: {detail}")

    async def _fail_over(self, detail: str) -> StreamEvent | None:
        """Continue on another node; returns a final event instead when nothing is left to generate."""
        done = len(self.emitted)
        if done >= self.job.sampling.max_tokens:  # every token arrived; only the closing event was lost
            return {"finish_reason": "length", "prompt_tokens": 0, "completion_tokens": done}
        if not self.resumable:
            raise GenerationFailed(f"node failed mid-generation ({detail}); its engine cannot be continued elsewhere")
        if not self.d.policy.may_fail_over(self.failovers):
            raise GenerationFailed(f"node failed mid-generation ({detail}) after {self.failovers} failovers")
        job = self.job.model_copy(update={"resume": tuple(self.emitted)})
        try:
            stream = await self.d.open(self.decision, job, exclude=self.tried(), hedge=False, throttled=False)
        except APIError as exc:
            raise GenerationFailed(f"node failed mid-generation ({detail}); no node took over: {exc.message}") from exc
        self.failovers += 1
        self.d.metrics.failovers.inc()
        self._begin(stream, job)
        return None

    def close(self) -> None:
        """The client went away (or an error ended the generation): release the node's work."""
        if self.segments:
            self._close_segment("cancelled")


def checked_logprobs(raw: object, asked: int | None, tokens: int) -> list[dict[str, Any]]:
    """A node's log-probabilities for one event, as the client gets them: dropped when the request did not ask for
    them; otherwise each entry re-made from its fields (nothing else passes through), finite and at most 0, with at
    most `asked` alternatives, one per token when the node names its tokens (NodeFailed otherwise: the stream fails
    over like any other malformed one)."""
    if asked is None:
        return []
    try:
        entries = [TokenLogprob.model_validate(e, strict=False) for e in raw] if isinstance(raw, list) else None
    except ValidationError as exc:
        raise NodeFailed(f"malformed log-probabilities: {exc.errors()[0]['msg']}") from exc
    if entries is None or (tokens and len(entries) != tokens):
        raise NodeFailed(f"malformed log-probabilities: not one entry per token ({tokens} tokens)")
    for entry in entries:
        values = [entry.logprob, *(t.logprob for t in entry.top_logprobs)]
        if not all(math.isfinite(v) and v <= LOGPROB_SLACK for v in values) or len(entry.top_logprobs) > asked:
            raise NodeFailed("malformed log-probabilities: a value that is not a log-probability, or too many")
    return [e.model_dump() for e in entries]


def _failure(exc: NodeFailed | TransportError) -> tuple[str, bool]:
    """What went wrong, for the ledger and the client, and whether the connection to the node was lost (the node
    is then taken out of rotation until it heartbeats again)."""
    if isinstance(exc, NodeFailed):
        return str(exc), False
    if isinstance(exc, Malformed):
        return f"malformed event ({exc.why})", False
    return f"connection lost ({exc.why})", True


__all__ = ["Generation", "GenerationFailed", "Segment", "Stalled"]
