"""Whether a node's card is what it claims, judged on its micro-benchmark when it registers and on its first
observed answers (catalog/claims.py says what a re-classed node is predicted, classed and paid as).

The observed check reads the node's calibration: its ITL factor is observed over predicted decode time, and the
predictions already account for the node's reported clock (a throttled card says so, and is predicted slower) and
its load. After `CLAIM_SAMPLES` answers with a decode time, a factor of `MISREPRESENTATION_GAP` or more is a
capability misrepresentation: the node is re-classed at the speed it showed and the incident is recorded with the
evidence. Below it, the claim holds and is not judged again for this registration: a card that served at its speed
and slows later is degraded (a hot room, a neighbour on the card), which calibration and the doctor handle, not a
false claim. A node found misrepresenting its card a second time (registered again with the same claim, or caught
by its benchmark and then by its answers) follows the severe-incident path: quarantine, then a ban.
"""

from dataclasses import dataclass

from gridserve.catalog.claims import MISREPRESENTATION_GAP, CardView
from gridserve.perfmodel import Calibration
from gridserve.reliability import EventKind, NodeEvent, Severity

MIN_JUDGED_ITL_S = 0.004
"""Answers predicted to decode faster than this do not judge a claim: a step that short is set by fixed per-token
costs (kernel launches, the engine's own loop), not by the card's bandwidth, so a fast card serving a small model
would look slower than its roofline whatever it is (an H100 decoding a 270M model)."""
CLAIM_SAMPLES = 8
"""Answers with a decode time observed before the claim is judged (the calibration averages its first ten exactly, so
eight give a mean, not one sample's noise)."""
JUDGING, HELD, MISREPRESENTED = "judging", "held", "misrepresented"


@dataclass(frozen=True, slots=True)
class Verdict:
    claim: str
    """JUDGING (not enough answers yet), HELD or MISREPRESENTED."""
    gap: float = 1.0
    """How much slower than its (measured) card the answers showed the node: the observed gap it is re-classed by."""
    evidence: str = ""


def judge(
    card: CardView | None, calibration: Calibration, clock_ratio: float | None, predicted_itl_s: float
) -> Verdict:
    """The claim of a node not judged yet, from its calibration so far (`predicted_itl_s`: the latest answer's
    uncalibrated prediction; too short a one does not judge). A CPU claim is never judged (catalog/claims.py)."""
    if card is None or card.claimed.hw_class == "cpu":
        return Verdict(HELD)
    if calibration.itl_samples < CLAIM_SAMPLES or predicted_itl_s < MIN_JUDGED_ITL_S:
        return Verdict(JUDGING)
    gap = calibration.itl_factor
    if gap * card.gap < MISREPRESENTATION_GAP:
        return Verdict(HELD)
    clock = f", its clock at {clock_ratio:.2f} of maximum" if clock_ratio is not None else ""
    evidence = (
        f"claims {card.claimed.name}; its first {calibration.itl_samples} answers decoded {gap:.1f}x slower than "
        f"predicted for it (under its reported load{clock})"
    )
    return Verdict(MISREPRESENTED, gap=gap, evidence=evidence)


def incident(node_id: str, evidence: str, at: float, *, repeat: bool) -> NodeEvent:
    """The ledger's record of a misrepresentation: minor the first time (it lowers the score, the node is
    re-classed), severe when it is a repeat."""
    detail = f"capability misrepresentation: {evidence}"
    if repeat:
        return NodeEvent.severe(node_id, detail + " (again)", at)
    return NodeEvent(node_id=node_id, kind=EventKind.INCIDENT, at=at, severity=Severity.MINOR, detail=detail)
