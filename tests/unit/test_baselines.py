"""The baseline routing policies behave as named, on small hand-checked grids."""

import random
from collections import Counter
from typing import Any

import pytest
from tests.unit.test_scheduler import NOW, Spec, Tele, build, grid, offer, request

from gridserve.catalog import HARDWARE
from gridserve.scheduler import ProfileError, named_profile, schedule
from gridserve.scheduler.baselines import BASELINES
from gridserve.scheduler.snapshot import M_KV_PER_TOKEN, M_MEM_WEIGHTS
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


# -- the prefix-cache-aware baselines (llm-d, SGLang, Dynamo) over the same `cached_tokens` ------------------------

PREFIX_MODEL = "qwen2.5-7b"
PROMPT = 8_192


def prefix_node(name: str, accelerator: str = "rtx4090", *, outstanding: int = 0, kv_frac: float = 0.0) -> Any:
    """A node serving PREFIX_MODEL with `outstanding` requests in flight (that many in its batch, up to its slots)
    and `kv_frac` of its device memory in KV use beside the weights."""
    slots = HARDWARE[accelerator].batch_slots
    tele = Tele(memory_used_frac=kv_frac, active_requests=min(outstanding, slots))
    spec = Spec(accelerator, offers=(offer(PREFIX_MODEL),), outstanding=outstanding, telemetry=tele)
    return build(spec, name)


def pick(profile_name: str, nodes: list[Any], cached: dict[str, int], seed: int = 0) -> str:
    req = request(PREFIX_MODEL, PROMPT, 64, cached_tokens=tuple(cached.items()))
    return str(schedule(req, nodes, named_profile(profile_name), random.Random(seed), NOW).chosen)


def test_the_prefix_baselines_are_packaged_and_in_the_simulator_defaults() -> None:
    from gridserve.cli.simulate import DEFAULT_POLICIES

    for name in ("prefix-load", "cache-aware", "kv-overlap"):
        assert name in BASELINES and name in DEFAULT_POLICIES.split(",")
        assert named_profile(name).name == name


def test_prefix_load_weighs_the_cached_share_against_queue_and_kv_use_blind_to_speed() -> None:
    holder, other = prefix_node("holder", "t4"), prefix_node("other", "h100-sxm")
    # 3 x (share cached) beats an idle H100: the T4's speed is not a signal
    assert pick("prefix-load", [holder, other], {"holder": PROMPT // 2}) == "holder"
    assert pick("prefix-load", [holder, other], {}) in {"holder", "other"}
    # a queue of 8 waiting (2 x (1 - 1/9) = 1.78) outweighs half the prompt cached (3 x 0.5 = 1.5)
    busy = prefix_node("holder", "t4", outstanding=16)
    assert pick("prefix-load", [busy, other], {"holder": PROMPT // 2}) == "other"
    # with no hit anywhere, less KV memory in use wins
    full, empty = prefix_node("full", kv_frac=0.3), prefix_node("empty", kv_frac=0.05)
    assert pick("prefix-load", [full, empty], {}) == "empty"


def test_cache_aware_takes_the_longest_match_above_its_threshold_else_the_shortest_queue() -> None:
    a, b, idle = (prefix_node(n, outstanding=k) for n, k in (("a", 6), ("b", 5), ("idle", 0)))
    nodes = [a, b, idle]
    assert pick("cache-aware", nodes, {"a": 6_000, "b": 4_500}) == "a"  # 73% cached > 50%: longest match
    assert pick("cache-aware", nodes, {"a": 4_000, "b": 3_000}) == "idle"  # 49%: below threshold, shortest queue
    assert pick("cache-aware", nodes, {}) == "idle"


def test_cache_aware_turns_to_the_shortest_queue_when_the_load_is_imbalanced() -> None:
    hot, warm, cold = prefix_node("hot", outstanding=40), prefix_node("warm", outstanding=9), prefix_node("cold")
    # 40 - 0 > 32 and 40 > 0 x 1.0001: imbalanced, whatever the match
    assert pick("cache-aware", [hot, warm, cold], {"hot": PROMPT - 1}) == "cold"
    # 40 - 9 = 31 <= 32: balanced, the match decides
    assert pick("cache-aware", [hot, warm], {"hot": PROMPT - 1}) == "hot"


def test_kv_overlap_picks_the_lowest_prefill_plus_decode_block_cost() -> None:
    # rtx4090 with qwen2.5-7b: 24 GiB; 10% of it in KV use is ~44k tokens (~splits into 86 blocks of 512)
    holder, idle = prefix_node("holder", outstanding=1, kv_frac=0.10), prefix_node("idle")
    # 8,191 of 8,192 cached saves 16 prefill blocks: fewer than the ~86 decode blocks the holder carries
    assert pick("kv-overlap", [holder, idle], {"holder": PROMPT - 1}) == "idle"
    light = prefix_node("holder", outstanding=1, kv_frac=0.01)  # ~9 blocks in use: the hit saves more
    assert pick("kv-overlap", [light, idle], {"holder": PROMPT - 1}) == "holder"
    # no hit anywhere: the least KV in use
    assert pick("kv-overlap", [light, idle], {}) == "idle"


def test_kv_overlap_cost_is_prefill_blocks_times_the_weight_plus_decode_blocks() -> None:
    from gridserve.scheduler.context import Context
    from gridserve.scheduler.prefix_baselines import BLOCK_TOKENS, KvCostScorer
    from gridserve.scheduler.vector import Columns

    node = prefix_node("n", outstanding=1, kv_frac=0.05)
    req = request(PREFIX_MODEL, PROMPT, 64, cached_tokens=(("n", 3 * BLOCK_TOKENS),))
    ctx = Context.build(req, NOW)
    cols = Columns.of(ctx, [node])
    in_use = (node.telemetry.memory_used_bytes - cols.mcol(M_MEM_WEIGHTS)[0]) / cols.mcol(M_KV_PER_TOKEN)[0]
    for weight in (0.5, 1.0, 2.0):
        _, cost = KvCostScorer(overlap_weight=weight).score(ctx, cols)
        expected = weight * (PROMPT - 3 * BLOCK_TOKENS) / BLOCK_TOKENS + (in_use + PROMPT) / BLOCK_TOKENS
        assert float(cost[0]) == pytest.approx(expected)
