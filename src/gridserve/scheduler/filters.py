"""Filters: each removes nodes that *cannot* run the request, with a reason that carries the numbers."""

from dataclasses import dataclass

import numpy as np

from gridserve.catalog.models import DTYPE_BYTES
from gridserve.scheduler.context import Context
from gridserve.scheduler.plugins import FILTERS, register
from gridserve.scheduler.snapshot import (
    C_BLOCKING,
    C_CLASS,
    C_HEARTBEAT,
    C_MEMORY,
    C_SERVING,
    CLASS_CODES,
    M_CONTEXT,
    M_DTYPE_OK,
    M_KV_PER_TOKEN,
    M_LISTED,
    M_MEM_WEIGHTS,
    NodeSnapshot,
)
from gridserve.scheduler.vector import Columns, Mask
from gridserve.types import NodeState

GIB = 2**30
SERVING = frozenset({NodeState.UP, NodeState.SUSPECT, NodeState.PROBATION})
BLOCKING = frozenset({"ejected", "quarantined", "banned"})


@register(FILTERS, "node-state")
@dataclass
class NodeStateFilter:
    """Down nodes (membership) and ejected, quarantined or banned nodes (reliability) are excluded."""

    name: str = "node-state"

    def reject(self, ctx: Context, node: NodeSnapshot) -> str | None:
        if node.state not in SERVING:
            return f"node is {node.state.value}"
        rel = node.reliability
        if rel is not None and rel.state.value in BLOCKING:
            return f"node is {rel.state.value}: {rel.reason}" if rel.reason else f"node is {rel.state.value}"
        return None

    def mask(self, ctx: Context, cols: Columns) -> Mask:
        return np.asarray((cols.col(C_SERVING) == 0) | (cols.col(C_BLOCKING) > 0))


@register(FILTERS, "telemetry-freshness")
@dataclass
class TelemetryFreshnessFilter:
    max_age_s: float = 10.0
    name: str = "telemetry-freshness"

    def reject(self, ctx: Context, node: NodeSnapshot) -> str | None:
        age = ctx.now - node.last_heartbeat
        if age > self.max_age_s:
            return f"telemetry is {age:.1f} s old (limit {self.max_age_s:.0f} s)"
        return None

    def mask(self, ctx: Context, cols: Columns) -> Mask:
        return np.asarray(ctx.now - cols.col(C_HEARTBEAT) > self.max_age_s)


@register(FILTERS, "model-served")
@dataclass
class ModelServedFilter:
    name: str = "model-served"

    def reject(self, ctx: Context, node: NodeSnapshot) -> str | None:
        model = ctx.request.model
        if model in node.static.offers or model in node.static.loadable:
            return None
        return f"does not serve {model} (serves {', '.join(sorted(node.static.offers)) or 'nothing'})"

    def mask(self, ctx: Context, cols: Columns) -> Mask:
        return np.asarray(cols.mcol(M_LISTED) == 0)


@register(FILTERS, "context-fit")
@dataclass
class ContextFitFilter:
    name: str = "context-fit"

    def reject(self, ctx: Context, node: NodeSnapshot) -> str | None:
        offer = ctx.offer(node)
        limit = offer.max_context if offer else (ctx.model.max_context if ctx.model else None)
        need = ctx.request.prompt_tokens + ctx.request.max_tokens
        if limit is not None and need > limit:
            return f"needs {need} tokens of context, serves {limit}"
        return None

    def mask(self, ctx: Context, cols: Columns) -> Mask:
        need = ctx.request.prompt_tokens + ctx.request.max_tokens
        return np.asarray(need > cols.mcol(M_CONTEXT))


@register(FILTERS, "dtype-supported")
@dataclass
class DtypeFilter:
    """The node's precision and quantization must be ones its hardware runs (e.g. FP8 needs Ada or Hopper)."""

    name: str = "dtype-supported"

    def reject(self, ctx: Context, node: NodeSnapshot) -> str | None:
        offer, hw = ctx.offer(node), node.static.hw
        if offer is None or hw is None:
            return None
        if offer.dtype in DTYPE_BYTES and offer.dtype not in hw.dtypes:
            return f"{offer.dtype} is not supported on {hw.name} ({hw.arch}: {', '.join(sorted(hw.dtypes))})"
        if offer.quantization not in ("none", "unknown") and offer.quantization not in hw.quantizations:
            return f"{offer.quantization} is not supported on {hw.name} ({hw.arch})"
        return None

    def mask(self, ctx: Context, cols: Columns) -> Mask:
        return np.asarray(cols.mcol(M_DTYPE_OK) == 0)


