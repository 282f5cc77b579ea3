"""How often a node's completions are re-executed: the gateway's auditor and the simulator use this one rule."""

from gridserve.reliability import ReliabilitySummary


def audit_probability(summary: ReliabilitySummary, *, rate: float, new_rate: float, floor: float) -> float:
    """`new_rate` while the node has little history or is not yet vetted (or `rate` where that is higher: a new
    node is never audited less than an established one); else `rate`, raised for low reliability
    (x (1 + 4 (1 - score))); never below `floor`, never above 1."""
    if summary.is_new or not summary.vetted:
        return min(1.0, max(floor, new_rate, rate))
    return min(1.0, max(floor, rate * (1.0 + 4.0 * (1.0 - summary.score))))
