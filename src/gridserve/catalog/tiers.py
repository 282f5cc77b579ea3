"""Model tiers: which hardware classes may serve a request, the decode floor, and the latency SLO.

`standard` (the default) has no floor: a slow node is ranked low, never refused, so a model served by one
slow node (a CPU running Gemma 270M at ~10 tokens/s, slower when the host is busy) stays available.

The interactive floor of 20 tokens/s is about twice silent reading speed (~4-5 words/s, ~1.3 tokens per
word); its TTFT/TPOT targets (2 s, 100 ms) are the defaults the simulator issue names for SLO attainment.
"""

from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class Tier:
    name: str
    hw_classes: frozenset[str]
    min_tokens_per_s: float
    ttft_slo_s: float
    tpot_slo_s: float
    reference_price_per_mtok: float
    """A price that scores 0.5 on the price scorer (USD per million tokens)."""


ALL_CLASSES = frozenset({"datacenter", "consumer-high", "consumer", "apple", "cpu"})

TIERS: dict[str, Tier] = {
    tier.name: tier
    for tier in (
        Tier(
            name="interactive",
            hw_classes=frozenset({"datacenter", "consumer-high"}),
            min_tokens_per_s=20.0,
            ttft_slo_s=2.0,
            tpot_slo_s=0.1,
            reference_price_per_mtok=1.0,
        ),
        Tier(
            name="standard",
            hw_classes=ALL_CLASSES,
            min_tokens_per_s=0.0,  # the default tier excludes no node for speed: it ranks by it
            ttft_slo_s=5.0,
            tpot_slo_s=0.2,
            reference_price_per_mtok=0.5,
        ),
        Tier(
            name="batch",
            hw_classes=ALL_CLASSES,
            min_tokens_per_s=0.0,
            ttft_slo_s=60.0,
            tpot_slo_s=2.0,
            reference_price_per_mtok=0.25,
        ),
    )
}
DEFAULT_TIER = "standard"
