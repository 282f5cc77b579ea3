"""Prefix-cache-aware routers gridserve is compared with (issue 16), as plugins over the same `cached_tokens`
the default profile reads (the caller's prefix index), so that a comparison is of policy, not of information:

- `prefix-load`, llm-d's default scheduling profile (gateway-api-inference-extension's default plugins): the
  prefix-cache scorer (share of the prompt cached on the node) weighted 3, the KV-cache-utilisation scorer 2 and
  the queue scorer 2, max score wins. Blind to hardware speed. llm-d normalises the queue over the pool's
  minimum and maximum; here it is `1 / (1 + waiting)`, absolute like every scorer (a node's score does not
  depend on the pool: scorers.py).
- `cache-aware`, SGLang's router (cache_aware policy, defaults cache_threshold 0.5, balance_abs_threshold 32,
  balance_rel_threshold 1.0001): when the load is imbalanced (max - min > abs and max > min x rel, over requests
  in flight) the shortest queue; else the longest prefix match if it covers more than the threshold of the
  prompt; else (SGLang: the worker with the smallest radix tree, a figure the index does not keep) the
  shortest queue.
- `kv-overlap`, Dynamo's KV router: cost = overlap_score_weight (1.0) x prefill blocks not cached + decode blocks
  active (the node's KV in use, the new request's included), lowest cost wins (router temperature 0).

KV in use is what a node's telemetry reports: memory used less the model's weights (a serving engine's KV
usage; the simulator reports the KV of each node's batch), over the KV bytes a token takes in every layer
(M_KV_PER_TOKEN: for a model with sliding windows, tokens as full attention would hold them; the utilisation,
a ratio of bytes, is the same either way).
"""

import random
from dataclasses import dataclass

import numpy as np

from gridserve.scheduler.context import Context
from gridserve.scheduler.plugins import PICKERS, SCORERS, register
from gridserve.scheduler.ranking import Ranked
from gridserve.scheduler.snapshot import (
    C_ACTIVE,
    C_HAS_HW,
    C_OUTSTANDING,
    C_QUEUED,
    C_SLOTS,
    M_KV_PER_TOKEN,
    M_MEM_WEIGHTS,
    NodeSnapshot,
)
from gridserve.scheduler.vector import Array, Columns

BLOCK_TOKENS = 512
"""Tokens per block in `kv-overlap`'s cost (Dynamo counts KV blocks; the argmin is the same at any size)."""


def _share_cached(ctx: Context, cols: Columns) -> Array:
    """Share of the prompt each node probably holds, in [0, 1]."""
    return np.clip(cols.reused(ctx) / max(1, ctx.request.prompt_tokens), 0.0, 1.0)


def _kv_tokens(ctx: Context, cols: Columns) -> tuple[Array, Array, Array]:
    """Per node, from its telemetry: (KV tokens in use, KV tokens it has room for, requests in its batch); zeros
    without telemetry or a catalogue model."""

    def make() -> tuple[Array, Array, Array]:
        n = len(cols)
        used, total, active = np.zeros(n), np.zeros(n), np.zeros(n)
        for j, node in enumerate(cols.nodes):
            tele = node.telemetry
            if tele is not None and tele.memory_total_bytes:
                used[j], total[j], active[j] = tele.memory_used_bytes, tele.memory_total_bytes, tele.active_requests
        per_token = cols.mcol(M_KV_PER_TOKEN)
        weights = cols.mcol(M_MEM_WEIGHTS)
        ok = (per_token > 0) & (total > 0) & ~np.isnan(weights)
        with np.errstate(divide="ignore", invalid="ignore"):
            in_use = np.where(ok, np.maximum(0.0, used - weights) / per_token, 0.0)
            room = np.where(ok, np.maximum(0.0, total - weights) / per_token, 0.0)
        return np.asarray(in_use), np.asarray(room), active

    return cols.cached("kv-tokens", make)


@register(SCORERS, "prefix-cache")
@dataclass
class PrefixCacheScorer:
    """Share of the prompt the node probably holds in its prefix cache (llm-d's prefix-cache scorer)."""

    name: str = "prefix-cache"

    def unit_for(self, node: NodeSnapshot, raw: float) -> str:
        return "prompt tokens cached"

    def score(self, ctx: Context, cols: Columns) -> tuple[Array, Array]:
        return _share_cached(ctx, cols), cols.reused(ctx)


