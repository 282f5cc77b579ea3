"""Claimed cards checked (catalog/claims.py, gateway/registry/claims.py): a node's micro-benchmark and its first
answers against the card it claims; re-classed, priced at the speed it shows, recorded, and severe the second time;
a throttled or slightly slow card is not accused."""

from __future__ import annotations

import random

import numpy as np
import pytest

from gridserve.catalog.claims import MISREPRESENTATION_GAP, card_view
from gridserve.catalog.derive import COPY_REACH, MATMUL_REACH
from gridserve.catalog.hardware import HARDWARE
from gridserve.catalog.models import MODELS
from gridserve.catalog.tiers import TIERS
from gridserve.gateway.config import GatewayConfig
from gridserve.gateway.registry.claims import CLAIM_SAMPLES, HELD, JUDGING, MIN_JUDGED_ITL_S, MISREPRESENTED, judge
from gridserve.gateway.registry.events import JobObserved, Registered
from gridserve.gateway.registry.registry import NodeRegistry
from gridserve.perfmodel import Calibration, derived_price_per_mtok
from gridserve.reliability import EventKind, ReliabilityState, Severity
from gridserve.scheduler import named_profile, schedule
from gridserve.scheduler.snapshot import C_TIER_BW, C_TIER_TFLOPS
from gridserve.types import Capability, HardwareInfo, MeasuredFigures, ModelOffer, NodeId, RuntimeInfo
from gridserve.types.scheduling import ScheduleRequest

T0 = 1_700_000_000.0
H100 = HARDWARE["h100-sxm"]
LLAMA = MODELS["llama-3-8b"]


def measured(card: str, share: float) -> MeasuredFigures:
    hw = HARDWARE[card]
    return MeasuredFigures(
        bandwidth_gbs=hw.bandwidth_gbs * COPY_REACH * share,
        tflops={"float16": hw.fp16_tflops * MATMUL_REACH * share},
        seconds=2.0,
        device="cuda:0",
    )


def hardware(card: str = "h100-sxm", share: float | None = None) -> HardwareInfo:
    return HardwareInfo(accelerator=card, measured=measured(card, share) if share is not None else None)


def capability(node_id: str, hw: HardwareInfo) -> Capability:
    return Capability(
        node_id=NodeId(node_id),
        public_key="pk-" + node_id,
        endpoint=f"http://{node_id}:8000",
        engine="vllm",
        models=(ModelOffer(name="llama-3-8b", dtype="float16"),),
        hardware=hw,
        runtime=RuntimeInfo(gridserve="t", python="t", engine="t"),
    )


def price(hw: object) -> float:
    return derived_price_per_mtok(LLAMA, hw, "float16", "none")  # type: ignore[arg-type]


def test_a_benchmark_at_the_claimed_speed_changes_nothing() -> None:
    view = card_view(hardware(share=1.0))
    assert view is not None and not view.misrepresented and view.gap == pytest.approx(1.0)
    assert view.hw.bandwidth_gbs == pytest.approx(H100.bandwidth_gbs) and price(view.priced) == pytest.approx(
        price(H100)
    )


def test_a_slightly_slow_benchmark_predicts_slower_at_the_same_price_per_token() -> None:
    """A card measured at 60% (a hot room, a power cap) is predicted at 60%; its hour costs 60%, so its token
    costs the same: it is not accused."""
    view = card_view(hardware(share=0.6))
    assert view is not None and not view.misrepresented
    assert view.hw.bandwidth_gbs == pytest.approx(0.6 * H100.bandwidth_gbs)
    assert price(view.priced) == pytest.approx(price(H100), rel=1e-6)


def test_a_benchmark_far_below_the_claim_re_classes_and_pays_for_the_speed_shown() -> None:
    """Claims an H100, measures a CPU socket's bandwidth (~50 GB/s): re-classed out of the interactive tier, paid a
    sixty-seventh of an H100's price per token, with the figures as evidence."""
    share = 50 / H100.bandwidth_gbs
    view = card_view(hardware(share=share))
    assert view is not None and view.misrepresented and view.gap == pytest.approx(1 / share)
    assert view.priced.bandwidth_gbs == pytest.approx(50, rel=1e-6)
    assert view.priced.hw_class == "consumer"
    assert not TIERS["interactive"].admits(view.priced.bandwidth_gbs, view.priced.fp16_tflops)
    assert price(view.priced) == pytest.approx(price(H100) * share, rel=1e-6)
    assert "H100" in view.evidence and "micro-benchmark measured 42 GB/s" in view.evidence


def test_the_observed_judgement_waits_for_enough_answers_and_spares_the_throttled() -> None:
    view = card_view(hardware())
    early = Calibration(itl_factor=40.0, itl_samples=CLAIM_SAMPLES - 1)
    assert judge(view, early, None, 0.01).claim == JUDGING
    throttled = Calibration(itl_factor=1.15, itl_samples=CLAIM_SAMPLES)  # its clock was in the prediction
    assert judge(view, throttled, 0.55, 0.01).claim == HELD
    slow = Calibration(itl_factor=MISREPRESENTATION_GAP * 1.2, itl_samples=CLAIM_SAMPLES)
    assert judge(view, slow, 1.0, MIN_JUDGED_ITL_S / 2).claim == JUDGING  # too short a step to tell cards apart
    verdict = judge(view, slow, 1.0, 0.01)
    assert verdict.claim == MISREPRESENTED and verdict.gap == pytest.approx(3.0)
    assert "first 8 answers decoded 3.0x slower" in verdict.evidence


