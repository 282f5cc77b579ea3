"""What a node's card is, as far as the gateway can tell: the card it claims, what its micro-benchmark measured, and
what its observed timings showed.

- **Claimed**: the catalogue's card for its accelerator key or, for a card in no table, the card derived from the
  driver's figures it sent (catalog/derive.py).
- **Predicted** (`CardView.hw`): the claimed card at the measured figures: the performance model starts from the
  micro-benchmark (a measured copy at `COPY_REACH` of the claimed bandwidth is the claimed card at full speed).
- **Priced and classed** (`CardView.priced`): the card the tier floors, the class and the price read. For an honest
  node it is the predicted card, whose price per token is the claimed card's (a slower card's hour buys fewer
  tokens, and costs proportionally less). A node shown `MISREPRESENTATION_GAP` times or more slower than its claim
  (by its micro-benchmark, or its first observed answers: gateway/registry/claims.py) is re-classed to what it
  showed and paid for the speed it delivers: `gap` times less per token than the card it claimed (a node claiming an
  H100 that decodes at a sixth of one earns a sixth of an H100's price per token).

Throttling and load are not misrepresentation: the gap compares the node's timings with predictions that already
account for its reported clock and its load. A node claiming a CPU claims the floor: there is nothing slower to
re-class it to, and the catalogue's CPU figures are planning figures that calibration replaces, so a CPU claim is
never judged.
"""

from dataclasses import dataclass

from gridserve.catalog.derive import compute_share, derive_card, scaled, speed_share
from gridserve.catalog.hardware import HARDWARE, HardwareSpec
from gridserve.types import HardwareInfo

MISREPRESENTATION_GAP = 2.5
"""A node shown this many times slower than its claimed card misrepresents it: beyond a throttled card (a thermal
limit holds clocks at 50-60%, and its clock is reported) and beyond calibration's noise on a loaded host."""


@dataclass(frozen=True, slots=True)
class CardView:
    claimed: HardwareSpec
    hw: HardwareSpec
    """The card predictions use: the claimed one at its measured figures."""
    priced: HardwareSpec
    """The card the class, tier floors and price read."""
    gap: float = 1.0
    """The claimed card's speed over the speed shown (measured, then observed); 1.0: as claimed."""
    evidence: str = ""
    """Why the node is re-classed ("" when it is not)."""

    @property
    def misrepresented(self) -> bool:
        return self.gap >= MISREPRESENTATION_GAP and self.claimed.hw_class != "cpu"


def claimed_card(hardware: HardwareInfo) -> HardwareSpec | None:
    """The catalogue card the node names, else the card its driver figures describe, else None (unknown)."""
    known = HARDWARE.get(hardware.accelerator)
    if known is not None:
        return known
    if hardware.device is not None:
        return derive_card(hardware.device, key=hardware.accelerator)
    return None


def card_view(hardware: HardwareInfo, observed_gap: float = 1.0, observed_evidence: str = "") -> CardView | None:
    """The node's card as claimed, measured and observed (`observed_gap`: what its answers showed beyond the
    prediction from its measured figures; 1.0 until the gateway has judged them)."""
    claimed = claimed_card(hardware)
    if claimed is None:
        return None
    speed, compute = 1.0, 1.0
    if hardware.measured is not None:
        speed, compute = speed_share(claimed, hardware.measured), compute_share(claimed, hardware.measured)
    hw = scaled(claimed, speed=speed, compute=compute, cost=speed)
    gap = observed_gap / speed
    if gap < MISREPRESENTATION_GAP or claimed.hw_class == "cpu":
        return CardView(claimed=claimed, hw=hw, priced=hw, gap=gap)
    shown = 1.0 / gap
    priced = scaled(claimed, speed=shown, compute=min(compute, shown), cost=shown * shown, reclass=True)
    if observed_evidence:
        evidence = observed_evidence
    else:
        m = hardware.measured
        assert m is not None
        evidence = (
            f"claims {claimed.name} ({claimed.bandwidth_gbs:.0f} GB/s); its micro-benchmark measured "
            f"{m.bandwidth_gbs:.0f} GB/s, {gap:.1f}x slower"
        )
    return CardView(claimed=claimed, hw=hw, priced=priced, gap=gap, evidence=evidence)
