"""Scheduling on the prefix index: prefill predicted on the uncached part, on each node's own hardware; hits
join a sampled pool; decisions explain the reuse."""

import random

import pytest
from tests.unit.test_scheduler import (
    DEFAULT_DOC,
    NO_EXPLORATION,
    NOW,
    PROFILE,
    Spec,
    Tele,
    build,
    offer,
    profile_variant,
    request,
    schedule,
)

from gridserve.scheduler import Profile, Scheduler
from gridserve.scheduler.context import Context
from gridserve.scheduler.vector import Columns
from gridserve.types import NodeState

MODEL = "qwen2.5-7b"  # a 32k context: long prompts fit
PROMPT = 12_000
PRICE = 0.3
"""Both at one price: with latency the only signal that differs, a hit must win on its predicted latency."""
SLOW = Spec(accelerator="rtx3090", offers=(offer(MODEL),), price=PRICE)
FAST = Spec(accelerator="rtx4090", offers=(offer(MODEL),), price=PRICE)
"""Nearly the same memory bandwidth (decode), 2.3x apart in FP16 compute (prefill)."""
DEFAULT_PICKER = DEFAULT_DOC["picker"]
SLO_FIRST = profile_variant("slo-first", {**DEFAULT_PICKER, "args": {**DEFAULT_PICKER["args"], "exploration": 0.0}})
"""The default picker (SLO first, prefix margin) without exploration."""
NO_MARGIN = profile_variant(
    "no-margin", {**DEFAULT_PICKER, "args": {**DEFAULT_PICKER["args"], "exploration": 0.0, "prefix_margin": 0.0}}
)
EXPLORING = profile_variant("exploring", {**DEFAULT_PICKER, "args": {**DEFAULT_PICKER["args"], "exploration": 1.0}})


@pytest.mark.parametrize("profile", [NO_EXPLORATION, SLO_FIRST], ids=lambda p: p.name)
def test_a_hit_on_a_slow_card_wins_only_where_it_predicts_the_lower_ttft(profile: Profile) -> None:
    slow, fast = build(SLOW, "n-slow-3090"), build(FAST, "n-fast-4090")
    chosen = {}
    for hit in range(0, PROMPT, 250):
        req = request(MODEL, PROMPT, 64, cached_tokens=((slow.node_id, hit),) if hit else ())
        decision = schedule(req, [slow, fast], profile)
        by_id = {c.node_id: c for c in decision.candidates}
        slow_ttft, fast_ttft = by_id[slow.node_id].predicted_ttft_s, by_id[fast.node_id].predicted_ttft_s
        assert slow_ttft is not None and fast_ttft is not None
        if decision.chosen == slow.node_id:
            assert slow_ttft < fast_ttft, (hit, slow_ttft, fast_ttft)
        chosen[hit] = decision.chosen
    assert chosen[0] == fast.node_id  # no hit: the 4090 prefills 12k tokens 2.3x sooner than the 3090
    assert chosen[PROMPT - 250] == slow.node_id  # nearly all cached: the 3090 answers first


def test_prefill_is_predicted_on_the_uncached_part_on_every_path() -> None:
    slow, fast = build(SLOW, "n-slow-3090"), build(FAST, "n-fast-4090")
    req = request(MODEL, PROMPT, 64, cached_tokens=((slow.node_id, 10_000), ("n-not-in-pool", 5)))
    cold = request(MODEL, PROMPT - 10_000, 64)
    ctx, cold_ctx = Context.build(req, NOW), Context.build(cold, NOW)
    cols = Columns.of(ctx, [slow, fast])
    ttft, _ = cols.prediction(ctx, loaded=True)
    # the one-node path and the columns agree, and a 10k hit on 12k predicts as a 2k prompt would
    for row, node in enumerate((slow, fast)):
        one = ctx.prediction(node)
        assert one is not None and one.ttft_s == pytest.approx(float(ttft[row]), rel=1e-12)
    slow_cold = cold_ctx.prediction(slow)
    fast_full = Context.build(request(MODEL, PROMPT, 64), NOW).prediction(fast)
    assert slow_cold is not None and fast_full is not None
    assert float(ttft[0]) == pytest.approx(slow_cold.ttft_s, rel=1e-12)
    assert float(ttft[1]) == pytest.approx(fast_full.ttft_s, rel=1e-12)


def test_the_compiled_kernel_leaves_requests_with_hits_to_the_columns() -> None:
    slow, fast = build(SLOW, "n-slow-3090"), build(FAST, "n-fast-4090")
    scheduler = Scheduler(NO_EXPLORATION, compiled=True)
    req = request(MODEL, PROMPT, 64, cached_tokens=((slow.node_id, PROMPT - 100),))
    compiled = scheduler.schedule(req, [slow, fast], random.Random(0), NOW)
    assert compiled.chosen == schedule(req, [slow, fast], NO_EXPLORATION).chosen == slow.node_id


def test_nodes_holding_the_prefix_always_join_a_sampled_pool() -> None:
    assert PROFILE.sample == 256
    pool = [build(Spec(accelerator="rtx4090", offers=(offer(MODEL),)), f"n{i:04d}") for i in range(700)]
    holder = pool[613].node_id
    for seed in range(12):
        req = request(MODEL, 4_000, 64, cached_tokens=((holder, 3_900),))
        decision = schedule(req, pool, PROFILE, seed=seed)
        assert decision.sampled is not None and decision.sampled[1] == 700
        assert decision.candidate(holder) is not None  # in every sample, whatever the draw


