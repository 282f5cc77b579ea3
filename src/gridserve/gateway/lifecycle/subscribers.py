"""The lifecycle's subscribers: each owns one consequence of a request, the same for every serving path.

- `DecisionLogSubscriber`: the decision log (`GET /v1/decisions/{id}`) from dispatch to outcome;
- `MetricsSubscriber`: request, token and latency metrics;
- `LedgerSubscriber`: the reliability ledger (a completed job, inside its SLO or not), the node's calibration
  and the latency doctor's trace;
- `Settlement`: receipts checked, audits sampled and settlement entries made (run first: the decision log
  records the problems it finds, and the answer ends only once its entries are stored).
"""

import time
from typing import Any

from gridserve.gateway.integrity.audit import Auditor
from gridserve.gateway.integrity.receipts import ReceiptCheck, ReceiptChecker
from gridserve.gateway.lifecycle.record import Finished, NodeWork, Settled
from gridserve.gateway.ops.decisions import DecisionLog
from gridserve.gateway.ops.metrics import GatewayMetrics
from gridserve.gateway.ops.outcomes import RequestTrace, Traces
from gridserve.gateway.registry.membership import Membership
from gridserve.reliability import EventKind, NodeEvent
from gridserve.types.scheduling import Candidate, Decision


class Scope:
    """One request from arrival to end: when it arrived and what each subscriber keeps for it meanwhile."""

    __slots__ = ("arrived", "arrived_ns", "decided_at", "endpoint", "state")

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.arrived = time.monotonic()
        self.arrived_ns = time.time_ns()
        self.decided_at: float | None = None
        self.state: dict[str, Any] = {}
        """Per-subscriber state (a tracing span, say), keyed by the subscriber's name."""


class Subscriber:
    """A consequence of requests. Every hook is optional; none may raise into the request's path."""

    def decided(self, scope: Scope, decision: Decision) -> None:
        """The scheduler chose (or found nothing; the request then ends in `not_opened`)."""

    def not_opened(self, scope: Scope, decision: Decision | None, error: str) -> None:
        """No node (or chain) took the request: it ends with an error before any token."""

    def opened(self, scope: Scope, decision: Decision, served_by: str, fields: dict[str, Any]) -> None:
        """The first token came from `served_by` (a node, or a pipeline's id)."""

    def failover(self, scope: Scope, node_id: str, detail: str) -> None:
        """The node (or stage) serving the request failed mid-answer and another took over."""

    def finished(self, scope: Scope, end: Finished, settled: Settled) -> None:
        """The request ended: ok, failed or cancelled."""


class DecisionLogSubscriber(Subscriber):
    def __init__(self, decisions: DecisionLog) -> None:
        self.decisions = decisions

    def decided(self, scope: Scope, decision: Decision) -> None:
        self.decisions.record(decision, status="dispatching")

    def not_opened(self, scope: Scope, decision: Decision | None, error: str) -> None:
        if decision is not None:
            self.decisions.record(decision, status="failed", error=error)

    def opened(self, scope: Scope, decision: Decision, served_by: str, fields: dict[str, Any]) -> None:
        self.decisions.record(decision, status="streaming", served_by=served_by, **fields)

    def finished(self, scope: Scope, end: Finished, settled: Settled) -> None:
        self.decisions.record(
            end.decision,
            status=end.status,
            error=end.error or None,
            served_by=end.served_by,
            failovers=end.failovers,
            usage={"prompt_tokens": end.prompt_tokens, "completion_tokens": end.completion_tokens},
            duration_s=round(end.duration_s, 6),
            timing=end.timing.as_dict(),
            receipt_problems=list(settled.problems),
            settled=[{"node_id": e["node_id"], "tokens": e["tokens"], "status": e["status"]} for e in settled.entries],
            **end.log_fields,
        )


