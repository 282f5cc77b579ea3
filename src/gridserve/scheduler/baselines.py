"""The routing policies gridserve is compared with (issue: the simulator), as ordinary plugins and profiles:

- `round-robin`: the eligible nodes in turn (a picker with a counter);
- `random`: uniformly at random among eligible nodes;
- `least-loaded`: fewest requests in flight (`outstanding` scorer);
- `capacity-only`: static best fit of model size to VRAM, nothing else (`vram-fit` scorer) — the approach the
  source documents criticise;
- `petals-like`: highest advertised throughput (`advertised-throughput`: the card's unloaded decode speed);
- `latency-ewma`: lowest moving-average observed latency, as LiteLLM's latency-based routing (`latency-ewma`
  scorer; a node not yet observed counts as fastest, so each is tried);
- `prefix-load`, `cache-aware`, `kv-overlap`: llm-d's, SGLang's and Dynamo's prefix-cache-aware routers
  (scheduler/prefix_baselines.py).

Each baseline keeps only the filters a naive router needs not to crash a node (state, model, context, memory).
"""

import random
from dataclasses import dataclass, field

import numpy as np

from gridserve.scheduler.context import Context
from gridserve.scheduler.plugins import PICKERS, SCORERS, register
from gridserve.scheduler.ranking import Ranked
from gridserve.scheduler.snapshot import C_LATENCY_EWMA, C_MEMORY, C_OUTSTANDING, NodeSnapshot
from gridserve.scheduler.vector import Array, Columns


@register(SCORERS, "constant")
@dataclass
class ConstantScorer:
    """Every node the same (for pickers that ignore scores)."""

    name: str = "constant"

    def unit_for(self, node: NodeSnapshot, raw: float) -> str:
        return "none"

    def score(self, ctx: Context, cols: Columns) -> tuple[Array, Array]:
        n = len(cols.nodes)
        return np.full(n, 0.5), np.zeros(n)


@register(SCORERS, "outstanding")
@dataclass
class OutstandingScorer:
    """Fewer requests in flight from this gateway is better (least-loaded)."""

    name: str = "outstanding"

    def unit_for(self, node: NodeSnapshot, raw: float) -> str:
        return "requests in flight"

    def score(self, ctx: Context, cols: Columns) -> tuple[Array, Array]:
        outstanding = cols.col(C_OUTSTANDING)
        return 1.0 / (1.0 + outstanding), outstanding


@register(SCORERS, "vram-fit")
@dataclass
class VramFitScorer:
    """The tightest fit of the model's weights into device memory wins (static capacity matching)."""

    name: str = "vram-fit"

    def unit_for(self, node: NodeSnapshot, raw: float) -> str:
        return "share of device memory the weights fill"

    def score(self, ctx: Context, cols: Columns) -> tuple[Array, Array]:
        memory = cols.col(C_MEMORY)
        if ctx.model is None:
            return np.zeros(len(cols.nodes)), np.zeros(len(cols.nodes))
        with np.errstate(divide="ignore", invalid="ignore"):
            fill = np.where(memory > 0, ctx.model.weight_bytes("float16", "none") / memory, 0.0)
        return np.minimum(1.0, fill), fill


@register(SCORERS, "advertised-throughput")
@dataclass
class AdvertisedThroughputScorer:
    """The card's unloaded decode speed for the model, whatever it is doing now (Petals-style)."""

    name: str = "advertised-throughput"

    def unit_for(self, node: NodeSnapshot, raw: float) -> str:
        return "tokens/s advertised"

    def score(self, ctx: Context, cols: Columns) -> tuple[Array, Array]:
        _, itl = cols.prediction(ctx, loaded=False)
        with np.errstate(divide="ignore", invalid="ignore"):
            tps = np.where(itl > 0, 1.0 / itl, 0.0)  # NaN (no prediction) compares False
        return tps / (tps + 100.0), tps


@register(SCORERS, "latency-ewma")
@dataclass
class LatencyEwmaScorer:
    """Lower moving-average observed time to first token is better; unobserved nodes score best."""

    scale_s: float = 0.5
    name: str = "latency-ewma"

    def unit_for(self, node: NodeSnapshot, raw: float) -> str:
        return "s, moving average of observed TTFT"

    def score(self, ctx: Context, cols: Columns) -> tuple[Array, Array]:
        ewma = cols.col(C_LATENCY_EWMA)
        seen = ~np.isnan(ewma)
        return np.where(seen, 1.0 / (1.0 + ewma / self.scale_s), 1.0), np.where(seen, ewma, 0.0)


@register(PICKERS, "round-robin")
@dataclass
class RoundRobinPicker:
    """The eligible nodes in turn, in node-id order (a counter per picker)."""

    name: str = "round-robin"
    counter: list[int] = field(default_factory=lambda: [0])

    def pick(self, ctx: Context, ranked: Ranked, rng: random.Random) -> tuple[int, str]:
        names = ranked.node_ids()
        order = sorted(range(len(ranked)), key=names.__getitem__)
        turn = self.counter[0] % len(order)
        self.counter[0] += 1
        return order[turn], f"round robin (turn {turn + 1} of {len(order)})"


BASELINES = (
    "round-robin",
    "random",
    "least-loaded",
    "capacity-only",
    "latency-ewma",
    "petals-like",
    "prefix-load",
    "cache-aware",
    "kv-overlap",
)
"""Every packaged baseline profile; the last three route on the prefix index (scheduler/prefix_baselines.py)."""
LATENCY_EWMA_ALPHA = 0.3
"""Weight of the newest observation in the moving average (gateway and simulator)."""


def ewma(previous: float | None, observed: float) -> float:
    return observed if previous is None else previous + LATENCY_EWMA_ALPHA * (observed - previous)


__all__ = ["BASELINES", "ewma"]
