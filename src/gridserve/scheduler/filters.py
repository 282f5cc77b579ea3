"""Filters: each removes nodes that *cannot* run the request, with a reason that carries the numbers.

Each is written once, over the decision's columns: `mask` rejects, `reason` explains one rejected row from the
same columns (names and labels from the row's snapshot). `OneRow.reject` checks a single node."""

from dataclasses import dataclass

import numpy as np

from gridserve.catalog.models import DTYPE_BYTES
from gridserve.scheduler.context import Context
from gridserve.scheduler.plugins import FILTERS, OneRow, register
from gridserve.scheduler.snapshot import (
    C_BLOCKING,
    C_HEARTBEAT,
    C_MEMORY,
    C_SERVING,
    C_TIER_BW,
    C_TIER_TFLOPS,
    M_CONTEXT,
    M_DTYPE_OK,
    M_KV_FULL_LAYERS,
    M_KV_SLIDING_LAYERS,
    M_KV_WINDOW,
    M_LISTED,
    M_MEM_WEIGHTS,
    NodeSnapshot,
)
from gridserve.scheduler.vector import Array, Columns, Mask

GIB = 2**30


def _none(cols: Columns) -> Mask:
    return np.zeros(len(cols), dtype=bool)


@register(FILTERS, "node-state")
@dataclass
class NodeStateFilter(OneRow):
    """Down nodes (membership) and ejected, quarantined or banned nodes (reliability) are excluded."""

    name: str = "node-state"

    def mask(self, ctx: Context, cols: Columns) -> Mask:
        return np.asarray((cols.col(C_SERVING) == 0) | (cols.col(C_BLOCKING) > 0))

    def reason(self, ctx: Context, cols: Columns, j: int) -> str:
        node = cols.nodes[j]
        rel = node.reliability
        if cols.col(C_SERVING)[j] == 0 or rel is None:
            return f"node is {node.state.value}"
        return f"node is {rel.state.value}: {rel.reason}" if rel.reason else f"node is {rel.state.value}"


@register(FILTERS, "telemetry-freshness")
@dataclass
class TelemetryFreshnessFilter(OneRow):
    max_age_s: float = 10.0
    name: str = "telemetry-freshness"

    def mask(self, ctx: Context, cols: Columns) -> Mask:
        return np.asarray(ctx.now - cols.col(C_HEARTBEAT) > self.max_age_s)

    def reason(self, ctx: Context, cols: Columns, j: int) -> str:
        age = ctx.now - float(cols.col(C_HEARTBEAT)[j])
        return f"telemetry is {age:.1f} s old (limit {self.max_age_s:.0f} s)"


@register(FILTERS, "model-served")
@dataclass
class ModelServedFilter(OneRow):
    """The node serves the model for the request's task (ModelOffer.tasks): a generation needs an offer for
    generation (or the model on disk: the column M_LISTED), an embedding request an offer for embedding."""

    name: str = "model-served"

    def mask(self, ctx: Context, cols: Columns) -> Mask:
        if ctx.request.task == "generate":
            return np.asarray(cols.mcol(M_LISTED) == 0)
        # strings: no column holds them (embedding pools are small)
        return np.array([not _offers_task(ctx, node) for node in cols.nodes], dtype=bool)

    def reason(self, ctx: Context, cols: Columns, j: int) -> str:
        node, model, task = cols.nodes[j], ctx.request.model, ctx.request.task
        offer = ctx.offer(node)
        if offer is not None and not offer.serves(task):
            return f"serves {model} for {', '.join(offer.tasks)} only, not {task}"
        serves = ", ".join(sorted(node.static.offers)) or "nothing"
        return f"does not serve {model} (serves {serves})"


def _offers_task(ctx: Context, node: NodeSnapshot) -> bool:
    offer = ctx.offer(node)
    return offer is not None and offer.serves(ctx.request.task)


