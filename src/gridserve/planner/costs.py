"""What the pipeline planner reads: a model as per-layer costs, candidate nodes as effective speeds and memory,
and the network between them. All pure data; `stage_time` and `hop_time` are the cost model the planner and
its baselines share.

Decode of one token through a stage holding layers [start, end): the stage streams the weights a token reads
(all of them for a dense model; a mixture of experts' active ones, while the stage holds every expert) and the
KV cache of those layers for the context once (a sliding layer's: its window; memory-bound), or computes
2 x (active) params FLOPs per token (compute-bound), whichever is slower, times the node's calibrated slowness:
perfmodel's roofline per layer range, at the bandwidth and FLOPS it uses (`decode_bytes_per_s`, `prefill_flops`).
A hop between stages carries one hidden-state vector per token: half a round trip plus its bytes over the link.
"""

from dataclasses import dataclass, field

from gridserve.catalog.hardware import HardwareSpec
from gridserve.catalog.models import DTYPE_BYTES, QUANT_BYTES_PER_PARAM, ModelSpec
from gridserve.perfmodel.roofline import decode_bytes_per_s, prefill_flops

LINK_BYTES_PER_S = 1e9 / 8
"""Default link between nodes: 1 Gbit/s (a home or office uplink; data-centre links are faster)."""
LOGIT_BYTES = 4
"""The last stage returns float32 logits for the gateway to sample from."""


@dataclass(frozen=True)
class LayerCosts:
    """A model split into layers. The input embedding is charged to the first layer, the output head (logits)
    to the last. A mixture of experts' parameters are spread evenly over its layers (DeepSeek-V3's 3 dense layers
    of 61 are not told apart)."""

    name: str
    weight_bytes: tuple[float, ...]
    """Held: what a stage's memory must fit."""
    flops_per_token: tuple[float, ...]
    kv_bytes_per_token: tuple[float, ...]
    """KV bytes a token takes in each layer (what a sliding layer keeps of it: `kv_window`)."""
    activation_bytes: float
    """One hidden-state vector, as sent between stages."""
    logits_bytes: float
    streamed_bytes: tuple[float, ...] = ()
    """Weight bytes one token's decode reads per layer, where fewer than held (a mixture of experts); empty: all."""
    kv_window: tuple[int, ...] = ()
    """Tokens of a sequence each layer's KV cache keeps (0: every token; ModelSpec.layer_windows); empty: every
    layer keeps every token."""

    def __post_init__(self) -> None:
        if self.kv_window and len(self.kv_window) != len(self.weight_bytes):
            raise ValueError(f"{self.name}: kv_window needs one window per layer ({len(self.weight_bytes)})")

    @property
    def layers(self) -> int:
        return len(self.weight_bytes)

    @property
    def streamed(self) -> tuple[float, ...]:
        """Weight bytes one token's decode reads per layer."""
        return self.streamed_bytes or self.weight_bytes

    def kv_bytes(self, start: int, end: int, context: int) -> float:
        """KV bytes one sequence of `context` tokens holds in layers [start, end) (and a decode step reads): every
        token in the full-attention layers, at most the window in the sliding ones."""
        per_token = self.kv_bytes_per_token[start:end]
        if not self.kv_window:
            return sum(per_token) * context
        windows = self.kv_window[start:end]
        full = sum(kv for kv, w in zip(per_token, windows, strict=True) if not w)
        return full * context + sum(kv * min(context, w) for kv, w in zip(per_token, windows, strict=True) if w)

    @classmethod
    def of(cls, spec: ModelSpec, dtype: str = "float16", quantization: str = "none") -> "LayerCosts":
        per_param = QUANT_BYTES_PER_PARAM.get(quantization)
        bpp = per_param if per_param is not None else DTYPE_BYTES[dtype]
        embed = float(spec.vocab * spec.hidden)
        weights = _per_layer(spec.params, embed, spec.layers, bpp, first=embed * bpp)
        body = max(0.0, spec.token_params - embed) / spec.layers
        flops = [2.0 * body] * spec.layers
        flops[-1] += 2.0 * embed
        kv = spec.kv_bytes_per_token(dtype if dtype in DTYPE_BYTES else "float16") / spec.layers
        act_dtype = dtype if dtype in ("float16", "bfloat16", "float32") else "float16"
        return cls(
            name=spec.name,
            weight_bytes=weights,
            flops_per_token=tuple(flops),
            kv_bytes_per_token=(kv,) * spec.layers,
            activation_bytes=spec.hidden * DTYPE_BYTES[act_dtype],
            logits_bytes=float(spec.vocab * LOGIT_BYTES),
            # a token reads one row of the input embedding: only the output head is streamed whole
            streamed_bytes=_per_layer(spec.decode_params(1), embed, spec.layers, bpp) if spec.moe else (),
            kv_window=spec.layer_windows() if spec.sliding_layers else (),
        )


