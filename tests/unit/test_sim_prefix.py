"""The simulator's prefix caches: Mooncake traces (block ids), each node's block cache (LRU within its KV room,
emptied by churn), prefill on the uncached part only, the simulated gateway's index, and the cache-hit rate."""

import json
import random
from importlib import resources
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from gridserve.catalog import HARDWARE, MODELS
from gridserve.perfmodel import predict
from gridserve.scheduler import Profile, named_profile, profile_from_dict
from gridserve.sim import report as rep
from gridserve.sim.cache import BlockCache
from gridserve.sim.engine import SimConfig, Simulation
from gridserve.sim.grid import DECENTRALIZED_MIX, cache_blocks, model_for_trace
from gridserve.sim.trace import TOKENS_PER_BLOCK, TraceRequest, cached_limit, load_trace, prefix_ceiling, scaled

CALM = {"churn": False, "thermal_per_hour": 0.0, "dishonest_share": 0.0, "straggler_share": 0.0, "noise_sigma": 0.0}


@settings(max_examples=200, deadline=None)
@given(
    capacity=st.integers(0, 12),
    prompts=st.lists(st.lists(st.integers(0, 30), max_size=20), max_size=30),
)
def test_a_block_cache_never_holds_more_than_its_capacity_and_keeps_the_most_recent(
    capacity: int, prompts: list[list[int]]
) -> None:
    cache = BlockCache(capacity)
    for blocks in prompts:
        cache.insert(blocks)
        assert len(cache) <= capacity
        assert cache.match(blocks) <= len(blocks)
        recent = list(dict.fromkeys(reversed(blocks)))[:capacity]  # the last `capacity` distinct blocks inserted
        assert all(b in cache for b in recent)


@settings(max_examples=200, deadline=None)
@given(prompt=st.integers(1, 200_000), blocks=st.integers(0, 500))
def test_cached_tokens_never_reach_the_prompt(prompt: int, blocks: int) -> None:
    cached = cached_limit(prompt, blocks)
    assert 0 <= cached < prompt and cached <= blocks * TOKENS_PER_BLOCK