@register(FILTERS, "context-fit")
@dataclass
class ContextFitFilter(OneRow):
    name: str = "context-fit"

    def mask(self, ctx: Context, cols: Columns) -> Mask:
        return np.asarray(_context_needed(ctx) > cols.mcol(M_CONTEXT))

    def reason(self, ctx: Context, cols: Columns, j: int) -> str:
        return f"needs {_context_needed(ctx)} tokens of context, serves {int(cols.mcol(M_CONTEXT)[j])}"


def _context_needed(ctx: Context) -> int:
    return ctx.request.prompt_tokens + ctx.request.max_tokens


@register(FILTERS, "dtype-supported")
@dataclass
class DtypeFilter(OneRow):
    """The node's precision and quantization must be ones its hardware runs (e.g. FP8 needs Ada or Hopper)."""

    name: str = "dtype-supported"

    def mask(self, ctx: Context, cols: Columns) -> Mask:
        return np.asarray(cols.mcol(M_DTYPE_OK) == 0)

    def reason(self, ctx: Context, cols: Columns, j: int) -> str:
        node = cols.nodes[j]
        offer, hw = ctx.offer(node), node.static.hw
        assert offer is not None and hw is not None  # M_DTYPE_OK is 0 only for an offer on known hardware
        if offer.dtype in DTYPE_BYTES and offer.dtype not in hw.dtypes:
            return f"{offer.dtype} is not supported on {hw.name} ({hw.arch}: {', '.join(sorted(hw.dtypes))})"
        return f"{offer.quantization} is not supported on {hw.name} ({hw.arch})"


@register(FILTERS, "memory-fit")
@dataclass
class MemoryFitFilter(OneRow):
    """Weights at the node's precision + KV cache for prompt and max_tokens + a margin must fit in memory.
    The KV cache is one sequence's (ModelSpec.kv_bytes): a model's sliding layers keep at most their window.
    Momentary memory pressure (KV caches of requests in flight) is load, not capability: such a node queues
    the request, and the load scorer and the queueing prediction account for it."""

    margin: float = 0.10
    name: str = "memory-fit"

    def _need(self, ctx: Context, cols: Columns) -> tuple[Array, Array]:
        """(KV bytes, total bytes needed) per node (the fused kernel's filter 7: the same arithmetic, in order)."""
        tokens = _context_needed(ctx)
        windowed = np.minimum(tokens, cols.mcol(M_KV_WINDOW))
        kv = cols.mcol(M_KV_FULL_LAYERS) * tokens + cols.mcol(M_KV_SLIDING_LAYERS) * windowed
        return kv, (cols.mcol(M_MEM_WEIGHTS) + kv) * (1 + self.margin)

    def mask(self, ctx: Context, cols: Columns) -> Mask:
        if ctx.model is None:
            return _none(cols)
        _, need = self._need(ctx, cols)
        have = cols.col(C_MEMORY)
        return np.asarray((have > 0) & (need > have))

    def reason(self, ctx: Context, cols: Columns, j: int) -> str:
        assert ctx.model is not None  # the mask rejects nothing without a model spec
        offer = ctx.offer(cols.nodes[j])
        dtype = offer.dtype if offer and offer.dtype in DTYPE_BYTES else "float16"
        quant = offer.quantization if offer and offer.quantization != "unknown" else "none"
        kv, need = self._need(ctx, cols)
        weights, have = cols.mcol(M_MEM_WEIGHTS)[j], cols.col(C_MEMORY)[j]
        return (
            f"needs {need[j] / GIB:.1f} GiB ({ctx.model.name} {quant if quant != 'none' else dtype} weights "
            f"{weights / GIB:.1f} GiB + KV for {_context_needed(ctx)} tokens{_windows(cols, j)} {kv[j] / GIB:.2f} "
            f"GiB + {self.margin:.0%}), has {have / GIB:.1f} GiB"
        )


def _windows(cols: Columns, j: int) -> str:
    """What the sliding layers keep, for a model with any ("" without)."""
    window = int(cols.mcol(M_KV_WINDOW)[j])
    return f" (sliding layers keep the last {window})" if window else ""