def test_the_explanation_names_the_reuse_and_what_it_saves_on_that_hardware() -> None:
    slow, fast = build(SLOW, "n-slow-3090"), build(FAST, "n-fast-4090")
    req = request(MODEL, PROMPT, 64, cached_tokens=((slow.node_id, 11_264),))
    decision = schedule(req, [slow, fast], NO_EXPLORATION)
    assert decision.chosen == slow.node_id
    candidate = decision.candidate(slow.node_id)
    assert candidate is not None and candidate.cached_tokens == 11_264
    assert candidate.prefill_saved_s is not None
    # 2 x params x tokens over the RTX 3090's prefill FLOPS (71 TFLOPS x 0.5): ~4.8 s for 11,264 tokens
    assert candidate.prefill_saved_s == pytest.approx(2 * 7.62e9 * 11_264 / (71e12 * 0.5), rel=0.01)
    reuse = f"reuses 11,264 of {PROMPT:,} prompt tokens (saves ~4.8 s of prefill on NVIDIA GeForce RTX 3090)"
    assert reuse in decision.explanation
    assert decision.candidate(fast.node_id).as_dict().get("cached_tokens") is None  # type: ignore[union-attr]


def test_a_node_with_no_free_slot_that_holds_the_prefix_counts_as_able_to_start_at_once() -> None:
    """The SLO-first picker prefers nodes that can start a request at once; a node holding most of the prompt
    counts as one (its queue wait is in its prediction, and the prefill it skips is grid work saved)."""
    slots = 8  # the RTX 4090's batch slots in the catalogue
    idle = build(Spec(accelerator="rtx4090", offers=(offer(MODEL),), price=PRICE, state=NodeState.PROBATION), "n-idle")
    full = Spec(accelerator="rtx4090", offers=(offer(MODEL),), price=PRICE, telemetry=Tele(active_requests=slots))
    busy = build(full, "n-busy")
    cold = schedule(request(MODEL, 8_000, 64), [idle, busy], SLO_FIRST)
    assert cold.chosen == idle.node_id  # the only node with a free slot, though it scores lower (probation)
    assert cold.candidate(busy.node_id).score > cold.candidate(idle.node_id).score  # type: ignore[union-attr]
    warm = schedule(request(MODEL, 8_000, 64, cached_tokens=((busy.node_id, 7_000),)), [idle, busy], SLO_FIRST)
    assert warm.chosen == busy.node_id and "can start it at once" in warm.explanation
    hit, other = warm.candidate(busy.node_id), warm.candidate(idle.node_id)
    assert hit is not None and other is not None
    assert hit.predicted_ttft_s is not None and other.predicted_ttft_s is not None
    assert hit.predicted_ttft_s < other.predicted_ttft_s


def test_exploration_never_spends_a_prefix_hit() -> None:
    known = build(FAST, "n-known")
    newcomer = build(Spec(accelerator="rtx4090", offers=(offer(MODEL),), price=PRICE, history=None), "n-new")
    for seed in range(5):
        assert schedule(request(MODEL, 4_000, 64), [known, newcomer], EXPLORING, seed).chosen == newcomer.node_id
        req = request(MODEL, 4_000, 64, cached_tokens=((known.node_id, 3_000),))
        assert schedule(req, [known, newcomer], EXPLORING, seed).chosen == known.node_id


def test_within_the_margin_a_node_holding_more_that_answers_sooner_wins() -> None:
    """A small hit on a dearer node: it scores a little lower, yet answers sooner and saves grid work."""
    cheap = build(Spec(accelerator="rtx4090", offers=(offer(MODEL),), price=PRICE), "n-cheap")
    dear = build(Spec(accelerator="rtx4090", offers=(offer(MODEL),), price=0.5), "n-dear")
    req = request(MODEL, PROMPT, 64, cached_tokens=((dear.node_id, 500),))
    without = schedule(req, [cheap, dear], NO_MARGIN)
    assert without.chosen == cheap.node_id
    hit, other = without.candidate(dear.node_id), without.candidate(cheap.node_id)
    assert hit is not None and other is not None and hit.predicted_ttft_s and other.predicted_ttft_s
    assert other.score - 0.03 < hit.score < other.score and hit.predicted_ttft_s < other.predicted_ttft_s
    with_margin = schedule(req, [cheap, dear], SLO_FIRST)
    assert with_margin.chosen == dear.node_id and "holds more of the prompt" in with_margin.explanation
    # beyond the margin the score decides: the same hit on a node on probation (half its reliability) is not
    on_probation = build(
        Spec(accelerator="rtx4090", offers=(offer(MODEL),), price=0.5, state=NodeState.PROBATION), "n-dear"
    )
    assert schedule(req, [cheap, on_probation], SLO_FIRST).chosen == cheap.node_id


def test_when_no_node_meets_the_slo_the_margin_still_prefers_the_hit_that_answers_sooner() -> None:
    cheap = build(Spec(accelerator="rtx4090", offers=(offer(MODEL),), price=PRICE), "n-cheap")
    dear = build(Spec(accelerator="rtx4090", offers=(offer(MODEL),), price=0.5), "n-dear")
    req = request(MODEL, PROMPT, 64, cached_tokens=((dear.node_id, 500),), ttft_slo_s=0.01)
    assert schedule(req, [cheap, dear], NO_MARGIN).chosen == cheap.node_id
    decision = schedule(req, [cheap, dear], SLO_FIRST)
    assert decision.chosen == dear.node_id
    assert (
        "holds more of the prompt" in decision.explanation
        and "none is predicted to meet the SLO" in decision.explanation
    )