def test_a_mooncake_trace_carries_its_block_ids_and_an_azure_style_one_none(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    rows = [
        {"timestamp": 2000, "input_length": 1000, "output_length": 5, "hash_ids": [0, 1]},
        {"timestamp": 0, "input_length": 600, "output_length": 3, "hash_ids": [0, 2]},
        {"timestamp": 1000, "input_length": 700, "output_length": 4},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    trace = load_trace(path)
    assert [r.blocks for r in trace] == [(0, 2), (), (0, 1)]
    assert [r.at_s for r in scaled(trace, 2.0)] == [0.0, 0.5, 1.0]
    assert scaled(trace, 2.0)[2].blocks == (0, 1)
    # one block of four repeats an earlier prefix; of 2,300 prompt tokens it covers 512
    assert prefix_ceiling(trace) == (pytest.approx(1 / 4), pytest.approx(512 / 2300))


def test_the_real_trace_ceiling_is_what_the_issue_says() -> None:
    path = Path(__file__).resolve().parents[2] / "../shared/data/mooncake-2025/synthetic_trace.jsonl"
    if not path.exists():
        pytest.skip("the Mooncake trace is not on this machine")
    blocks, tokens = prefix_ceiling(load_trace(path))
    assert blocks == pytest.approx(0.64, abs=0.005) and tokens == pytest.approx(0.65, abs=0.005)


def test_cache_capacity_is_the_cards_memory_less_the_weights() -> None:
    model, hw = MODELS["qwen2.5-7b-1m"], HARDWARE["rtx4090"]
    room = hw.memory_gib * 2**30 - model.weight_bytes("float16", "none")
    assert cache_blocks(model, hw, "float16", "none") == int(room / model.kv_bytes_per_token()) // TOKENS_PER_BLOCK
    assert cache_blocks(MODELS["llama-3.1-70b"], HARDWARE["t4"], "float16", "q4_k_m") == 0  # does not even fit


def test_the_default_model_holds_the_trace_or_says_how_many_it_cannot() -> None:
    short = [TraceRequest(0.0, 4_000, 100)]
    assert model_for_trace(short, DECENTRALIZED_MIX) == ("llama-3-8b", 0)
    long = [TraceRequest(0.0, 120_000, 100), TraceRequest(1.0, 190_000, 10)]
    name, unservable = model_for_trace(long, DECENTRALIZED_MIX)
    assert MODELS[name].max_context >= 190_010 and unservable == 0
    assert name == "qwen2.5-7b-1m"  # the smallest model whose context holds 190k tokens
    # every long-context model fits the default mix's smallest card (T4, 16 GB) at some quantization
    for spec in ("llama-3.1-8b", "qwen2.5-7b-128k", "qwen2.5-7b-1m"):
        assert cache_blocks(MODELS[spec], HARDWARE["t4"], "float16", "q8_0") >= 0


def conversation(turns: int, gap_s: float, first_blocks: int = 8, per_turn: int = 2) -> list[TraceRequest]:
    """One chat: each turn resends the whole history and adds `per_turn` blocks."""
    out = []
    for t in range(turns):
        n = first_blocks + per_turn * t
        out.append(TraceRequest(t * gap_s, n * TOKENS_PER_BLOCK, 16, tuple(range(n))))
    return out


def greedy_default() -> Profile:
    """The default profile without exploration (a newcomer's turn would break a chat's affinity by design)."""
    doc = yaml.safe_load(resources.files("gridserve.scheduler").joinpath("profiles/default.yaml").read_text())
    return profile_from_dict({**doc, "picker": {"type": "max-score", "args": {"exploration": 0.0, "slo_first": True}}})


def run(trace: list[TraceRequest], **config: object) -> Simulation:
    sim = Simulation(SimConfig(nodes=6, model="qwen2.5-7b", seed=1, **{**CALM, **config}), greedy_default())  # type: ignore[arg-type]
    sim.outcomes_ = sim.run(trace)  # type: ignore[attr-defined]
    return sim


def test_a_later_turn_reuses_the_earlier_ones_and_prefills_only_the_rest() -> None:
    trace = conversation(turns=5, gap_s=30.0)
    sim = run(trace)
    outcomes = sim.outcomes_  # type: ignore[attr-defined]
    assert outcomes[0].cached_tokens == 0
    for prev, o in zip(trace, outcomes[1:], strict=False):
        assert o.cached_tokens == prev.prompt_tokens  # the whole previous turn, on the node that served it
        assert o.node_id == outcomes[0].node_id  # affinity across turns
    first, later = outcomes[0], outcomes[4]
    hw = sim.by_id[first.node_id].hw  # type: ignore[index]
    cold = predict(MODELS["qwen2.5-7b"], hw, prompt_tokens=trace[4].prompt_tokens).ttft_s
    assert later.ttft_s < cold  # its prefill skipped the cached part
    hit = rep.metrics(outcomes, sim.config)["cache_hit_rate"]
    assert hit == pytest.approx(sum(o.cached_tokens for o in outcomes) / sum(r.prompt_tokens for r in trace), abs=1e-4)


def test_without_block_ids_nothing_is_reused() -> None:
    trace = [TraceRequest(r.at_s, r.prompt_tokens, r.output_tokens) for r in conversation(turns=4, gap_s=30.0)]
    sim = run(trace)
    assert all(o.cached_tokens == 0 for o in sim.outcomes_)  # type: ignore[attr-defined]
    assert rep.metrics(sim.outcomes_, sim.config)["cache_hit_rate"] == 0.0  # type: ignore[attr-defined]
    assert sim.index.stats().holdings == 0


def test_a_node_that_leaves_comes_back_empty_and_the_index_forgets_it() -> None:
    trace = conversation(turns=2, gap_s=30.0)
    sim = Simulation(SimConfig(nodes=3, model="qwen2.5-7b", seed=1, **CALM), named_profile("default"))  # type: ignore[arg-type]
    sim.run(trace[:1])
    holder = next(n for n in sim.nodes if len(n.cache))
    assert sim.index.holds(holder.node_id) == len(trace[0].blocks)
    sim._leave(holder)
    assert len(holder.cache) == 0  # the ground truth: its KV memory went with it
    sim._detect(holder, holder.session)
    assert sim.index.holds(holder.node_id) == 0  # the gateway's view: marked down, dropped


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 1000), chats=st.integers(1, 4), churn=st.booleans())
def test_the_simulated_caches_stay_within_capacity_and_hits_within_the_prompt(
    seed: int, chats: int, churn: bool
) -> None:
    rng = random.Random(seed)
    trace: list[TraceRequest] = []
    for c in range(chats):
        base = 1000 * c
        for r in conversation(turns=rng.randint(1, 5), gap_s=rng.uniform(0.5, 20.0), first_blocks=rng.randint(1, 40)):
            trace.append(
                TraceRequest(
                    r.at_s + rng.uniform(0, 5), r.prompt_tokens, r.output_tokens, tuple(base + b for b in r.blocks)
                )
            )
    trace.sort(key=lambda r: r.at_s)
    config = {**CALM, "churn": churn, "uptime_mean_s": 20.0, "downtime_mean_s": 5.0}
    sim = Simulation(SimConfig(nodes=4, model="qwen2.5-7b", seed=seed, **config), named_profile("default"))  # type: ignore[arg-type]
    for node in sim.nodes:
        node.cache.capacity = rng.randint(1, 60)  # small caches: eviction at work
        sim.index.set_capacity(node.node_id, node.cache.capacity)
    outcomes = sim.run(trace)
    for node in sim.nodes:
        assert len(node.cache) <= node.cache.capacity
        assert sim.index.holds(node.node_id) <= node.cache.capacity
        assert node.kv_tokens == node.kv_window_tokens == 0 and node.active == 0  # every request's KV released
    for req, o in zip(trace, outcomes, strict=True):
        assert 0 <= o.cached_tokens < req.prompt_tokens
