"""Per-node calibration: how a node's observed timings compare with the roofline.

Each observation gives ratios observed/predicted for TTFT and ITL. The first WARMUP observations are
averaged exactly (so a constant bias is learned at once), later ones are folded in with an exponential
moving average (weight ALPHA) so a node that changes (throttles, upgrades) is tracked. A node slower
than its spec is predicted slower from then on.
"""

from dataclasses import dataclass

WARMUP = 10
ALPHA = 0.2
TYPICAL_OUTPUT_TOKENS = 128.0
"""Output length assumed for a job ahead in a node's queue until the node's own answers are observed."""
MIN_FACTOR, MAX_FACTOR = 0.05, 50.0
"""Ratios are clamped: one wild sample (a GC pause, a clock jump) cannot poison the model."""


def _fold(current: float, ratio: float, samples: int) -> float:
    return _average(current, min(MAX_FACTOR, max(MIN_FACTOR, ratio)), samples)


def _average(current: float, value: float, samples: int) -> float:
    """The exact mean of the first WARMUP values (the prior goes at the first), then a moving average."""
    weight = 1.0 / (samples + 1) if samples < WARMUP else ALPHA
    return current + weight * (value - current)


@dataclass(frozen=True)
class Calibration:
    ttft_factor: float = 1.0
    itl_factor: float = 1.0
    samples: int = 0
    """Requests observed."""
    ttft_samples: int = 0
    itl_samples: int = 0
    """Observations folded into each factor (a one-token answer has no ITL)."""
    output_tokens: float = TYPICAL_OUTPUT_TOKENS
    """The node's typical answer length (tokens): how long a job ahead of a new one holds a batch slot. Learned
    from its answers, as the factors are: a queue priced at a fixed length misjudges a node whose traffic is
    short answers (or long ones) many times over."""

    def observe(
        self,
        *,
        predicted_ttft_s: float,
        observed_ttft_s: float,
        predicted_itl_s: float | None,
        observed_itl_s: float | None,
        output_tokens: int | None = None,
    ) -> "Calibration":
        """Fold one request's timings in. Predictions are the *uncalibrated* roofline figures."""
        ttft, ttft_n = self.ttft_factor, self.ttft_samples
        if predicted_ttft_s > 0 and observed_ttft_s > 0:
            ttft, ttft_n = _fold(ttft, observed_ttft_s / predicted_ttft_s, ttft_n), ttft_n + 1
        itl, itl_n = self.itl_factor, self.itl_samples
        if predicted_itl_s and observed_itl_s and predicted_itl_s > 0 and observed_itl_s > 0:
            itl, itl_n = _fold(itl, observed_itl_s / predicted_itl_s, itl_n), itl_n + 1
        out = self.output_tokens
        if output_tokens is not None and output_tokens > 0:
            out = _average(out, float(output_tokens), self.samples)
        return Calibration(
            ttft_factor=ttft,
            itl_factor=itl,
            samples=self.samples + 1,
            ttft_samples=ttft_n,
            itl_samples=itl_n,
            output_tokens=out,
        )
