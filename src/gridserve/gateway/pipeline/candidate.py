"""A pipeline as the scheduler sees it: one candidate beside the nodes, decided by the same filters and scorers.

The planned chain of stage nodes is presented as a virtual node `pipeline:MODEL` whose hardware figures are
derived from its stages, so the scheduler's performance model predicts the chain:

- decode: one step costs the chain's planned time (each stage's compute, measured or roofline, plus the hop's
  round trip): the virtual card's bandwidth is the model's weight bytes over that time;
- prefill: each stage computes its share of the layers on its own card: the virtual FLOPS are the harmonic
  combination of the stages' (weighted by their layer shares);
- memory: the stages' memory together; batch slots: the fewest of any stage; hardware class: the most
  restrictive of the stages' (a tier admits the pipeline only if it admits every stage);
- price: derived like a node's, from the running cost of every card in the chain and the chain's throughput;
- reliability: the weakest stage's record (a chain is as reliable as its least reliable node), on probation
  if any stage is;
- load: the pipeline runs in flight.
"""

from collections.abc import Sequence
from dataclasses import replace

from gridserve.catalog.hardware import HARDWARE, HardwareSpec
from gridserve.catalog.models import DTYPE_BYTES, ModelSpec
from gridserve.gateway.registry.membership import NodeRecord
from gridserve.planner.chain import StageRoute
from gridserve.reliability import ReliabilityBook, ReliabilitySummary
from gridserve.scheduler import NodeSnapshot
from gridserve.scheduler.snapshot import CLASS_CODES, NodeStatic
from gridserve.types import Capability, HardwareInfo, ModelOffer, NodeId, NodeState, RuntimeInfo
from gridserve.types.wire import SAMPLING_FEATURES

PREFIX = "pipeline:"
UNKNOWN_CARD = HARDWARE["cpu"]
"""Figures assumed for a stage whose card the catalogue does not know."""


def pipeline_id(model: str) -> NodeId:
    return NodeId(PREFIX + model)


def is_pipeline(node_id: str | None) -> bool:
    return node_id is not None and node_id.startswith(PREFIX)


def _hardware(
    spec: ModelSpec, offer: ModelOffer, chain: Sequence[StageRoute], cards: list[HardwareSpec]
) -> HardwareSpec:
    step_s = max(1e-9, sum(r.cost for r in chain))
    dtype = offer.dtype if offer.dtype in DTYPE_BYTES else "float16"
    weights = spec.weight_bytes(dtype, offer.quantization)
    per_flop = sum(
        (r.end - r.start) / r.n_layers / (hw.fp16_tflops * hw.prefill_efficiency)
        for r, hw in zip(chain, cards, strict=True)
    )
    worst = max(cards, key=lambda hw: CLASS_CODES.get(hw.hw_class, CLASS_CODES["unknown"]))
    return HardwareSpec(
        key="pipeline",
        name=" + ".join(hw.name for hw in cards),
        hw_class=worst.hw_class,
        arch="pipeline",
        bandwidth_gbs=weights / step_s / 1e9,
        memory_gib=sum(hw.memory_gib for hw in cards),
        fp16_tflops=1.0 / per_flop,
        dtypes=frozenset({dtype}),
        quantizations=frozenset({offer.quantization, "none"}),
        decode_efficiency=1.0,
        prefill_efficiency=1.0,
        cost_per_hour=sum(hw.cost_per_hour for hw in cards),
        batch_slots=min(max(1, hw.batch_slots) for hw in cards),
    )


def _weakest(summaries: list[ReliabilitySummary]) -> ReliabilitySummary:
    return min(summaries, key=lambda s: s.score)


def pipeline_snapshot(
    spec: ModelSpec,
    chain: Sequence[StageRoute],
    records: Sequence[NodeRecord],
    book: ReliabilityBook,
    now: float,
    running: int,
) -> NodeSnapshot:
    """The chain (its stage nodes' `records`, in order) as one virtual node for the scheduler."""
    offers = [next(o for o in rec.capability.models if o.name == spec.name and o.layers is not None) for rec in records]
    cards = [rec.static.hw or UNKNOWN_CARD for rec in records]
    priced = [rec.static.priced or UNKNOWN_CARD for rec in records]
    first = offers[0]
    offer = ModelOffer(
        name=spec.name,
        dtype=first.dtype,
        quantization=first.quantization,
        max_context=min(o.max_context for o in offers),
        features=SAMPLING_FEATURES,  # the gateway samples a chain's tokens itself (session.generate_tokens)
    )
    hw = _hardware(spec, offer, chain, cards)
    node_id = pipeline_id(spec.name)
    capability = Capability(
        node_id=node_id,
        public_key="",
        endpoint="",
        engine="pipeline",
        models=(offer,),
        hardware=HardwareInfo(accelerator="pipeline", memory_bytes=int(hw.memory_gib * 2**30)),
        runtime=RuntimeInfo(gridserve="gateway", python="", engine="pipeline"),
    )
    static = NodeStatic(
        hw=hw,
        hw_class=hw.hw_class,
        offers={offer.name: offer},
        loadable=frozenset(),
        memory_bytes=capability.hardware.memory_bytes or 0,
        source=capability,
        tier_card=replace(
            hw,
            bandwidth_gbs=min(card.bandwidth_gbs for card in priced),
            fp16_tflops=min(card.fp16_tflops for card in priced),
        ),
    )
    summaries = [book.summary(rec.capability.node_id, now) for rec in records]
    probation = any(rec.state == NodeState.PROBATION for rec in records)
    return NodeSnapshot(
        node_id=node_id,
        state=NodeState.PROBATION if probation else NodeState.UP,
        capability=capability,
        last_heartbeat=min(rec.last_heartbeat for rec in records),
        outstanding=running,
        reliability=_weakest(summaries),
        static=static,
    )
