"""The doctor for pipelines: where a pipelined answer's time per token went, from real per-stage timings.

Each stage node reports its own compute time for every step; the gateway measures each exchange's round trip
and the whole step. So a token's time splits into stage compute, transfer (round trip minus compute: the
wire, framing, signatures, queueing on the node) and the gateway's own share (sampling, bookkeeping). The
rules, in order:

1. communication overhead: transfer + gateway >= 30 % of the step time; the evidence names the stage with
   the largest transfer per step and the bytes it moves;
2. a slow stage: one stage's compute per layer >= 2x the fastest stage's (the plan gives it too many layers
   for its speed, or its device is busy);
3. healthy: compute dominates and the stages are balanced.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from gridserve.diagnostics.doctor import SUMMARY, Cause, Diagnosis

OVERHEAD_SHARE = 0.30
IMBALANCE = 2.0


@dataclass(frozen=True)
class StageView:
    node_id: str
    start: int
    end: int
    steps: int
    compute_s: float
    transfer_s: float
    sent_bytes: int
    received_bytes: int

    @classmethod
    def of(cls, d: dict[str, Any]) -> "StageView":
        return cls(
            str(d["node_id"]),
            int(d["layers"][0]),
            int(d["layers"][1]),
            int(d["steps"]),
            float(d["compute_s"]),
            float(d["transfer_s"]),
            int(d["sent_bytes"]),
            int(d["received_bytes"]),
        )


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms"


def diagnose_pipeline(stages: Sequence[StageView], steps: int, forward_s: float) -> Diagnosis:
    """`forward_s`: the gateway's wall time over the session's `steps` steps (all stages, in turn)."""
    if not stages or steps <= 0 or forward_s <= 0:
        return Diagnosis(Cause.HEALTHY, SUMMARY[Cause.HEALTHY], ("no pipeline steps to examine",), "")
    compute = sum(s.compute_s for s in stages)
    transfer = sum(s.transfer_s for s in stages)
    gateway = max(0.0, forward_s - compute - transfer)
    split = (
        f"per token: {_ms(forward_s / steps)} = compute {_ms(compute / steps)} + transfer {_ms(transfer / steps)} "
        f"+ gateway {_ms(gateway / steps)} over {len(stages)} stages"
    )
    if (transfer + gateway) / forward_s >= OVERHEAD_SHARE:
        worst = max(stages, key=lambda s: s.transfer_s / max(1, s.steps))
        per = max(1, worst.steps)
        line = (
            f"{(transfer + gateway) / forward_s:.0%} of each step is not compute; stage {worst.node_id[:12]} "
            f"[{worst.start}, {worst.end}) spends {_ms(worst.transfer_s / per)} per step on transfer, moving "
            f"{(worst.sent_bytes + worst.received_bytes) / per:,.0f} bytes"
        )
        check = (
            "put the stages on nodes with lower RTT between them, use fewer stages, or send activations as "
            "bfloat16; compare the stages' `compute_s` and `transfer_s` in GET /admin/pipelines"
        )
        return Diagnosis(Cause.PIPELINE_OVERHEAD, SUMMARY[Cause.PIPELINE_OVERHEAD], (line, split), check)
    per_layer = {s.node_id: s.compute_s / max(1, s.steps) / max(1, s.end - s.start) for s in stages}
    fastest = min(per_layer.values())
    slow = max(stages, key=lambda s: per_layer[s.node_id])
    if fastest > 0 and per_layer[slow.node_id] >= IMBALANCE * fastest:
        line = (
            f"stage {slow.node_id[:12]} [{slow.start}, {slow.end}) computes {_ms(per_layer[slow.node_id])} per "
            f"layer per step, {per_layer[slow.node_id] / fastest:.1f}x the fastest stage"
        )
        check = (
            f"run `gridserve doctor --node {slow.node_id}` (a busy or throttled device?), or re-plan so this node "
            "holds fewer layers"
        )
        return Diagnosis(Cause.COMPUTE_SATURATION, "a slow stage holds the pipeline back", (line, split), check)
    return Diagnosis(Cause.HEALTHY, SUMMARY[Cause.HEALTHY], (split,), "")


def diagnose_run(run: dict[str, Any]) -> Diagnosis:
    """A run as GET /admin/pipelines lists it."""
    stages = [StageView.of(s) for s in run.get("stages", [])]
    return diagnose_pipeline(stages, int(run.get("steps", 0)), float(run.get("forward_s", 0.0)))