def observe(registry: NodeRegistry, node: str, factor: float, n: int, at: float) -> list[object]:
    noted: list[object] = []
    for i in range(n):
        effects = registry.apply(JobObserved(NodeId(node), 0.1, 0.1, 0.1, 0.01, 0.01 * factor, None, 64, at=at + i))
        noted += effects.noted
    return noted


def register(registry: NodeRegistry, node: str, hw: HardwareInfo, at: float) -> list[object]:
    cap = capability(node, hw)
    return list(registry.apply(Registered(cap, at=at, registered_at=at, capability_at=at, last_seen=at)).noted)


def test_answers_far_slower_than_the_claim_re_class_the_node_and_a_second_time_quarantines_it() -> None:
    registry = NodeRegistry(GatewayConfig(heartbeat_interval_s=2.0, allow_emulated=True))
    assert register(registry, "liar", hardware(), T0) == []
    assert observe(registry, "liar", 6.0, CLAIM_SAMPLES - 1, T0) == []
    record = registry.nodes[NodeId("liar")]
    assert record.claim == JUDGING and record.static.card is not None and not record.static.card.misrepresented
    noted = observe(registry, "liar", 6.0, 1, T0 + 10)
    record = registry.nodes[NodeId("liar")]
    assert record.claim == MISREPRESENTED and record.static.card is not None
    assert record.static.card.gap == pytest.approx(6.0)
    (incident,) = noted
    assert incident.kind == EventKind.INCIDENT and incident.severity == Severity.MINOR  # type: ignore[attr-defined]
    assert "capability misrepresentation" in incident.detail and "6.0x slower" in incident.detail  # type: ignore[attr-defined]
    assert registry.book.state("liar", T0 + 11) not in (ReliabilityState.QUARANTINED, ReliabilityState.BANNED)
    # priced and tiered at the speed it showed; its calibration keeps predicting it as observed
    assert record.static.price_per_mtok("llama-3-8b") == pytest.approx(price(H100) / 6, rel=1e-6)
    assert record.calibration.itl_factor == pytest.approx(6.0)
    live = registry.table.get("liar")  # what the scheduler reads
    assert live is not None and live.static.card is not None and live.static.card.gap == pytest.approx(6.0)
    # the same card registered again keeps its verdict (no new incident)
    assert register(registry, "liar", hardware(), T0 + 20) == []
    assert registry.nodes[NodeId("liar")].claim == MISREPRESENTED
    # a new claim, as false: severe, quarantined
    noted = register(registry, "liar", hardware("a100-80g", share=0.05), T0 + 30)
    (again,) = noted
    assert again.severity == Severity.SEVERE and "(again)" in again.detail  # type: ignore[attr-defined]
    assert registry.book.state("liar", T0 + 31) == ReliabilityState.QUARANTINED


def test_an_honest_node_is_judged_once_and_left_alone() -> None:
    registry = NodeRegistry(GatewayConfig(heartbeat_interval_s=2.0, allow_emulated=True))
    register(registry, "honest", hardware(share=0.95), T0)
    assert observe(registry, "honest", 1.3, CLAIM_SAMPLES, T0) == []
    assert registry.nodes[NodeId("honest")].claim == HELD
    # slower later (a neighbour on its card): calibration's business, not a false claim
    assert observe(registry, "honest", 10.0, 20, T0 + 100) == []
    assert registry.nodes[NodeId("honest")].claim == HELD


def test_the_tier_columns_carry_the_priced_card() -> None:
    registry = NodeRegistry(GatewayConfig(heartbeat_interval_s=2.0, allow_emulated=True))
    register(registry, "cpu-speed", hardware(share=50 / H100.bandwidth_gbs), T0)
    live = registry.table.get("cpu-speed")
    assert live is not None
    cols = np.frombuffer(live.row)
    assert cols[C_TIER_BW] == pytest.approx(50, rel=1e-6) and cols[C_TIER_TFLOPS] < 50
    assert registry.nodes[NodeId("cpu-speed")].claim == MISREPRESENTED


def test_a_cpu_claim_is_never_judged() -> None:
    """A CPU is the floor (and its catalogue figures are planning figures): a CPU node slower than them, by its
    benchmark or its answers (gridserve's own Python engines are), is predicted slower, never accused."""
    view = card_view(HardwareInfo(accelerator="cpu", measured=MeasuredFigures(bandwidth_gbs=4.0, device="cpu")))
    assert view is not None and not view.misrepresented and view.priced == view.hw
    assert view.hw.bandwidth_gbs == pytest.approx(4.0 / COPY_REACH)
    slow = Calibration(itl_factor=50.0, itl_samples=CLAIM_SAMPLES * 4)
    assert judge(view, slow, None, 0.05).claim == HELD


def test_the_tier_filter_says_what_the_re_classed_node_showed() -> None:
    registry = NodeRegistry(GatewayConfig(heartbeat_interval_s=2.0, allow_emulated=True))
    register(registry, "cpu-speed", hardware(share=50 / H100.bandwidth_gbs), T0)
    register(registry, "honest", hardware(share=1.0), T0)
    request = ScheduleRequest(request_id="r", model="llama-3-8b", prompt_tokens=64, max_tokens=16, tier="interactive")
    decision = schedule(request, registry.table.view(), named_profile("default"), random.Random(0), T0 + 1)
    assert decision.chosen == "honest"
    verdict = next(v for v in decision.verdicts if v.node_id == "cpu-speed")
    assert verdict.filter == "tier-hardware" and not verdict.eligible
    assert verdict.reason.startswith("tier interactive needs a card of at least 300 GB/s and 50 FP16 TFLOPS; ")
    assert "has 50 GB/s" in verdict.reason and "re-classed: claims NVIDIA H100 SXM" in verdict.reason
