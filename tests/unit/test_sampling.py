"""Tests for token selection: greedy, seeded temperature sampling and top-p."""

from __future__ import annotations

from collections import Counter

import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from gridserve.engines.sampling import SAMPLE_TOLERANCE, draw_miss, fresh_seed, mix, pick_token
from gridserve.types import SamplingParams

seeds = st.integers(0, 2**63 - 1)
steps = st.integers(0, 100_000)


@st.composite
def distinct_logits(draw: st.DrawFn, min_size: int = 2, max_size: int = 64) -> torch.Tensor:
    """1-D float32 logits with no ties (ties make 'the argmax' ambiguous)."""
    n = draw(st.integers(min_size, max_size))
    values = draw(
        st.lists(
            st.integers(-2000, 2000),
            min_size=n,
            max_size=n,
            unique=True,
        )
    )
    return torch.tensor([v / 100 for v in values], dtype=torch.float32)


def params(**kw: object) -> SamplingParams:
    return SamplingParams.model_validate(kw)


@given(logits=distinct_logits(), seed=seeds, step=steps)
def test_temperature_zero_is_argmax(logits: torch.Tensor, seed: int, step: int) -> None:
    token = pick_token(logits, params(temperature=0.0), seed, step)
    assert logits[token] == logits.max()
    assert token == max(range(len(logits)), key=lambda i: float(logits[i]))


@given(logits=distinct_logits(), seed=seeds, step=steps, top_p=st.floats(0.01, 1.0))
def test_temperature_zero_ignores_seed_and_top_p(logits: torch.Tensor, seed: int, step: int, top_p: float) -> None:
    a = pick_token(logits, params(temperature=0.0, top_p=top_p), seed, step)
    b = pick_token(logits, params(temperature=0.0), 0, 0)
    assert a == b


@given(
    logits=distinct_logits(),
    seed=seeds,
    step=steps,
    temperature=st.floats(0.05, 2.0),
    top_p=st.floats(0.05, 1.0),
)
def test_seeded_sampling_is_a_function_of_seed_step_and_logits(
    logits: torch.Tensor, seed: int, step: int, temperature: float, top_p: float
) -> None:
    p = params(temperature=temperature, top_p=top_p)
    first = pick_token(logits, p, seed, step)
    # Other draws in between (other requests, other steps) must not disturb the result.
    pick_token(logits, p, seed + 1, step + 1)
    torch.manual_seed(12345)
    torch.rand(10)
    assert pick_token(logits.clone(), p, seed, step) == first


def test_seeded_sampling_varies_across_seeds_and_steps() -> None:
    logits = torch.zeros(50)  # uniform: every token equally likely
    p = params(temperature=1.0)
    by_seed = Counter(pick_token(logits, p, seed, 0) for seed in range(400))
    by_step = Counter(pick_token(logits, p, 7, step) for step in range(400))
    # 400 uniform draws over 50 tokens: seeing under 30 distinct tokens is astronomically unlikely.
    assert len(by_seed) > 30
    assert len(by_step) > 30
    # No token dominates.
    assert max(by_seed.values()) < 40
    assert max(by_step.values()) < 40


def test_sampling_follows_the_distribution_roughly() -> None:
    """Token 0 has probability e/(e + 1 + 1) ~ 0.576 at temperature 1."""
    logits = torch.tensor([1.0, 0.0, 0.0])
    p = params(temperature=1.0)
    draws = Counter(pick_token(logits, p, seed, 3) for seed in range(2000))
    expected = torch.softmax(logits, dim=-1)[0].item()
    assert abs(draws[0] / 2000 - expected) < 0.06
    assert draws[1] > 0 and draws[2] > 0


def test_low_temperature_concentrates_on_argmax() -> None:
    logits = torch.tensor([0.0, 1.0, 0.5, -1.0])
    p = params(temperature=0.01)
    assert all(pick_token(logits, p, seed, 0) == 1 for seed in range(200))


@given(logits=distinct_logits(), seed=seeds, step=steps, temperature=st.floats(0.05, 2.0))
def test_tiny_top_p_is_argmax(logits: torch.Tensor, seed: int, step: int, temperature: float) -> None:
    token = pick_token(logits, params(temperature=temperature, top_p=1e-6), seed, step)
    assert token == int(torch.argmax(logits))


@given(
    logits=distinct_logits(min_size=3),
    seed=seeds,
    step=steps,
    temperature=st.floats(0.1, 2.0),
    top_p=st.floats(0.01, 0.99),
)
@settings(max_examples=300)
def test_tokens_outside_the_nucleus_are_never_sampled(
    logits: torch.Tensor, seed: int, step: int, temperature: float, top_p: float
) -> None:
    """A token is in the nucleus iff the mass of the strictly more likely tokens is at most top_p."""
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    token = pick_token(logits, params(temperature=temperature, top_p=top_p), seed, step)
    mass_before = float(probs[probs > probs[token]].sum())
    assert mass_before <= top_p + 1e-5


