"""What a finished request teaches the gateway: a job outcome for the reliability ledger (inside its SLO or
not), a calibration sample for the performance model, latency metrics, and a trace for the latency doctor
(the request's time split into network, queue, prefill and decode)."""

import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from gridserve.gateway.dispatch.generation import Generation, Segment
from gridserve.gateway.registry.membership import Membership
from gridserve.gateway.ops.metrics import GatewayMetrics
from gridserve.reliability import EventKind, NodeEvent
from gridserve.types.scheduling import Decision


@dataclass(frozen=True)
class RequestTrace:
    """One finished request as the doctor sees it. Times in seconds; None where not measured."""

    at: float
    decision_id: str
    request_id: str
    model: str
    node_id: str
    status: str
    ttft_s: float
    network_s: float | None
    queue_s: float | None
    prefill_s: float | None
    decode_s: float | None
    itl_s: float | None
    predicted_ttft_s: float | None
    predicted_itl_s: float | None
    failovers: int
    hedged: bool
    error: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in self.__dict__.items()}


class Traces:
    """The recent request traces (a ring)."""

    def __init__(self, capacity: int = 2048) -> None:
        self.items: deque[RequestTrace] = deque(maxlen=capacity)

    def add(self, trace: RequestTrace) -> None:
        self.items.append(trace)

    def for_node(self, node_id: str, since: float = 0.0) -> list[RequestTrace]:
        return [t for t in self.items if t.node_id == node_id and t.at >= since]


def segment_split(segment: Segment) -> dict[str, float | None]:
    """Network / queue / prefill / decode of a segment, from the gateway's clock and the node's own timings."""
    ttft = segment.first_at - segment.started
    final = segment.final
    if "prefill_s" not in final:
        return {"network_s": None, "queue_s": None, "prefill_s": None, "decode_s": segment.last_at - segment.first_at}
    queue, prefill = float(final.get("queue_s", 0.0)), float(final["prefill_s"])
    return {
        "network_s": max(0.0, ttft - queue - prefill),
        "queue_s": queue,
        "prefill_s": prefill,
        "decode_s": segment.last_at - segment.first_at,
    }


def observe_outcome(
    membership: Membership,
    metrics: GatewayMetrics,
    traces: Traces,
    decision: Decision,
    gen: Generation,
    *,
    status: str,
    error: str = "",
) -> dict[str, Any]:
    """Record the generation's outcome; returns the timing split for the decision log."""
    if not gen.segments:
        return {}
    last, first = gen.segment, gen.first
    ttft = first.first_at - first.started
    seg_ttft = last.first_at - last.started
    itl = (last.last_at - last.first_at) / (last.tokens - 1) if last.tokens > 1 else None
    model = decision.model
    metrics.ttft.labels(model=model, node=first.node_id).observe(ttft)
    if itl is not None:
        metrics.itl.labels(model=model, node=last.node_id).observe(itl)
    split = segment_split(last)
    candidate = decision.candidate(last.node_id)
    traces.add(
        RequestTrace(
            at=time.time(),
            decision_id=decision.decision_id,
            request_id=decision.request_id,
            model=model,
            node_id=last.node_id,
            status=status,
            ttft_s=seg_ttft,
            itl_s=itl,
            predicted_ttft_s=candidate.predicted_ttft_s if candidate else None,
            predicted_itl_s=candidate.predicted_itl_s if candidate else None,
            failovers=gen.failovers,
            hedged=gen.stream.hedged,
            error=error,
            **split,
        )
    )
    if status == "ok":
        _completed(membership, decision, last, ttft=seg_ttft, itl=itl)
    return {k: (None if v is None else round(v, 6)) for k, v in split.items()} | {
        "ttft_s": round(ttft, 6),
        "itl_s": None if itl is None else round(itl, 6),
    }


def _completed(membership: Membership, decision: Decision, segment: Segment, *, ttft: float, itl: float | None) -> None:
    node_id = segment.node_id
    needs = decision.requirements
    within = ttft <= float(needs["ttft_slo_s"]) and (itl is None or itl <= float(needs["tpot_slo_s"]))
    membership.note(
        NodeEvent(
            node_id=node_id,
            kind=EventKind.JOB_COMPLETED,
            at=time.time(),
            within_slo=within,
            detail=f"ttft {ttft:.3f} s, itl {itl or 0:.4f} s",
        )
    )
    candidate = decision.candidate(node_id)
    raw_ttft: float | None = None
    raw_itl = 0.0
    if candidate is not None and candidate.predicted_ttft_s is not None:
        ttft_factor, itl_factor = candidate.calibration
        raw_ttft = candidate.predicted_ttft_s / ttft_factor
        raw_itl = (candidate.predicted_itl_s or 0.0) / itl_factor
    membership.observed_timing(
        node_id,
        ttft_s=ttft,
        raw_predicted_ttft_s=raw_ttft,
        fresh_ttft_s=segment.first_at - segment.started if segment.resumed_from == 0 else None,
        raw_predicted_itl_s=raw_itl,
        itl_s=itl,
    )