class MetricsSubscriber(Subscriber):
    def __init__(self, metrics: GatewayMetrics) -> None:
        self.metrics = metrics

    def not_opened(self, scope: Scope, decision: Decision | None, error: str) -> None:
        self.metrics.requests.labels(endpoint=scope.endpoint, status="failed").inc()

    def failover(self, scope: Scope, node_id: str, detail: str) -> None:
        self.metrics.failovers.inc()

    def finished(self, scope: Scope, end: Finished, settled: Settled) -> None:
        m = self.metrics
        m.requests.labels(endpoint=end.endpoint, status=end.status).inc()
        for work in end.work:
            if not work.embedded:  # (generated tokens: an embedding's are its input's)
                m.tokens.labels(node=work.node_id).inc(work.tokens)
        if end.timing.ttft_s is None:
            return
        first = end.served_by if end.pipeline or not end.work else end.work[0].node_id
        m.ttft.labels(model=end.decision.model, node=first).observe(end.timing.ttft_s)
        if end.timing.itl_s is not None:
            m.itl.labels(model=end.decision.model, node=end.served_by).observe(end.timing.itl_s)


class LedgerSubscriber(Subscriber):
    """Completed jobs into the reliability ledger (failures are noted when they happen, by the path that saw
    them), observed timings into the node's calibration, and the doctor's trace."""

    def __init__(self, membership: Membership, traces: Traces) -> None:
        self.membership = membership
        self.traces = traces

    def finished(self, scope: Scope, end: Finished, settled: Settled) -> None:
        if end.timing.ttft_s is None:
            return
        self._trace(end)
        if end.status != "ok":
            return
        needs = end.decision.requirements
        ttft, itl = end.timing.finishing_ttft_s, end.timing.itl_s
        within = ttft <= float(needs["ttft_slo_s"]) and (itl is None or itl <= float(needs["tpot_slo_s"]))
        detail = f"ttft {ttft:.3f} s, itl {itl or 0:.4f} s"
        finishing = end.finishing
        done = [w for w in end.work if w.outcome == "ok"] if finishing is None else [finishing]
        for work in done:
            stage = f" (pipeline stage [{work.layers[0]}, {work.layers[1]}))" if work.layers else ""
            self.membership.note(
                NodeEvent(
                    node_id=work.node_id,
                    kind=EventKind.JOB_COMPLETED,
                    at=time.time(),
                    within_slo=within,
                    detail=detail + stage,
                )
            )
        if finishing is not None:
            self._calibrate(end, finishing)

    def _calibrate(self, end: Finished, work: NodeWork) -> None:
        candidate = end.decision.candidate(work.node_id)
        raw_ttft: float | None = None
        raw_service: float | None = None
        raw_itl = 0.0
        if candidate is not None and candidate.predicted_ttft_s is not None:
            ttft_factor, itl_factor = candidate.calibration
            error = _reuse_error_s(end, candidate)
            raw_ttft = candidate.predicted_ttft_s / ttft_factor + error
            service = candidate.raw_service_ttft_s
            raw_service = None if service is None else service + error
            raw_itl = (candidate.predicted_itl_s or 0.0) / itl_factor
        self.membership.observed_timing(
            work.node_id,
            ttft_s=end.timing.finishing_ttft_s,
            raw_predicted_ttft_s=raw_ttft,
            fresh_ttft_s=end.timing.fresh_ttft_s,
            raw_predicted_itl_s=raw_itl,
            itl_s=end.timing.itl_s,
            service=_service(end, raw_service),
            completion_tokens=end.completion_tokens,
        )

    def _trace(self, end: Finished) -> None:
        split = end.timing.split
        candidate = end.decision.candidate(end.served_by)
        self.traces.add(
            RequestTrace(
                at=time.time(),
                decision_id=end.decision.decision_id,
                request_id=end.decision.request_id,
                model=end.decision.model,
                node_id=end.served_by,
                status=end.status,
                ttft_s=end.timing.finishing_ttft_s,
                itl_s=end.timing.itl_s,
                network_s=split.get("network_s"),
                queue_s=split.get("queue_s"),
                prefill_s=split.get("prefill_s"),
                decode_s=split.get("decode_s"),
                predicted_ttft_s=candidate.predicted_ttft_s if candidate else None,
                predicted_itl_s=candidate.predicted_itl_s if candidate else None,
                failovers=end.failovers,
                hedged=end.hedged,
                error=end.error,
                prompt_tokens=end.prompt_tokens,
                cached_tokens=end.cached_tokens,
                prompt_estimate=end.decision.request.prompt_tokens,
                expected_cached_tokens=candidate.cached_tokens if candidate else 0,
            )
        )


