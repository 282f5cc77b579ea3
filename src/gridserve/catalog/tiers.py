"""Model tiers: which hardware classes may serve a request, the decode floor, and the latency SLO.

`standard` (the default) has no floor: a slow node is ranked low, never refused, so a model served by one
slow node (a CPU running Gemma 270M at ~10 tokens/s, slower when the host is busy) stays available.

Tiers name figures, not cards: the interactive tier asks for a card with at least 300 GB/s of memory bandwidth and
50 TFLOPS of dense FP16 (catalog/derive.py's consumer-high figures: every datacenter and consumer-high card of the
catalogue, from a T4 up, and any card no table names whose driver figures reach them; not a CPU or an Apple GPU).
A node re-classed for misrepresenting its card is held to the figures it showed (catalog/claims.py).

The interactive floor of 20 tokens/s is about twice silent reading speed (~4-5 words/s, ~1.3 tokens per
word); its TTFT/TPOT targets (2 s, 100 ms) are the defaults the simulator issue names for SLO attainment.
"""

from dataclasses import dataclass

from gridserve.catalog.derive import CONSUMER_HIGH_BANDWIDTH_GBS, CONSUMER_HIGH_TFLOPS


@dataclass(frozen=True, kw_only=True)
class Tier:
    name: str
    min_bandwidth_gbs: float = 0.0
    min_fp16_tflops: float = 0.0
    """Card figures a node must have (its priced card's: catalog/claims.py); a node whose card is unknown has none."""
    min_tokens_per_s: float
    ttft_slo_s: float
    tpot_slo_s: float
    reference_price_per_mtok: float
    """A price that scores 0.5 on the price scorer (USD per million tokens)."""

    def admits(self, bandwidth_gbs: float, fp16_tflops: float) -> bool:
        """Whether a card with these figures may serve this tier (NaN figures, an unknown card: never)."""
        return bandwidth_gbs >= self.min_bandwidth_gbs and fp16_tflops >= self.min_fp16_tflops

    def describe(self) -> str:
        if self.min_bandwidth_gbs <= 0 and self.min_fp16_tflops <= 0:
            return f"tier {self.name} admits any known card"
        return (
            f"tier {self.name} needs a card of at least {self.min_bandwidth_gbs:g} GB/s and "
            f"{self.min_fp16_tflops:g} FP16 TFLOPS"
        )


ALL_CLASSES = frozenset({"datacenter", "consumer-high", "consumer", "apple", "cpu"})
"""The classes a card may be described as (catalog/derive.py's `classify`): shown, not used to admit."""

TIERS: dict[str, Tier] = {
    tier.name: tier
    for tier in (
        Tier(
            name="interactive",
            min_bandwidth_gbs=CONSUMER_HIGH_BANDWIDTH_GBS,
            min_fp16_tflops=CONSUMER_HIGH_TFLOPS,
            min_tokens_per_s=20.0,
            ttft_slo_s=2.0,
            tpot_slo_s=0.1,
            reference_price_per_mtok=1.0,
        ),
        Tier(
            name="standard",
            min_tokens_per_s=0.0,  # the default tier excludes no node for speed: it ranks by it
            ttft_slo_s=5.0,
            tpot_slo_s=0.2,
            reference_price_per_mtok=0.5,
        ),
        Tier(
            name="batch",
            min_tokens_per_s=0.0,
            ttft_slo_s=60.0,
            tpot_slo_s=2.0,
            reference_price_per_mtok=0.25,
        ),
    )
}
DEFAULT_TIER = "standard"