@register(SCORERS, "queue-depth")
@dataclass
class QueueDepthScorer:
    """Fewer requests waiting for a batch slot is better (llm-d's queue scorer, scored absolutely)."""

    name: str = "queue-depth"

    def unit_for(self, node: NodeSnapshot, raw: float) -> str:
        return "requests waiting"

    def score(self, ctx: Context, cols: Columns) -> tuple[Array, Array]:
        slots = np.where(cols.col(C_HAS_HW) > 0, np.maximum(1.0, cols.col(C_SLOTS)), 1.0)
        waiting = cols.col(C_QUEUED) + np.maximum(0.0, cols.col(C_ACTIVE) - slots)
        return 1.0 / (1.0 + waiting), waiting


@register(SCORERS, "kv-utilisation")
@dataclass
class KvUtilisationScorer:
    """Less of the node's KV memory in use is better (llm-d's KV-cache-utilisation scorer: 1 - usage)."""

    name: str = "kv-utilisation"

    def unit_for(self, node: NodeSnapshot, raw: float) -> str:
        return "share of KV memory in use"

    def score(self, ctx: Context, cols: Columns) -> tuple[Array, Array]:
        in_use, room, _ = _kv_tokens(ctx, cols)
        with np.errstate(divide="ignore", invalid="ignore"):
            usage = np.where(room > 0, np.minimum(1.0, in_use / room), 0.0)
        return 1.0 - usage, usage


@register(SCORERS, "kv-cost")
@dataclass
class KvCostScorer:
    """Dynamo's KV router cost, lower is better: overlap_weight x prompt blocks the node must prefill + KV blocks
    it would hold in its batch (the requests in flight on it, at its batch's mean size for any that wait, and
    this one's prompt). Normalised as 1 / (1 + cost / the prompt's blocks): monotone, so the lowest cost wins."""

    overlap_weight: float = 1.0
    name: str = "kv-cost"

    def unit_for(self, node: NodeSnapshot, raw: float) -> str:
        return "KV blocks (prefill x weight + decode)"

    def score(self, ctx: Context, cols: Columns) -> tuple[Array, Array]:
        prompt = float(ctx.request.prompt_tokens)
        prefill = np.maximum(0.0, prompt - cols.reused(ctx)) / BLOCK_TOKENS
        in_use, _, active = _kv_tokens(ctx, cols)
        outstanding = cols.col(C_OUTSTANDING)
        decode = (in_use * np.maximum(1.0, outstanding / np.maximum(1.0, active)) + prompt) / BLOCK_TOKENS
        cost = self.overlap_weight * prefill + decode
        return 1.0 / (1.0 + cost / max(1.0, prompt / BLOCK_TOKENS)), cost


@register(PICKERS, "cache-aware")
@dataclass
class CacheAwarePicker:
    """SGLang's cache-aware routing over the ranked nodes (rank = longest prefix match first, ties at random):
    the shortest queue when the load is imbalanced, else the longest match when it covers more than
    `cache_threshold` of the prompt, else the shortest queue."""

    cache_threshold: float = 0.5
    balance_abs_threshold: int = 32
    balance_rel_threshold: float = 1.0001
    name: str = "cache-aware"

    def pick(self, ctx: Context, ranked: Ranked, rng: random.Random) -> tuple[int, str]:
        order, cols = ranked.order, ranked.cols
        load = cols.col(C_OUTSTANDING)
        mine = load[order.eligible]
        low, high = float(mine.min()), float(mine.max())
        shortest = order.first_where(load == low, 0)
        assert shortest is not None  # the least-loaded eligible node
        if high - low > self.balance_abs_threshold and high > low * self.balance_rel_threshold:
            return shortest, f"load imbalanced ({high:.0f} vs {low:.0f} in flight): shortest queue"
        share = float(_share_cached(ctx, cols)[order[0]])
        if share > self.cache_threshold:
            return 0, f"longest prefix match ({share:.0%} of the prompt cached)"
        return shortest, f"prefix match {share:.0%} <= {self.cache_threshold:.0%}: shortest queue"


__all__ = ["CacheAwarePicker", "KvCostScorer", "KvUtilisationScorer", "PrefixCacheScorer", "QueueDepthScorer"]
