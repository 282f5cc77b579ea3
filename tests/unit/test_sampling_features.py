"""vLLM's sampling extensions (`top_k`, `repetition_penalty`, `min_tokens`, `ignore_eos`), honoured by gridserve's
own engines under one TokenRule that the verifier re-executes: the rule itself (hypothesis), the tiny engine under
it, audits of honest and dishonest answers, the receipt checks, and the gateway's side (parsing, the 400 when no
node honours a feature, the runtime filter)."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gridserve.engines.sampling import TokenRule, draw_miss, nucleus_weights, pick_token
from gridserve.engines.tiny import EOS, TINY_MODEL
from gridserve.engines.torch_engine import TorchEngine
from gridserve.engines.upstream import UpstreamEngine
from gridserve.gateway.api.errors import APIError
from gridserve.gateway.api.openai_api import _require_features, parse, to_job
from gridserve.gateway.api.schemas import ChatCompletionRequest, CompletionRequest
from gridserve.gateway.integrity.audit import Verifier
from gridserve.gateway.integrity.receipts import ReceiptCheck, ReceiptChecker
from gridserve.trust import proofs
from gridserve.trust.testing import unsigned_receipt
from gridserve.types import GenerateRequest, SamplingParams, TokenEvent
from gridserve.types.wire import SAMPLING_FEATURES

seeds = st.integers(0, 2**63 - 1)


def params(**kw: Any) -> SamplingParams:
    return SamplingParams.model_validate({"max_tokens": 64, **kw})


@st.composite
def logits(draw: st.DrawFn, size: int = 24) -> torch.Tensor:
    values = draw(st.lists(st.integers(-900, 900), min_size=size, max_size=size, unique=True))
    return torch.tensor([v / 100 for v in values], dtype=torch.float32)


# --- the rule ---------------------------------------------------------------------------------------------------


@settings(deadline=None)  # torch on a shared machine: how long an example takes is not the point
@given(row=logits(), history=st.lists(st.integers(0, 23), max_size=10), penalty=st.floats(0.5, 3.0))
def test_the_repetition_penalty_is_vllms_on_seen_tokens_only(
    row: torch.Tensor, history: list[int], penalty: float
) -> None:
    rule = TokenRule(params(repetition_penalty=penalty), (), history=history[:5])
    for token in history[5:]:
        rule.note(token)
    scores = rule.scores(row, step=0)
    for i, (raw, got) in enumerate(zip(row.tolist(), scores.tolist(), strict=True)):
        want = (raw / penalty if raw > 0 else raw * penalty) if i in history else raw
        assert got == pytest.approx(want, rel=1e-6), i


@settings(deadline=None)  # torch on a shared machine: how long an example takes is not the point
@given(row=logits(), step=st.integers(0, 40), least=st.integers(0, 40), ignore=st.booleans())
def test_end_of_sequence_is_impossible_before_min_tokens_and_ends_only_without_ignore_eos(
    row: torch.Tensor, step: int, least: int, ignore: bool
) -> None:
    rule = TokenRule(params(min_tokens=least, ignore_eos=ignore), {EOS, 5})
    scores = rule.scores(row, step)
    blocked = step < least
    assert (scores[EOS] == float("-inf")) == blocked and (scores[5] == float("-inf")) == blocked
    others = [i for i in range(len(row)) if i not in (EOS, 5)]
    assert torch.equal(scores[others], row[others]), "only the end tokens are touched"
    assert rule.ends(EOS) == (not ignore) and not rule.ends(EOS + 1)
    assert torch.equal(row, row.clone()), "the caller's logits are not written"


@settings(deadline=None)  # torch on a shared machine: how long an example takes is not the point
@given(row=logits(), seed=seeds, step=st.integers(0, 10_000), k=st.integers(1, 24), top_p=st.floats(0.05, 1.0))
def test_top_k_draws_only_among_the_k_likeliest_and_the_verifier_finds_no_miss(
    row: torch.Tensor, seed: int, step: int, k: int, top_p: float
) -> None:
    sampling = params(temperature=1.0, top_k=k, top_p=top_p)
    token = pick_token(row, sampling, seed, step)
    likeliest = set(torch.topk(row, k).indices.tolist())
    assert token in likeliest
    assert draw_miss(row, sampling, seed, step, token) == 0.0
    weights = nucleus_weights(row, 1.0, top_p, k)
    assert 1 <= int((weights > 0).sum()) <= k and 0.0 < float(weights.sum()) <= 1.0 + 1e-9


@settings(deadline=None)  # torch on a shared machine: how long an example takes is not the point
@given(row=logits(), seed=seeds)
def test_top_k_of_one_is_the_argmax(row: torch.Tensor, seed: int) -> None:
    assert pick_token(row, params(temperature=1.3, top_k=1), seed, 0) == int(torch.argmax(row))


def test_a_request_names_the_features_it_turns_on() -> None:
    assert params().features() == ()
    on = params(top_k=5, repetition_penalty=1.1, min_tokens=3, ignore_eos=True).features()
    assert on == ("top_k", "repetition_penalty", "min_tokens", "ignore_eos")
    with pytest.raises(ValueError, match="min_tokens"):
        params(max_tokens=4, min_tokens=5)


# --- the tiny engine under the rule ---------------------------------------------------------------------------


def job(i: int, **sampling: Any) -> GenerateRequest:
    return GenerateRequest(
        request_id=f"cmpl-{i}",
        model=TINY_MODEL,
        prompt="Hello",
        sampling=params(**{"temperature": 1.0, "seed": i, **sampling}),
    )


def run(engine: TorchEngine, request: GenerateRequest) -> tuple[list[int], list[TokenEvent]]:
    async def go() -> list[TokenEvent]:
        return [e async for e in engine.generate(request)]

    events = asyncio.run(go())
    return [t for e in events for t in e.token_ids], events


def early_seeds(engine: TorchEngine, want: int = 6) -> list[tuple[int, int]]:
    """(seed, tokens before its end-of-sequence) for sampled answers to 'Hello' that end on it early."""
    found = []
    for seed in range(200):
        ids, events = run(engine, job(seed, max_tokens=48))
        if events[-1].finish_reason == "stop" and len(ids) >= 2:
            found.append((seed, len(ids)))
        if len(found) == want:
            return found
    raise AssertionError(f"only {len(found)} of 200 sampled answers ended early")


def test_ignore_eos_runs_to_max_tokens_through_the_same_draws(tiny: TorchEngine) -> None:
    for seed, before in early_seeds(tiny):
        plain, _ = run(tiny, job(seed, max_tokens=48))
        ids, events = run(tiny, job(seed, max_tokens=48, ignore_eos=True))
        final = events[-1]
        assert (final.finish_reason, final.completion_tokens, len(ids)) == ("length", 48, 48)
        assert ids[:before] == plain and ids[before] == EOS, "the same draws, and the end token kept as a token"
        assert len("".join(e.text for e in events)) == 48 - ids.count(EOS), "one character a byte, none for the end"


def test_min_tokens_holds_the_end_back_and_no_more(tiny: TorchEngine) -> None:
    for seed, before in early_seeds(tiny):
        least = before + 3
        ids, events = run(tiny, job(seed, max_tokens=48, min_tokens=least))
        assert EOS not in ids[:least]
        assert events[-1].completion_tokens >= least
        assert ids == run(tiny, job(seed, max_tokens=48, min_tokens=least))[0], "seeded: the same answer again"


def test_a_stop_string_counts_only_from_min_tokens_on(tiny: TorchEngine) -> None:
    greedy = {"temperature": 0.0, "max_tokens": 30}
    _, events = run(tiny, job(0, **greedy))
    text = "".join(e.text for e in events)
    stop = text[2:4]
    _, cut = run(tiny, job(0, **greedy, stop=(stop,)))
    assert "".join(e.text for e in cut) == text[: text.index(stop)]
    late = text.index(stop) + 1 + 6  # past the first occurrence
    _, held = run(tiny, job(0, **greedy, stop=(stop,), min_tokens=late))
    kept = "".join(e.text for e in held)
    assert len(kept) >= late and kept.startswith(text[:late])


def test_the_repetition_penalty_changes_a_greedy_answer(tiny: TorchEngine) -> None:
    greedy = {"temperature": 0.0, "max_tokens": 40}
    changed = sum(
        run(tiny, job(i, **greedy))[0] != run(tiny, job(i, **greedy, repetition_penalty=1.8))[0] for i in range(3)
    )
    assert changed == 3, "every prompt's greedy answer repeats a token of its prompt or answer"


# --- audits re-execute the rule --------------------------------------------------------------------------------

needs_proofs = pytest.mark.skipif(not proofs.AVAILABLE, reason="toploc is not built here (make installs it)")
COMBOS = [
    {"top_k": 5},
    {"repetition_penalty": 1.3},
    {"min_tokens": 20},
    {"ignore_eos": True},
    {"top_k": 8, "top_p": 0.9, "repetition_penalty": 0.8, "min_tokens": 10, "ignore_eos": True},
]


@needs_proofs
@pytest.mark.parametrize("extensions", COMBOS, ids=lambda c: "+".join(c))
def test_honest_answers_with_extensions_pass_audit(tiny: TorchEngine, extensions: dict[str, Any]) -> None:
    verifier = Verifier(threads=1)
    for i in range(8):
        request = job(i, max_tokens=32, **extensions, **({"temperature": 0.0} if i % 2 else {}))
        ids, events = run(tiny, request)
        result = verifier.check(request, ids, unsigned_receipt(events[-1], TINY_MODEL))
        assert result.ok, (i, result.problems)


@needs_proofs
def test_an_answer_made_without_the_requests_extensions_fails_audit(tiny: TorchEngine) -> None:
    """A node that ignores min_tokens or ignore_eos (it ends early on end-of-sequence) or the repetition penalty
    is caught by re-execution under the request's rule."""
    verifier = Verifier(threads=1)
    seed, before = early_seeds(tiny, want=1)[0]
    plain = job(seed, max_tokens=48)
    ids, events = run(tiny, plain)
    for asked in ({"min_tokens": before + 3}, {"ignore_eos": True}):
        claimed = job(seed, max_tokens=48, **asked)
        result = verifier.check(claimed, ids, unsigned_receipt(events[-1], TINY_MODEL))
        assert not result.ok, asked
    greedy = job(1, temperature=0.0, max_tokens=40)
    ids, events = run(tiny, greedy)
    penalised = job(1, temperature=0.0, max_tokens=40, repetition_penalty=1.8)
    result = verifier.check(penalised, ids, unsigned_receipt(events[-1], TINY_MODEL))
    assert not result.ok and any("greedy token" in p for p in result.problems), result.problems