@register(FILTERS, "runtime")
@dataclass
class RuntimeFilter(OneRow):
    """The request may restrict engines (e.g. only nodes fronting vLLM via openai-upstream), and may need features
    the node's engine must honour for the model (e.g. `min_tokens`: ModelOffer.features)."""

    name: str = "runtime"

    def mask(self, ctx: Context, cols: Columns) -> Mask:
        allowed, needed = ctx.request.engines, ctx.request.features
        if not allowed and not needed:
            return _none(cols)
        # strings: no column holds them
        return np.array([self._engine_refused(ctx, n) or bool(self._lacks(ctx, n)) for n in cols.nodes], dtype=bool)

    def reason(self, ctx: Context, cols: Columns, j: int) -> str:
        node = cols.nodes[j]
        if self._engine_refused(ctx, node):
            allowed = ctx.request.engines or ()
            return f"engine {node.capability.engine} not among the allowed {', '.join(allowed)}"
        return f"engine {node.capability.engine} does not honour {', '.join(self._lacks(ctx, node))} for this model"

    @staticmethod
    def _engine_refused(ctx: Context, node: NodeSnapshot) -> bool:
        allowed, engine = ctx.request.engines or (), node.capability.engine
        return bool(allowed) and engine not in allowed and engine.split(":")[0] not in allowed

    @staticmethod
    def _lacks(ctx: Context, node: NodeSnapshot) -> list[str]:
        needed = ctx.request.features
        if not needed:
            return []
        offer = ctx.offer(node)
        offered = offer.features if offer is not None else ()
        return [f for f in needed if f not in offered]


@register(FILTERS, "tier-hardware")
@dataclass
class TierHardwareFilter(OneRow):
    name: str = "tier-hardware"

    def mask(self, ctx: Context, cols: Columns) -> Mask:
        bandwidth, tflops = cols.col(C_TIER_BW), cols.col(C_TIER_TFLOPS)
        return np.asarray(~((bandwidth >= ctx.tier.min_bandwidth_gbs) & (tflops >= ctx.tier.min_fp16_tflops)))

    def reason(self, ctx: Context, cols: Columns, j: int) -> str:
        static = cols.nodes[j].static
        card = static.priced
        if card is None:
            return f"{ctx.tier.describe()}; the node's card is unknown"
        shown = f"{card.bandwidth_gbs:.0f} GB/s and {card.fp16_tflops:.1f} TFLOPS"
        why = " (re-classed: " + static.card.evidence + ")" if static.card and static.card.misrepresented else ""
        return f"{ctx.tier.describe()}; node's {card.name} ({static.hw_class}) has {shown}{why}"


@register(FILTERS, "throughput-floor")
@dataclass
class ThroughputFloorFilter(OneRow):
    """The tier's minimum decode speed, predicted for the node at rest: capability, not momentary load (load is
    scored, and queues)."""

    name: str = "throughput-floor"

    def mask(self, ctx: Context, cols: Columns) -> Mask:
        floor = ctx.tier.min_tokens_per_s
        if floor <= 0:
            return _none(cols)
        _, itl = cols.prediction(ctx, loaded=False)
        return np.asarray(itl * floor > 1.0)  # 1 / itl < floor; NaN (no prediction) compares False

    def reason(self, ctx: Context, cols: Columns, j: int) -> str:
        _, itl = cols.prediction(ctx, loaded=False)
        floor = ctx.tier.min_tokens_per_s
        return f"predicted {1.0 / itl[j]:.1f} tokens/s, tier {ctx.tier.name} needs {floor:.0f}"


@register(FILTERS, "price-ceiling")
@dataclass
class PriceCeilingFilter(OneRow):
    name: str = "price-ceiling"

    def mask(self, ctx: Context, cols: Columns) -> Mask:
        ceiling = ctx.request.max_price_per_mtok
        if ceiling is None:
            return _none(cols)
        price = cols.price(ctx)
        return np.asarray(~np.isnan(price) & (price > ceiling))

    def reason(self, ctx: Context, cols: Columns, j: int) -> str:
        ceiling = ctx.request.max_price_per_mtok or 0.0
        return f"costs ${cols.price(ctx)[j]:.3f}/Mtok, ceiling ${ceiling:.3f}/Mtok"
