"""Per-node calibration: how a node's observed timings compare with the roofline.

Each observation gives ratios observed/predicted for TTFT and ITL. The first WARMUP observations are
averaged exactly (so a constant bias is learned at once), later ones are folded in with an exponential
moving average (weight ALPHA) so a node that changes (throttles, upgrades) is tracked. A node slower
than its spec is predicted slower from then on.
"""

from dataclasses import dataclass

WARMUP = 10
ALPHA = 0.2
MIN_FACTOR, MAX_FACTOR = 0.05, 50.0
"""Ratios are clamped: one wild sample (a GC pause, a clock jump) cannot poison the model."""


def _fold(current: float, ratio: float, samples: int) -> float:
    ratio = min(MAX_FACTOR, max(MIN_FACTOR, ratio))
    weight = 1.0 / (samples + 1) if samples < WARMUP else ALPHA
    return current + weight * (ratio - current)


@dataclass(frozen=True)
class Calibration:
    ttft_factor: float = 1.0
    itl_factor: float = 1.0
    samples: int = 0

    def observe(
        self,
        *,
        predicted_ttft_s: float,
        observed_ttft_s: float,
        predicted_itl_s: float | None,
        observed_itl_s: float | None,
    ) -> "Calibration":
        """Fold one request's timings in. Predictions are the *uncalibrated* roofline figures."""
        ttft = self.ttft_factor
        if predicted_ttft_s > 0 and observed_ttft_s > 0:
            ttft = _fold(ttft, observed_ttft_s / predicted_ttft_s, self.samples)
        itl = self.itl_factor
        if predicted_itl_s and observed_itl_s and predicted_itl_s > 0 and observed_itl_s > 0:
            itl = _fold(itl, observed_itl_s / predicted_itl_s, self.samples)
        return Calibration(ttft_factor=ttft, itl_factor=itl, samples=self.samples + 1)
