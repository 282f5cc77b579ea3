"""Canaries look like the traffic around them: their sampling settings come from recent client requests (a node
that answers greedy requests honestly and alters the rest meets canaries of both kinds), and a sampled canary
carries a seed, as every sampled request the gateway sends does."""

import random

from gridserve.gateway.integrity.audit import CANARY_MAX_TOKENS, DEFAULT_MIX, TrafficMix, canary_job
from gridserve.gateway.integrity.canary_prompts import prompt_count
from gridserve.types import GenerateRequest, SamplingParams

MODEL = "gridserve-tiny"


def client_job(temperature: float, top_p: float, model: str = MODEL, max_tokens: int = 8) -> GenerateRequest:
    sampling = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=1)
    return GenerateRequest(request_id="cmpl-x", model=model, prompt="hello", sampling=sampling)


def test_before_any_traffic_canaries_are_greedy_or_sample_at_the_default() -> None:
    rng = random.Random(3)
    jobs = [canary_job(MODEL, rng, TrafficMix()) for _ in range(200)]
    settings = {(j.sampling.temperature, j.sampling.top_p, j.sampling.max_tokens) for j in jobs}
    assert settings == set(DEFAULT_MIX)
    assert all((j.sampling.seed is None) == j.sampling.greedy for j in jobs)


def test_canaries_take_the_settings_of_recent_traffic_for_their_model() -> None:
    mix = TrafficMix()
    for _ in range(30):
        mix.note(client_job(0.7, 0.9))
        mix.note(client_job(0.0, 1.0))
        mix.note(client_job(1.5, 0.5, model="other-model"))
    rng = random.Random(5)
    jobs = [canary_job(MODEL, rng, mix) for _ in range(200)]
    settings = [(j.sampling.temperature, j.sampling.top_p) for j in jobs]
    assert set(settings) == {(0.7, 0.9), (0.0, 1.0)}  # never another model's settings
    assert 60 < settings.count((0.7, 0.9)) < 140  # in proportion to the traffic
    assert len({j.sampling.seed for j in jobs if not j.sampling.greedy}) == settings.count((0.7, 0.9))  # fresh seeds


def test_only_the_latest_requests_count() -> None:
    mix = TrafficMix(keep=10)
    for _ in range(50):
        mix.note(client_job(0.0, 1.0))
    for _ in range(10):
        mix.note(client_job(0.8, 1.0))
    rng = random.Random(0)
    assert {canary_job(MODEL, rng, mix).sampling.temperature for _ in range(50)} == {0.8}


def test_canaries_take_the_lengths_of_recent_traffic_capped() -> None:
    mix = TrafficMix()
    for length in (5, 40, 4000):
        mix.note(client_job(0.0, 1.0, max_tokens=length))
    rng = random.Random(2)
    assert {canary_job(MODEL, rng, mix).sampling.max_tokens for _ in range(100)} == {5, 40, CANARY_MAX_TOKENS}


def test_canary_prompts_vary_like_requests_do() -> None:
    rng = random.Random(4)
    prompts = [canary_job(MODEL, rng).messages[0].content for _ in range(1000)]  # type: ignore[index]
    assert prompt_count() > 7000
    assert len(set(prompts)) > 900, "a thousand canaries, hardly a repeat: no short list to recognise"
