"""Tests for the scheduler: filters, the least-outstanding picker, explanations and reproducibility."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gridserve.scheduler import default_profile, schedule
from gridserve.types import Capability, HardwareInfo, ModelOffer, NodeId, NodeState, RuntimeInfo
from gridserve.types.scheduling import Decision, NodeSnapshot, ScheduleRequest

NOW = 1_700_000_000.0
MODELS = ("llama-3-8b", "gridserve-tiny", "qwen2.5-7b")
SERVING = {NodeState.UP, NodeState.SUSPECT}
NOT_SERVING = set(NodeState) - SERVING


def node(
    i: int,
    *,
    state: NodeState = NodeState.UP,
    models: Sequence[tuple[str, int]] = (("llama-3-8b", 8192),),
    outstanding: int = 0,
) -> NodeSnapshot:
    node_id = NodeId(f"n{i:040x}")
    capability = Capability(
        node_id=node_id,
        public_key=f"key-{i}",
        endpoint=f"http://10.0.0.{i % 250}:8000",
        engine="tiny",
        models=tuple(ModelOffer(name=name, max_context=ctx) for name, ctx in models),
        hardware=HardwareInfo(accelerator="cpu"),
        runtime=RuntimeInfo(gridserve="0.1.0", python="3.11", engine="tiny"),
    )
    return NodeSnapshot(
        node_id=node_id, state=state, capability=capability, last_heartbeat=NOW - 1.0, outstanding=outstanding
    )


def request(model: str = "llama-3-8b", prompt_tokens: int = 100, max_tokens: int = 100) -> ScheduleRequest:
    return ScheduleRequest(request_id="req-1", model=model, prompt_tokens=prompt_tokens, max_tokens=max_tokens)


def run(req: ScheduleRequest, nodes: Sequence[NodeSnapshot], seed: int = 0) -> Decision:
    return schedule(req, nodes, default_profile(), random.Random(seed), NOW, decision_id="dec-test")


@st.composite
def fleets(draw: st.DrawFn) -> list[NodeSnapshot]:
    n = draw(st.integers(0, 12))
    out = []
    for i in range(n):
        served = draw(st.lists(st.sampled_from(MODELS), unique=True, max_size=len(MODELS)))
        models = [(m, draw(st.sampled_from([256, 1024, 4096, 8192]))) for m in served]
        out.append(
            node(
                i,
                state=draw(st.sampled_from(list(NodeState))),
                models=models,
                outstanding=draw(st.integers(0, 5)),
            )
        )
    return out


requests = st.builds(
    request,
    model=st.sampled_from(MODELS),
    prompt_tokens=st.integers(1, 6000),
    max_tokens=st.integers(1, 4000),
)


def offer_for(n: NodeSnapshot, model: str) -> ModelOffer | None:
    return next((m for m in n.capability.models if m.name == model), None)


def eligible(n: NodeSnapshot, req: ScheduleRequest) -> bool:
    offer = offer_for(n, req.model)
    return n.state in SERVING and offer is not None and req.prompt_tokens + req.max_tokens <= offer.max_context


@given(req=requests, nodes=fleets(), seed=st.integers(0, 2**32))
@settings(max_examples=300)
def test_filters_partition_nodes_into_candidates_and_rejections(
    req: ScheduleRequest, nodes: list[NodeSnapshot], seed: int
) -> None:
    decision = run(req, nodes, seed)
    by_id = {n.node_id: n for n in nodes}
    candidate_ids = [c.node_id for c in decision.candidates]
    rejected_ids = [r.node_id for r in decision.rejections]
    # Every node appears exactly once, as a candidate or as a rejection.
    assert sorted(candidate_ids + rejected_ids) == sorted(by_id)
    assert {i for i in by_id if eligible(by_id[i], req)} == set(candidate_ids)

    for rej in decision.rejections:
        n = by_id[rej.node_id]
        offer = offer_for(n, req.model)
        if n.state not in SERVING:
            assert rej.filter == "node-state"
            assert n.state.value in rej.reason
        elif offer is None:
            assert rej.filter == "model-served"
            assert req.model in rej.reason
        else:
            assert rej.filter == "model-served"
            assert req.prompt_tokens + req.max_tokens > offer.max_context
            assert str(req.prompt_tokens + req.max_tokens) in rej.reason
            assert str(offer.max_context) in rej.reason


@given(req=requests, nodes=fleets(), seed=st.integers(0, 2**32))
@settings(max_examples=300)
def test_non_serving_nodes_are_never_chosen(req: ScheduleRequest, nodes: list[NodeSnapshot], seed: int) -> None:
    decision = run(req, nodes, seed)
    by_id = {n.node_id: n for n in nodes}
    if decision.chosen is not None:
        assert by_id[decision.chosen].state in SERVING
    state_rejections = {r.node_id for r in decision.rejections if r.filter == "node-state"}
    assert state_rejections == {n.node_id for n in nodes if n.state in NOT_SERVING}


@given(req=requests, nodes=fleets(), seed=st.integers(0, 2**32))
@settings(max_examples=300)
def test_ranking_prefers_up_then_fewest_outstanding(req: ScheduleRequest, nodes: list[NodeSnapshot], seed: int) -> None:
    decision = run(req, nodes, seed)
    by_id = {n.node_id: n for n in nodes}
    ok = [n for n in nodes if eligible(n, req)]
    if not ok:
        assert decision.chosen is None
        return
    assert decision.chosen == decision.candidates[0].node_id
    assert [c.rank for c in decision.candidates] == list(range(len(decision.candidates)))
    up = [n for n in ok if n.state == NodeState.UP]
    pool = up or ok
    chosen = by_id[decision.chosen]
    assert chosen.state == pool[0].state
    assert chosen.outstanding == min(n.outstanding for n in pool)
    # The whole list is ordered: up before suspect, then by outstanding.
    keys = [(by_id[c.node_id].state != NodeState.UP, by_id[c.node_id].outstanding) for c in decision.candidates]
    assert keys == sorted(keys)
    for c in decision.candidates:
        assert c.signals["outstanding"] == by_id[c.node_id].outstanding
        assert c.signals["suspect"] == float(by_id[c.node_id].state == NodeState.SUSPECT)


def test_suspect_node_ranks_after_busier_up_node() -> None:
    nodes = [node(1, state=NodeState.SUSPECT, outstanding=0), node(2, state=NodeState.UP, outstanding=4)]
    decision = run(request(), nodes)
    assert decision.chosen == nodes[1].node_id
    assert [c.node_id for c in decision.candidates] == [nodes[1].node_id, nodes[0].node_id]
    # A suspect node is still used when it is the only eligible one.
    only = run(request(), [nodes[0]])
    assert only.chosen == nodes[0].node_id


@pytest.mark.parametrize("state", sorted(NOT_SERVING))
def test_each_non_serving_state_is_rejected(state: NodeState) -> None:
    nodes = [node(1, state=state, outstanding=0), node(2, outstanding=9)]
    decision = run(request(), nodes)
    assert decision.chosen == nodes[1].node_id
    (rej,) = decision.rejections
    assert rej.node_id == nodes[0].node_id
    assert rej.filter == "node-state"
    assert state.value in rej.reason


def test_model_not_served_names_the_model() -> None:
    nodes = [node(1, models=[("qwen2.5-7b", 32768), ("gridserve-tiny", 4096)])]
    decision = run(request(model="mistral-7b"), nodes)
    assert decision.chosen is None
    (rej,) = decision.rejections
    assert rej.filter == "model-served"
    assert "mistral-7b" in rej.reason
    # And lists what the node does serve.
    assert "qwen2.5-7b" in rej.reason and "gridserve-tiny" in rej.reason


def test_context_boundary() -> None:
    nodes = [node(1, models=[("llama-3-8b", 1000)])]
    assert run(request(prompt_tokens=600, max_tokens=400), nodes).chosen == nodes[0].node_id
    over = run(request(prompt_tokens=600, max_tokens=401), nodes)
    assert over.chosen is None
    assert "1001" in over.rejections[0].reason and "1000" in over.rejections[0].reason


def test_no_eligible_node_explains_the_rejections() -> None:
    nodes = [
        node(1, state=NodeState.DOWN),
        node(2, models=[("qwen2.5-7b", 8192)]),
        node(3, models=[("llama-3-8b", 128)]),
    ]
    decision = run(request(), nodes)
    assert decision.chosen is None
    assert decision.candidates == ()
    assert len(decision.rejections) == 3
    text = decision.explanation
    assert "no eligible node" in text
    assert "3 rejected" in text
    for rej in decision.rejections:
        assert rej.reason in text


def test_empty_fleet() -> None:
    decision = run(request(), [])
    assert decision.chosen is None
    assert decision.rejections == ()
    assert "no eligible node" in decision.explanation


def test_explanation_for_a_choice_names_the_node_and_counts() -> None:
    nodes = [node(1, outstanding=3), node(2, outstanding=1), node(3, state=NodeState.BANNED)]
    decision = run(request(), nodes)
    assert decision.chosen == nodes[1].node_id
    assert decision.chosen[:10] in decision.explanation
    assert "2 eligible" in decision.explanation
    assert "1 rejected" in decision.explanation


def test_decision_records_the_request() -> None:
    req = request(model="qwen2.5-7b")
    decision = schedule(req, [node(1, models=[("qwen2.5-7b", 8192)])], default_profile(), random.Random(1), NOW)
    assert decision.request_id == req.request_id
    assert decision.model == "qwen2.5-7b"
    assert decision.profile == default_profile().name
    assert decision.created == NOW
    assert decision.decision_id.startswith("dec_")
    other = schedule(req, [], default_profile(), random.Random(1), NOW)
    assert other.decision_id != decision.decision_id


@given(req=requests, nodes=fleets(), seed=st.integers(0, 2**32))
@settings(max_examples=150)
def test_decisions_are_reproducible_for_the_same_seed(
    req: ScheduleRequest, nodes: list[NodeSnapshot], seed: int
) -> None:
    assert run(req, nodes, seed) == run(req, nodes, seed)


def test_ties_are_broken_at_random() -> None:
    nodes = [node(i, outstanding=2) for i in range(5)] + [node(9, outstanding=3)]
    chosen = Counter(run(request(), nodes, seed).chosen for seed in range(200))
    assert set(chosen) == {n.node_id for n in nodes[:5]}
    assert min(chosen.values()) > 10  # roughly uniform among the tied nodes


def test_input_order_does_not_matter_beyond_ties() -> None:
    nodes = [node(i, outstanding=i) for i in range(6)]
    for seed in range(10):
        shuffled = nodes[:]
        random.Random(seed).shuffle(shuffled)
        decision = run(request(), shuffled, seed)
        assert [c.node_id for c in decision.candidates] == [n.node_id for n in nodes]