def test_the_receipt_check_refuses_an_end_before_min_tokens_or_on_eos_under_ignore_eos() -> None:
    final: dict[str, Any] = {"finish_reason": "stop"}

    def problems(completion: int, **sampling: Any) -> list[tuple[str, str]]:
        request = job(0, max_tokens=40, **sampling)
        receipt = unsigned_receipt(TokenEvent(finish_reason="stop", completion_tokens=completion), TINY_MODEL)
        result = ReceiptCheck(node_id="n", delivered=completion)
        ReceiptChecker._end(receipt, request, final, result)
        return result.problems

    assert problems(5, min_tokens=6) == [("integrity", "ended after 5 tokens, before min_tokens (6)")]
    assert problems(6, min_tokens=6) == [] and problems(3) == []
    assert problems(9, ignore_eos=True) == [
        ("integrity", "ended on end-of-sequence though the request says ignore_eos")
    ]
    assert problems(9, ignore_eos=True, stop=("x",)) == [], "a stop string may end it"


# --- the gateway ------------------------------------------------------------------------------------------------

CHAT: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 20}


@pytest.mark.parametrize("model", [ChatCompletionRequest, CompletionRequest])
def test_the_extensions_reach_the_nodes_request(model: type[Any]) -> None:
    body = {**CHAT, "top_k": 7, "repetition_penalty": 1.1, "min_tokens": 4, "ignore_eos": True, "temperature": 0}
    if model is CompletionRequest:
        body = {k: v for k, v in body.items() if k != "messages"} | {"prompt": "hi"}
    request, _ = to_job(parse(orjson.dumps(body), model), "chat" if model is ChatCompletionRequest else "text", "r")
    sampling = request.sampling
    assert (sampling.top_k, sampling.repetition_penalty, sampling.min_tokens, sampling.ignore_eos) == (7, 1.1, 4, True)
    off, _ = to_job(
        parse(orjson.dumps({**CHAT, "top_k": -1, "repetition_penalty": 1}), ChatCompletionRequest), "chat", "r"
    )
    assert off.sampling.features() == ()


