"""The pipeline as a scheduler candidate (gateway/pipeline/candidate.py): its figures come from its stages."""

import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gridserve.catalog import HARDWARE, MODELS
from gridserve.catalog.tiers import TIERS
from gridserve.gateway.pipeline.candidate import is_pipeline, pipeline_id, pipeline_snapshot
from gridserve.gateway.registry.membership import NodeRecord
from gridserve.perfmodel import derived_price_per_mtok
from gridserve.planner.chain import StageRoute
from gridserve.reliability import EventKind, NodeEvent, ReliabilityBook
from gridserve.scheduler import named_profile, schedule
from gridserve.scheduler.context import Context
from gridserve.scheduler.snapshot import C_TIER_BW, C_TIER_TFLOPS
from gridserve.types import Capability, HardwareInfo, LayerRange, ModelOffer, NodeId, NodeState, RuntimeInfo
from gridserve.types.scheduling import ScheduleRequest

NOW = 1_700_000_000.0
MODEL = MODELS["llama-3-8b"]


def stage(node_id: str, card: str, start: int, end: int, state: NodeState = NodeState.UP) -> NodeRecord:
    offer = ModelOffer(name=MODEL.name, dtype="float16", layers=LayerRange(start=start, end=end))
    capability = Capability(
        node_id=NodeId(node_id),
        public_key="pk",
        endpoint=f"http://{node_id}",
        engine="emulated",
        models=(offer,),
        hardware=HardwareInfo(accelerator=card),
        runtime=RuntimeInfo(gridserve="t", python="t", engine="t"),
    )
    return NodeRecord(capability=capability, state=state, registered_at=NOW, last_heartbeat=NOW - 1)


def routes(records: list[NodeRecord], costs: list[float]) -> list[StageRoute]:
    out = []
    for rec, cost in zip(records, costs, strict=True):
        layers = rec.capability.models[0].layers
        assert layers is not None
        out.append(StageRoute(rec.capability.node_id, "", "", layers.start, layers.end, MODEL.layers, cost))
    return out


def book_with(failures: dict[str, int]) -> ReliabilityBook:
    book = ReliabilityBook()
    for node_id, bad in failures.items():
        book.add_node(node_id, NOW - 100)
        for i in range(10):
            book.record(NodeEvent(node_id=node_id, kind=EventKind.JOB_COMPLETED, at=NOW - 90 + i, within_slo=True))
        for i in range(bad):
            book.record(NodeEvent(node_id=node_id, kind=EventKind.JOB_FAILED, at=NOW - 50 + i))
    return book


def request(tier: str = "standard") -> ScheduleRequest:
    return ScheduleRequest(request_id="r", model=MODEL.name, prompt_tokens=256, max_tokens=64, tier=tier)


@settings(max_examples=50, deadline=None)
@given(
    costs=st.lists(st.floats(0.001, 0.2), min_size=2, max_size=2),
    cards=st.lists(st.sampled_from(sorted(HARDWARE)), min_size=2, max_size=2),
    bad=st.lists(st.integers(0, 5), min_size=2, max_size=2),
)
def test_the_candidate_is_predicted_priced_and_trusted_from_its_stages(
    costs: list[float], cards: list[str], bad: list[int]
) -> None:
    half = MODEL.layers // 2
    records = [stage("a", cards[0], 0, half), stage("b", cards[1], half, MODEL.layers)]
    book = book_with({"a": bad[0], "b": bad[1]})
    snap = pipeline_snapshot(MODEL, routes(records, costs), records, book, NOW, running=0)
    assert is_pipeline(snap.node_id) and snap.node_id == pipeline_id(MODEL.name)
    pred = Context.build(request(), NOW).prediction(snap)
    assert pred is not None
    assert pred.itl_s == pytest.approx(sum(costs), rel=1e-9)  # one decode step = the chain's planned step
    summaries = [book.summary(n, NOW) for n in ("a", "b")]
    assert snap.reliability is not None and snap.reliability.score == min(s.score for s in summaries)
    hw = [HARDWARE[c] for c in cards]
    assert snap.static.memory_bytes == int(sum(h.memory_gib for h in hw) * 2**30)
    assert snap.static.hw is not None
    price = derived_price_per_mtok(MODEL, snap.static.hw, "float16", "none")
    assert Context.build(request(), NOW).price(snap) == pytest.approx(price)
    assert snap.static.hw.cost_per_hour == pytest.approx(sum(h.cost_per_hour for h in hw))
    strict = TIERS["interactive"]  # a tier admits the pipeline only if it admits every stage
    row = np.frombuffer(snap.row)
    admitted = strict.admits(row[C_TIER_BW], row[C_TIER_TFLOPS])
    assert admitted == all(strict.admits(h.bandwidth_gbs, h.fp16_tflops) for h in hw)


def test_a_stage_on_probation_puts_the_pipeline_on_probation() -> None:
    records = [stage("a", "rtx4090", 0, 16), stage("b", "rtx4090", 16, 32, NodeState.PROBATION)]
    snap = pipeline_snapshot(MODEL, routes(records, [0.02, 0.02]), records, ReliabilityBook(), NOW, running=3)
    assert snap.state == NodeState.PROBATION and snap.outstanding == 3


def test_the_scheduler_prefers_a_fast_chain_to_a_slow_whole_node_and_explains_it() -> None:
    records = [stage("a", "h100-sxm", 0, 16), stage("b", "h100-sxm", 16, 32)]
    chain = pipeline_snapshot(MODEL, routes(records, [0.004, 0.004]), records, ReliabilityBook(), NOW, running=0)
    slow = stage("a10g-whole", "a10g", 0, 32)  # reuse the builder, then make it a whole-model offer
    offer = ModelOffer(name=MODEL.name, dtype="float16")
    whole = NodeRecord(
        capability=slow.capability.model_copy(update={"models": (offer,)}),
        state=NodeState.UP,
        registered_at=NOW,
        last_heartbeat=NOW - 1,
    )
    decision = schedule(
        request(), [whole.snapshot(ReliabilityBook(), NOW), chain], named_profile("default"), random.Random(0), NOW
    )
    assert {c.node_id for c in decision.candidates} == {chain.node_id, whole.capability.node_id}  # both eligible
    assert decision.chosen == chain.node_id
    assert "pipeline:" in decision.explanation