@register(FILTERS, "memory-fit")
@dataclass
class MemoryFitFilter:
    """Weights at the node's precision + KV cache for prompt and max_tokens + a margin must fit in memory.
    Momentary memory pressure (KV caches of requests in flight) is load, not capability: such a node queues
    the request, and the load scorer and the queueing prediction account for it."""

    margin: float = 0.10
    name: str = "memory-fit"

    def reject(self, ctx: Context, node: NodeSnapshot) -> str | None:
        if ctx.model is None:
            return None
        offer = ctx.offer(node)
        dtype = offer.dtype if offer and offer.dtype in DTYPE_BYTES else "float16"
        quant = offer.quantization if offer and offer.quantization != "unknown" else "none"
        tokens = ctx.request.prompt_tokens + ctx.request.max_tokens
        kv = ctx.model.kv_bytes_per_token(dtype if dtype != "fp8" else "float16") * tokens
        weights = ctx.model.weight_bytes(dtype, quant)
        have = node.static.memory_bytes
        need = (weights + kv) * (1 + self.margin)
        if have and need > have:
            return (
                f"needs {need / GIB:.1f} GiB ({ctx.model.name} {quant if quant != 'none' else dtype} weights "
                f"{weights / GIB:.1f} GiB + KV for {tokens} tokens {kv / GIB:.2f} GiB + {self.margin:.0%}), "
                f"has {have / GIB:.1f} GiB"
            )
        return None

    def mask(self, ctx: Context, cols: Columns) -> Mask:
        if ctx.model is None:
            return np.zeros(len(cols.nodes), dtype=bool)
        tokens = ctx.request.prompt_tokens + ctx.request.max_tokens
        need = (cols.mcol(M_MEM_WEIGHTS) + cols.mcol(M_KV_PER_TOKEN) * tokens) * (1 + self.margin)
        have = cols.col(C_MEMORY)
        return np.asarray((have > 0) & (need > have))


@register(FILTERS, "runtime")
@dataclass
class RuntimeFilter:
    """The request may restrict engines (e.g. only nodes fronting vLLM via openai-upstream)."""

    name: str = "runtime"

    def reject(self, ctx: Context, node: NodeSnapshot) -> str | None:
        allowed = ctx.request.engines
        engine = node.capability.engine
        if allowed and engine not in allowed and engine.split(":")[0] not in allowed:
            return f"engine {engine} not among the allowed {', '.join(allowed)}"
        return None

    def mask(self, ctx: Context, cols: Columns) -> Mask:
        if not ctx.request.engines:
            return np.zeros(len(cols.nodes), dtype=bool)
        return np.array([self.reject(ctx, node) is not None for node in cols.nodes], dtype=bool)


@register(FILTERS, "tier-hardware")
@dataclass
class TierHardwareFilter:
    name: str = "tier-hardware"

    def reject(self, ctx: Context, node: NodeSnapshot) -> str | None:
        if node.static.hw_class not in ctx.tier.hw_classes:
            return (
                f"tier {ctx.tier.name} allows {', '.join(sorted(ctx.tier.hw_classes))}; node is {node.static.hw_class}"
            )
        return None

    def mask(self, ctx: Context, cols: Columns) -> Mask:
        allowed = np.array([name in ctx.tier.hw_classes for name in CLASS_CODES], dtype=bool)
        return np.asarray(~allowed[cols.col(C_CLASS).astype(np.int64)])


@register(FILTERS, "throughput-floor")
@dataclass
class ThroughputFloorFilter:
    name: str = "throughput-floor"

    def reject(self, ctx: Context, node: NodeSnapshot) -> str | None:
        floor = ctx.tier.min_tokens_per_s
        pred = ctx.unloaded_prediction(node)  # capability, not momentary load (load is scored, and queues)
        if floor <= 0 or pred is None:
            return None
        if pred.decode_tokens_per_s < floor:
            return f"predicted {pred.decode_tokens_per_s:.1f} tokens/s, tier {ctx.tier.name} needs {floor:.0f}"
        return None

    def mask(self, ctx: Context, cols: Columns) -> Mask:
        floor = ctx.tier.min_tokens_per_s
        if floor <= 0:
            return np.zeros(len(cols.nodes), dtype=bool)
        _, itl = cols.prediction(ctx, loaded=False)
        return np.asarray(itl * floor > 1.0)  # 1 / itl < floor; NaN (no prediction) compares False


@register(FILTERS, "price-ceiling")
@dataclass
class PriceCeilingFilter:
    name: str = "price-ceiling"

    def reject(self, ctx: Context, node: NodeSnapshot) -> str | None:
        ceiling = ctx.request.max_price_per_mtok
        price = ctx.price(node)
        if ceiling is not None and price is not None and price > ceiling:
            return f"costs ${price:.3f}/Mtok, ceiling ${ceiling:.3f}/Mtok"
        return None

    def mask(self, ctx: Context, cols: Columns) -> Mask:
        ceiling = ctx.request.max_price_per_mtok
        if ceiling is None:
            return np.zeros(len(cols.nodes), dtype=bool)
        price = cols.price(ctx)
        return np.asarray(~np.isnan(price) & (price > ceiling))