@pytest.mark.parametrize(
    ("field", "value"),
    [("top_k", -2), ("repetition_penalty", 0), ("repetition_penalty", 11), ("min_tokens", -1), ("min_tokens", 21)],
)
def test_a_bad_extension_value_is_a_400_naming_it(field: str, value: Any) -> None:
    with pytest.raises(APIError) as refused:
        to_job(parse(orjson.dumps({**CHAT, field: value}), ChatCompletionRequest), "chat", "r")
    assert (refused.value.status, refused.value.param) == (400, field), refused.value.message


def test_a_feature_no_live_node_honours_is_a_400_naming_it() -> None:
    from gridserve.types import Capability, HardwareInfo, ModelOffer, RuntimeInfo

    def record(features: tuple[str, ...]) -> Any:
        offer = ModelOffer(name="m", features=features)
        capability = Capability(
            node_id="n" + "0" * 40,
            public_key="k",
            endpoint="http://127.0.0.1:1",
            engine="openai-upstream",
            models=(offer,),
            hardware=HardwareInfo(accelerator="cpu", memory_bytes=1),
            runtime=RuntimeInfo(gridserve="0", python="3", engine="x"),
        )
        return type("Record", (), {"capability": capability})()

    request, _ = to_job(
        parse(orjson.dumps({**CHAT, "ignore_eos": True, "min_tokens": 2}), ChatCompletionRequest), "chat", "r"
    )
    _require_features(request, [record(("ignore_eos", "min_tokens"))], None)
    with pytest.raises(APIError) as refused:
        _require_features(request, [record(("ignore_eos", "top_k"))], None)
    error = refused.value
    assert (error.status, error.param, error.code) == (400, "min_tokens", "unsupported_parameter")
    assert "no live node serving it honours" in error.message


