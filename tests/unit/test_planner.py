"""The pipeline planner: exact against brute force on small instances, feasible, explained; baselines."""

import itertools
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gridserve.catalog import hardware_spec, model_spec
from gridserve.planner import (
    LayerCosts,
    Network,
    PlanError,
    PlanNode,
    Workload,
    evaluate,
    fixed_blocks,
    memory_proportional,
    plan,
    throughput_balanced,
)
from gridserve.planner.plan import FIT_TOLERANCE


def compositions(n: int, k: int) -> list[list[int]]:
    """Every way to cut layers [0, n) into k non-empty contiguous ranges, as cut lists."""
    return [[0, *inner, n] for inner in itertools.combinations(range(1, n), k - 1)]


def brute_force(model: LayerCosts, nodes: list[PlanNode], net: Network, work: Workload, objective: str) -> float:
    best = math.inf
    for k in range(1, min(len(nodes), model.layers) + 1):
        for chain in itertools.permutations(nodes, k):
            for cuts in compositions(model.layers, k):
                p = evaluate(model, chain, cuts, net, work, objective)
                if p is not None:
                    best = min(best, p.cost_s)
    return best


@st.composite
def instances(draw: st.DrawFn) -> tuple[LayerCosts, list[PlanNode], Network]:
    layers = draw(st.integers(1, 6))
    weights = tuple(draw(st.lists(st.floats(1e6, 5e8), min_size=layers, max_size=layers)))
    model = LayerCosts(
        name="m",
        weight_bytes=weights,
        flops_per_token=tuple(2 * w for w in weights),
        kv_bytes_per_token=tuple(draw(st.lists(st.floats(0, 1e4), min_size=layers, max_size=layers))),
        activation_bytes=draw(st.floats(1e2, 1e5)),
        logits_bytes=draw(st.floats(1e3, 1e6)),
        # sliding layers keep a window of the context (512 tokens in the tests): shorter, longer or none
        kv_window=draw(
            st.one_of(
                st.just(()),
                st.lists(st.sampled_from((0, 0, 64, 300, 1024)), min_size=layers, max_size=layers).map(tuple),
            )
        ),
    )
    count = draw(st.integers(1, 4))
    nodes = [
        PlanNode(
            f"n{i}",
            memory_bytes=draw(st.floats(2e8, 3e9)),
            bytes_per_s=draw(st.floats(1e10, 3e12)),
            flops_per_s=draw(st.floats(1e12, 1e15)),
            slowness=draw(st.floats(0.5, 3.0)),
        )
        for i in range(count)
    ]
    ids = [n.node_id for n in nodes]
    rtts = {frozenset(p): draw(st.floats(0.0, 0.1)) for p in itertools.combinations(ids, 2)}
    gateway = {i: draw(st.floats(0.0, 0.1)) for i in ids}
    return model, nodes, Network(rtt_s=rtts, gateway_rtt_s=gateway, link_bytes_per_s=draw(st.floats(1e7, 1e10)))


@settings(max_examples=200, deadline=None)
@given(instance=instances(), objective=st.sampled_from(["latency", "throughput"]))
def test_the_planner_finds_the_brute_force_optimum(
    instance: tuple[LayerCosts, list[PlanNode], Network], objective: str
) -> None:
    model, nodes, net = instance
    work = Workload(context_tokens=512)
    optimum = brute_force(model, nodes, net, work, objective)
    if math.isinf(optimum):
        with pytest.raises(PlanError):
            plan(model, nodes, net, work, objective=objective, max_stages=4, candidates=4)
        return
    found = plan(model, nodes, net, work, objective=objective, max_stages=4, candidates=4)
    assert found.cost_s == pytest.approx(optimum, rel=1e-9)
    assert found.stages[0].start == 0 and found.stages[-1].end == model.layers
    for a, b in itertools.pairwise(found.stages):
        assert a.end == b.start and a.start < a.end
    by_id = {n.node_id: n for n in nodes}
    # fits within the planner's tolerance for sums in different orders (a KV of 1e-7 B a token on a layer that
    # fills the node exactly is 6e-5 B over)
    assert all(s.memory_bytes <= by_id[s.node_id].memory_bytes * FIT_TOLERANCE for s in found.stages)
    assert len({s.node_id for s in found.stages}) == len(found.stages)


def catalog_nodes(cards: list[str]) -> list[PlanNode]:
    return [PlanNode.of(f"{card}-{i}", hardware_spec(card)) for i, card in enumerate(cards)]


def test_a_model_no_single_card_holds_is_split_and_explained() -> None:
    model = LayerCosts.of(model_spec("llama-3-70b"), "float16")
    nodes = catalog_nodes(["rtx4090", "rtx4090", "rtx3090", "a100-80g", "a100-80g", "l40s"])
    with pytest.raises(PlanError):
        plan(model, nodes[:1])
    found = plan(model, nodes, Network(default_rtt_s=0.005))
    assert len(found.stages) >= 2
    text = found.explain()
    assert "layers [0," in text and "ms per token" in text and "chains" in text


def test_on_a_mixed_set_the_planner_beats_the_three_baselines() -> None:
    model = LayerCosts.of(model_spec("llama-3-70b"), "float16", "q4_k_m")
    nodes = catalog_nodes(["rtx3090", "h100-sxm", "t4", "a100-80g"])
    net = Network(default_rtt_s=0.004)
    best = plan(model, nodes, net)
    for baseline in (fixed_blocks, memory_proportional, throughput_balanced):
        other = baseline(model, nodes, net)
        assert other is None or best.cost_s <= other.cost_s + 1e-12, (baseline.__name__, other)
    fixed = fixed_blocks(model, nodes, net)
    assert fixed is not None and best.cost_s <= 0.7 * fixed.cost_s  # at least 30% lower
