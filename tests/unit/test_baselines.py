"""The baseline routing policies behave as named, on small hand-checked grids."""

import random
from collections import Counter

import pytest
from tests.unit.test_scheduler import NOW, Spec, build, grid, request

from gridserve.scheduler import ProfileError, named_profile, schedule
from gridserve.scheduler.baselines import BASELINES
from gridserve.types import NodeState


def chosen(profile_name: str, nodes: list, requests: int = 1, seed: int = 0) -> list[str]:  # type: ignore[type-arg]
    profile = named_profile(profile_name)
    rng = random.Random(seed)
    return [str(schedule(request(), nodes, profile, rng, NOW).chosen) for _ in range(requests)]


def test_every_baseline_is_a_packaged_profile() -> None:
    for name in (*BASELINES, "default"):
        assert named_profile(name).name == name
    with pytest.raises(ProfileError, match=r"known: .*least-loaded"):
        named_profile("fastest-ever")


def test_round_robin_takes_eligible_nodes_in_turn() -> None:
    nodes = grid([Spec("rtx4090"), Spec("h100-sxm"), Spec("t4"), Spec("a100-80g", state=NodeState.DOWN)])
    picks = chosen("round-robin", nodes, requests=6)
    eligible = sorted(n.node_id for n in nodes[:3])
    assert picks == eligible * 2  # in node-id order, the down node skipped


def test_random_spreads_evenly() -> None:
    nodes = grid([Spec("rtx4090")] * 4)
    counts = Counter(chosen("random", nodes, requests=400, seed=1))
    assert len(counts) == 4 and all(70 <= c <= 130 for c in counts.values()), counts


def test_least_loaded_picks_fewest_outstanding_whatever_the_card() -> None:
    nodes = [build(Spec("h100-sxm", outstanding=5), "fast-busy"), build(Spec("t4", outstanding=1), "slow-idle")]
    assert chosen("least-loaded", nodes) == ["slow-idle"]


def test_capacity_only_is_the_tightest_vram_fit_ignoring_load_and_speed() -> None:
    nodes = [
        build(Spec("h100-sxm"), "h100"),  # 80 GB: a loose fit for 16 GB of weights
        build(Spec("rtx4090", outstanding=9), "rtx4090-busy"),  # 24 GB: the tightest fit that holds them
    ]
    assert chosen("capacity-only", nodes) == ["rtx4090-busy"]


def test_petals_like_is_the_highest_advertised_throughput_even_when_busy() -> None:
    nodes = [build(Spec("h100-sxm", outstanding=50), "h100-busy"), build(Spec("rtx4090"), "rtx4090-idle")]
    assert chosen("petals-like", nodes) == ["h100-busy"]
    assert chosen("least-loaded", nodes) == ["rtx4090-idle"]


def test_baselines_still_respect_capability() -> None:
    """A baseline never sends llama-3-70b to a card that cannot hold it (the filters they keep)."""
    nodes = [
        build(Spec("rtx4090", offers=(("llama-3-70b", "float16", "q4_k_m", None),)), "small"),
        build(Spec("h100-sxm", offers=(("llama-3-70b", "float16", "q4_k_m", None),)), "big"),
    ]
    for name in BASELINES:
        profile = named_profile(name)
        decision = schedule(request(model="llama-3-70b"), nodes, profile, random.Random(0), NOW)
        assert decision.chosen == "big", name  # ~40 GB at q4: fits the 80 GB card, not the 24 GB one


def test_latency_ewma_prefers_the_lowest_observed_average_and_tries_unobserved_nodes() -> None:
    import dataclasses

    slow, fast, fresh = (build(Spec("h100-sxm"), n) for n in ("slow", "fast", "fresh"))
    slow = dataclasses.replace(slow, latency_ewma_s=1.2)
    fast = dataclasses.replace(fast, latency_ewma_s=0.2)
    assert chosen("latency-ewma", [slow, fast]) == ["fast"]
    assert chosen("latency-ewma", [slow, fast, fresh]) == ["fresh"]  # not yet observed: tried first


def test_ewma_moves_toward_observations() -> None:
    from gridserve.scheduler.baselines import ewma

    assert ewma(None, 1.0) == 1.0
    assert ewma(1.0, 2.0) == pytest.approx(1.3)