def test_own_engines_offer_every_extension_and_an_upstream_what_its_server_honours(tiny: TorchEngine) -> None:
    (offer,) = tiny.offers()
    assert offer.features == (*SAMPLING_FEATURES, "logprobs")

    def upstream(owned_by: str) -> UpstreamEngine:
        engine = UpstreamEngine(url="http://127.0.0.1:1", served_name="m", upstream_model="m", max_context=64)

        async def listing() -> list[dict[str, Any]]:  # the server's /v1/models, faked at the I/O edge
            return [{"id": "other", "owned_by": "vllm"}, {"id": "m", "owned_by": owned_by}]

        async def started() -> None:
            engine._models = listing  # type: ignore[method-assign]
            await engine.start()
            await engine.aclose()

        asyncio.run(started())
        return engine

    everything_but_tools = tuple(f for f in SAMPLING_FEATURES if f != "tools")  # calls are rendered by the gateway
    assert upstream("vllm").offers()[0].features == (*everything_but_tools, "logprobs")
    assert upstream("llamacpp").offers()[0].features == ("top_k", "ignore_eos")
    assert upstream("me").offers()[0].features == (), "llama-cpp-python's server: none it is known to honour"
    path, body = upstream("vllm")._body(job(0, max_tokens=8, top_k=3, ignore_eos=True, logprobs=2))
    assert path == "/v1/completions" and (body["top_k"], body["ignore_eos"], body["logprobs"]) == (3, True, 2)
    assert "min_tokens" not in body and "repetition_penalty" not in body, "only what the request turns on"


@settings(max_examples=30, deadline=None)
@given(k=st.integers(0, 5), penalty=st.sampled_from([1.0, 1.2]), least=st.integers(0, 3), ignore=st.booleans())
def test_features_name_exactly_what_is_on(k: int, penalty: float, least: int, ignore: bool) -> None:
    on = params(top_k=k, repetition_penalty=penalty, min_tokens=least, ignore_eos=ignore).features()
    assert set(on) == {
        n
        for n, used in [
            ("top_k", k),
            ("repetition_penalty", penalty != 1.0),
            ("min_tokens", least),
            ("ignore_eos", ignore),
        ]
        if used
    }


def test_the_gateways_pipeline_sampler_honours_the_extensions_too() -> None:
    """A chain of stage nodes is sampled by the gateway (pipeline/session.py generate_tokens), under the same rule:
    with the end token always the likeliest, min_tokens holds it back and ignore_eos runs on through it."""
    import numpy as np

    from gridserve.gateway.pipeline.session import generate_tokens

    class Chain:
        async def forward(self, ids: list[int]) -> Any:
            row = np.zeros(8, dtype=np.float32)
            row[EOS], row[5] = 3.0, 2.0
            return row

    def tokens(prompt: tuple[int, ...] = (4,), **sampling: Any) -> list[int]:
        async def go() -> list[int]:
            stream = generate_tokens(
                Chain(), list(prompt), params(temperature=0.0, max_tokens=6, **sampling), eos_ids={EOS}
            )  # type: ignore[arg-type]
            return [token async for token, _ in stream]

        return asyncio.run(go())

    assert tokens() == [EOS]
    assert tokens(min_tokens=3) == [5, 5, 5, EOS]
    assert tokens(ignore_eos=True) == [EOS] * 6
    # the end token, in the prompt, is halved to 1.5 under 5's 2.0; once 5 is picked it is halved to 1.0 in turn
    assert tokens((4, EOS), repetition_penalty=2.0) == [5, EOS]