@given(logits=distinct_logits(min_size=3), temperature=st.floats(0.1, 2.0), top_p=st.floats(0.05, 0.95))
@settings(max_examples=50, deadline=None)
def test_top_p_samples_every_nucleus_token_eventually(logits: torch.Tensor, temperature: float, top_p: float) -> None:
    """The nucleus is not over-trimmed: across many seeds, the sampled set equals the nucleus (when it is small)."""
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    order = torch.argsort(probs, descending=True)
    before = torch.cumsum(probs[order], dim=0) - probs[order]
    # Skip cases where a token sits on the boundary (float32 vs float64 could disagree) or is too rare to see.
    assume(bool((abs(before - top_p) > 1e-4).all()))
    nucleus = {int(order[i]) for i in range(len(order)) if float(before[i]) <= top_p}
    assume(len(nucleus) <= 4)
    nucleus_mass = sum(float(probs[i]) for i in nucleus)
    assume(min(float(probs[i]) for i in nucleus) / nucleus_mass > 0.05)
    p = params(temperature=temperature, top_p=top_p)
    seen = {pick_token(logits, p, seed, 0) for seed in range(400)}
    assert seen == nucleus


def test_masked_tokens_are_never_sampled() -> None:
    """-inf logits (the tiny model's mask) have zero probability."""
    logits = torch.zeros(20)
    banned = [0, 3, 4, 11, 19]
    logits[banned] = float("-inf")
    p = params(temperature=1.5)
    picks = {pick_token(logits, p, seed, seed % 7) for seed in range(500)}
    assert picks.isdisjoint(banned)
    assert len(picks) == 20 - len(banned)


@given(seed=seeds, step=steps)
def test_mix_is_deterministic_and_in_range(seed: int, step: int) -> None:
    value = mix(seed, step)
    assert value == mix(seed, step)
    assert 0 <= value < 2**63


def test_mix_separates_seeds_and_steps() -> None:
    values = {mix(seed, step) for seed in range(30) for step in range(30)}
    assert len(values) == 900
    # (seed, step) pairs that would collide under naive concatenation stay distinct.
    assert mix(1, 23) != mix(12, 3)


def test_fresh_seed_is_random_and_63_bit() -> None:
    drawn = [fresh_seed() for _ in range(50)]
    assert len(set(drawn)) == 50
    assert all(0 <= s < 2**63 for s in drawn)


@given(
    logits=distinct_logits(min_size=3),
    seed=seeds,
    step=steps,
    temperature=st.floats(0.1, 2.0),
    top_p=st.sampled_from([1.0, 0.95, 0.7, 0.3]),
)
@settings(max_examples=300)
def test_the_verifier_finds_every_honest_draw_inside_its_interval(
    logits: torch.Tensor, seed: int, step: int, temperature: float, top_p: float
) -> None:
    p = params(temperature=temperature, top_p=top_p)
    token = pick_token(logits, p, seed, step)
    assert draw_miss(logits, p, seed, step, token) <= 1e-9


@given(logits=distinct_logits(min_size=3), seed=seeds, step=steps, temperature=st.floats(0.3, 2.0))
@settings(max_examples=200)
def test_honest_float_noise_stays_within_the_tolerance(
    logits: torch.Tensor, seed: int, step: int, temperature: float
) -> None:
    """The verifier's logits differ from the node's by float noise (~1e-5 here, more than fp32 runs differ by)."""
    p = params(temperature=temperature)
    token = pick_token(logits, p, seed, step)
    noisy = logits + torch.randn(logits.shape, generator=torch.Generator().manual_seed(seed % 1000)) * 1e-5
    assert draw_miss(noisy, p, seed, step, token) <= SAMPLE_TOLERANCE


def test_a_token_swapped_for_another_is_caught_almost_always() -> None:
    """A node that answers another token than the seed draws (here: its neighbour in the vocabulary) misses the
    draw by more than the tolerance unless the draw sits within the tolerance of the two tokens' shared edge: with
    20 tokens of 2-9% each, that is ~2% of draws."""
    logits = torch.linspace(-1.0, 1.0, 20)
    p = params(temperature=1.0)
    caught = 0
    for seed in range(500):
        token = pick_token(logits, p, seed, 0)
        swapped = token ^ 1
        caught += draw_miss(logits, p, seed, 0, swapped) > SAMPLE_TOLERANCE
    assert caught >= 475, caught


def test_a_draw_does_not_depend_on_the_vocabulary_beyond_the_token() -> None:
    """Appending never-sampled (-inf) tokens after the vocabulary changes no draw (masked padding rows)."""
    logits = torch.tensor([0.5, 1.5, -0.2, 0.9])
    padded = torch.cat([logits, torch.full((6,), float("-inf"))])
    p = params(temperature=0.8)
    assert [pick_token(logits, p, s, 1) for s in range(100)] == [pick_token(padded, p, s, 1) for s in range(100)]