def _service(end: Finished, raw_predicted: float | None) -> tuple[float, float] | None:
    """(uncalibrated predicted, observed) TTFT of the node's own service: the fresh segment's TTFT less the wait
    for a batch slot the node reports, against the prediction less its predicted queue wait and weights' load. None
    where the node reports no queue wait (calibration then compares whole TTFTs) or the segment resumed another's
    work. A queue prediction is an estimate of other requests' lengths; folding its error into the node's factor
    would make the node's own speed misjudged by however busy it was when sampled."""
    fresh, queue = end.timing.fresh_ttft_s, end.timing.split.get("queue_s")
    if raw_predicted is None or fresh is None or queue is None:
        return None
    return raw_predicted, max(0.0, fresh - queue)


def _reuse_error_s(end: Finished, candidate: Candidate) -> float:
    """Prefill seconds the prediction got wrong by expecting another reuse than the node reports: the prediction
    is judged on the prefill the node actually ran, so that a wrong guess of the prefix index does not end up in the
    node's calibration. The node counts its own tokens; the gateway estimates: compared as shares of the prompt."""
    if candidate.prefill_s_per_token is None or end.prompt_tokens <= 0:
        return 0.0
    estimate = end.decision.request.prompt_tokens
    reported = round(min(1.0, end.cached_tokens / end.prompt_tokens) * estimate)
    return (candidate.cached_tokens - reported) * candidate.prefill_s_per_token


class Settlement:
    """Each node's work checked against its receipt (whole-model segments; severe incidents for what fails),
    sampled for audit, and turned into settlement entries: one per (decision, node's part)."""

    def __init__(self, receipts: ReceiptChecker, auditor: Auditor) -> None:
        self.receipts = receipts
        self.auditor = auditor

    def settle(self, end: Finished) -> Settled:
        problems: list[str] = []
        entries: list[dict[str, Any]] = []
        for index, work in enumerate(end.work):
            check = self._check(end, work, problems)
            if check is None:
                continue
            entry = self.receipts.entry(
                decision_id=end.decision.decision_id,
                request_id=end.decision.request_id,
                model=end.decision.model,
                check=check,
                price_per_mtok=work.price_per_mtok,
                segment=index,
            )
            if work.layers is not None and not entry["detail"]:
                entry["detail"] = f"pipeline stage [{work.layers[0]}, {work.layers[1]}): tokens counted by the gateway"
            entries.append(entry)
        return Settled(tuple(problems), tuple(entries))

    def _check(self, end: Finished, work: NodeWork, problems: list[str]) -> ReceiptCheck | None:
        receipt = work.receipt
        if receipt is not None:
            check = self.receipts.check(work.node_id, receipt.job, list(receipt.ids), receipt.final, receipt.unnamed)
            problems += [f"{work.node_id[:12]}: {k}: {e}" for k, e in check.problems]
            if check.receipt is not None and check.ok:
                self.auditor.maybe_audit(
                    work.node_id,
                    receipt.job,
                    list(receipt.ids),
                    check.receipt,
                    receipt.text,
                    receipt.logprobs,
                    receipt.scored_tokens,
                )
            return check
        if not work.tokens:
            return None
        # A node that failed after sending tokens, or a pipeline stage (the gateway drives every step and counts
        # each token itself): paid from the gateway's count. A stage in the final chain of a finished answer is
        # settled as served; an embeddings answer on the count its node signed; anything else has no receipt
        # behind it.
        served = work.layers is not None and work.outcome == "ok" and end.status == "ok"
        check = ReceiptCheck(node_id=work.node_id, delivered=work.tokens, receipted=served or work.embedded)
        if work.claimed is not None:
            check.claimed = work.claimed
            check.problems.append(
                ("settlement", f"claims {work.claimed} input tokens, more than its inputs hold ({work.tokens} paid)")
            )
            problems.append(f"{work.node_id[:12]}: settlement: {check.problems[-1][1]}")
        return check


__all__ = [
    "DecisionLogSubscriber",
    "LedgerSubscriber",
    "MetricsSubscriber",
    "Scope",
    "Settlement",
    "Subscriber",
]