def _per_layer(params: float, embed: float, layers: int, bpp: float, first: float = 0.0) -> tuple[float, ...]:
    """Bytes per layer: the parameters beside the embedding spread evenly, `first` added to the first layer and
    the output head (tied or not, its weights are read every token) to the last."""
    body = max(0.0, params - embed) / layers
    weights = [body * bpp] * layers
    weights[0] += first
    weights[-1] += embed * bpp
    return tuple(weights)


@dataclass(frozen=True)
class PlanNode:
    node_id: str
    memory_bytes: float
    """Free device memory for weights and KV cache."""
    bytes_per_s: float
    """Effective memory bandwidth (bandwidth x decode efficiency)."""
    flops_per_s: float
    """Effective compute (peak x efficiency)."""
    slowness: float = 1.0
    """Calibration: observed / predicted time (>1: slower than its card's spec)."""

    @classmethod
    def of(
        cls, node_id: str, hw: HardwareSpec, *, memory_bytes: float | None = None, slowness: float = 1.0
    ) -> "PlanNode":
        return cls(
            node_id=node_id,
            memory_bytes=memory_bytes if memory_bytes is not None else hw.memory_gib * 2**30 * 0.9,
            bytes_per_s=decode_bytes_per_s(hw),
            flops_per_s=prefill_flops(hw),
            slowness=slowness,
        )


@dataclass(frozen=True)
class Network:
    rtt_s: dict[frozenset[str], float] = field(default_factory=dict)
    """Round trip between two nodes (missing pairs: `default_rtt_s`)."""
    gateway_rtt_s: dict[str, float] = field(default_factory=dict)
    default_rtt_s: float = 0.020
    link_bytes_per_s: float = LINK_BYTES_PER_S

    def rtt(self, a: str, b: str) -> float:
        return self.rtt_s.get(frozenset((a, b)), self.default_rtt_s)

    def to_gateway(self, node: str) -> float:
        return self.gateway_rtt_s.get(node, self.default_rtt_s)


@dataclass(frozen=True)
class Workload:
    context_tokens: int = 2048
    """Tokens of KV cache each session holds (prompt + output) at the planned length."""
    sessions: int = 1
    """Concurrent sessions each stage must hold KV cache for."""


def stage_time(model: LayerCosts, node: PlanNode, start: int, end: int, work: Workload) -> float:
    weights = sum(model.streamed[start:end])
    kv = model.kv_bytes(start, end, work.context_tokens)
    flops = sum(model.flops_per_token[start:end])
    return max((weights + kv) / node.bytes_per_s, flops / node.flops_per_s) * node.slowness


def stage_memory(model: LayerCosts, start: int, end: int, work: Workload) -> float:
    kv = model.kv_bytes(start, end, work.context_tokens) * work.sessions
    return sum(model.weight_bytes[start:end]) + kv


def hop_time(net: Network, a: str, b: str, nbytes: float) -> float:
    return net.rtt(a, b) / 2 + nbytes / net.link_bytes_per_s


def edge_time(net: Network, node: str, nbytes: float) -> float:
    """Gateway to the first stage (token ids) or the last stage to the gateway (logits)."""
    return net.to_gateway(node) / 2 + nbytes / net.link_bytes_per_s
