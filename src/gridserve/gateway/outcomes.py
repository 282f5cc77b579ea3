"""What a finished request teaches the gateway: a job outcome for the reliability ledger (inside its SLO or
not) and a calibration sample for the performance model."""

import time

from gridserve.gateway.dispatch import NodeStream
from gridserve.gateway.membership import Membership
from gridserve.reliability import EventKind, NodeEvent
from gridserve.types.scheduling import Decision


def observe_outcome(
    membership: Membership, decision: Decision, stream: NodeStream, *, status: str, completion_tokens: int
) -> None:
    if status == "cancelled":  # the client went away: says nothing about the node
        return
    node_id = stream.node_id
    now = time.time()
    if status != "ok":
        membership.note(NodeEvent(node_id=node_id, kind=EventKind.JOB_FAILED, at=now, detail="failed mid-stream"))
        return
    ttft = stream.first_at - stream.started
    itl = (time.monotonic() - stream.first_at) / (completion_tokens - 1) if completion_tokens > 1 else None
    needs = decision.requirements
    within = ttft <= float(needs["ttft_slo_s"]) and (itl is None or itl <= float(needs["tpot_slo_s"]))
    membership.note(
        NodeEvent(
            node_id=node_id,
            kind=EventKind.JOB_COMPLETED,
            at=now,
            within_slo=within,
            detail=f"ttft {ttft:.3f} s, itl {itl or 0:.4f} s",
        )
    )
    record = membership.nodes.get(node_id)
    candidate = decision.candidate(node_id)
    if record is None or candidate is None or candidate.predicted_ttft_s is None:
        return
    ttft_factor, itl_factor = candidate.calibration
    record.calibration = record.calibration.observe(
        predicted_ttft_s=candidate.predicted_ttft_s / ttft_factor,
        observed_ttft_s=ttft,
        predicted_itl_s=(candidate.predicted_itl_s or 0.0) / itl_factor,
        observed_itl_s=itl,
    )
