"""Unit tests for the tiny (real torch) engine and the emulated engine.

The async engine API is driven with `asyncio.run` from synchronous tests. Engines are module-scoped: the
first tiny engine pays for importing transformers.
"""

from __future__ import annotations

import asyncio
import string
import time
from typing import Any

import pytest
from tests.english import CHAT, LLAMA3, LLAMA3_CHAT, TEXTS

from gridserve.catalog import HARDWARE, MODELS, hardware_spec, model_spec
from gridserve.engines import emulated
from gridserve.engines.base import EngineError, InvalidRequest
from gridserve.engines.emulated import PREFIX_BLOCK_TOKENS, WORDS, EmulatedEngine, FixedTimings, prompt_ids, spell
from gridserve.engines.placement import KV_RESERVE, EmulationError, placement_for
from gridserve.engines.tiny import TINY_CONTEXT, TINY_MODEL, tiny_engine
from gridserve.engines.tokencount import count_tokens
from gridserve.engines.torch_engine import TorchEngine
from gridserve.perfmodel import Load, predict
from gridserve.types import ChatMessage, GenerateRequest, SamplingParams, TokenEvent
from gridserve.types.wire import ResponseFormat

PROMPTS = ("The quick brown fox", "Hello, grid!", "1+1=")
PRINTABLE = set(string.printable) - set("\t\r\x0b\x0c") | {"\n"}


def make_request(
    prompt: str | None = "Hello",
    model: str = TINY_MODEL,
    messages: tuple[ChatMessage, ...] | None = None,
    **sampling: Any,
) -> GenerateRequest:
    return GenerateRequest(
        request_id="req-test",
        model=model,
        prompt=prompt if messages is None else None,
        messages=messages,
        sampling=SamplingParams.model_validate(sampling),
    )


async def _collect(engine: Any, request: GenerateRequest) -> list[TokenEvent]:
    return [event async for event in engine.generate(request)]


def collect(engine: Any, request: GenerateRequest) -> list[TokenEvent]:
    """The events without the node's timings (which vary run to run) and its prefix-cache count (which depends on
    the requests before: a repeated prompt reuses its blocks, and must give the same events otherwise)."""
    timings = {"queue_s": 0.0, "prefill_s": 0.0, "decode_s": 0.0, "cached_tokens": 0}
    return [e.model_copy(update=timings) for e in asyncio.run(_collect(engine, request))]


def text_of(events: list[TokenEvent]) -> str:
    return "".join(e.text for e in events)


def check_stream_shape(events: list[TokenEvent], max_tokens: int) -> None:
    """Only the last event is final; it carries the counts."""
    assert events, "a stream always ends with a final event"
    assert all(e.finish_reason is None for e in events[:-1])
    last = events[-1]
    assert last.finish_reason in ("stop", "length")
    assert 1 <= last.completion_tokens <= max_tokens


# --- tiny engine ------------------------------------------------------------------------------------------


def test_tiny_offers_its_model(tiny: TorchEngine) -> None:
    (offer,) = tiny.offers()
    assert offer.name == TINY_MODEL
    assert offer.max_context == TINY_CONTEXT
    assert tiny.advertised_hardware() is None


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_is_deterministic_across_runs_and_instances(tiny: TorchEngine, prompt: str) -> None:
    req = make_request(prompt, temperature=0.0, max_tokens=24)
    first = collect(tiny, req)
    second = collect(tiny, req)
    assert first == second
    fresh = tiny_engine(threads=1)
    fresh.load_sync()
    try:
        assert collect(fresh, req) == first
    finally:
        asyncio.run(fresh.aclose())
    check_stream_shape(first, 24)


def test_greedy_shorter_run_is_a_prefix_of_longer_run(tiny: TorchEngine) -> None:
    long = collect(tiny, make_request("The quick brown fox", temperature=0.0, max_tokens=30))
    for n in (1, 7, 15):
        short = collect(tiny, make_request("The quick brown fox", temperature=0.0, max_tokens=n))
        assert text_of(long).startswith(text_of(short))
        assert short[-1].completion_tokens <= n


def test_seeded_sampling_is_reproducible_and_seed_dependent(tiny: TorchEngine) -> None:
    def sample(seed: int) -> str:
        return text_of(collect(tiny, make_request("Hello", temperature=1.0, seed=seed, max_tokens=24)))

    assert sample(1) == sample(1)
    assert sample(2) == sample(2)
    outputs = {sample(seed) for seed in range(6)}
    # Six seeds over a near-uniform ~96-symbol distribution: identical outputs would mean the seed is ignored.
    assert len(outputs) >= 5


def test_unseeded_sampling_varies(tiny: TorchEngine) -> None:
    outputs = {text_of(collect(tiny, make_request("Hello", temperature=1.0, max_tokens=24))) for _ in range(4)}
    assert len(outputs) >= 3


@pytest.mark.parametrize("prompt", PROMPTS)
@pytest.mark.parametrize("max_tokens", [1, 5, 32])
def test_max_tokens_and_completion_count(tiny: TorchEngine, prompt: str, max_tokens: int) -> None:
    events = collect(tiny, make_request(prompt, temperature=0.0, max_tokens=max_tokens))
    check_stream_shape(events, max_tokens)
    last = events[-1]
    text = text_of(events)
    assert last.prompt_tokens == len(prompt.encode()) + 1  # bos + one token per byte
    # Byte-level ASCII output: each non-eos token is exactly one character.
    if last.finish_reason == "length":
        assert last.completion_tokens == max_tokens
        assert len(text) == max_tokens
    else:  # ended by eos, which is counted but not shown
        assert len(text) == last.completion_tokens - 1


def test_eos_ends_with_stop_and_no_text_after(tiny: TorchEngine) -> None:
    """Find a greedy run that ends by eos before max_tokens and check it stays ended with more budget."""
    for prompt in PROMPTS:
        short = collect(tiny, make_request(prompt, temperature=0.0, max_tokens=64))
        if short[-1].finish_reason == "stop":
            longer = collect(tiny, make_request(prompt, temperature=0.0, max_tokens=128))
            assert text_of(longer) == text_of(short)
            assert longer[-1].completion_tokens == short[-1].completion_tokens < 64
            return
    pytest.skip("no prompt ends by eos under greedy decoding with this model seed")


@pytest.mark.parametrize("start", [3, 11, 20])
@pytest.mark.parametrize("width", [1, 3])
def test_stop_string_cuts_output(tiny: TorchEngine, start: int, width: int) -> None:
    prompt = "The quick brown fox"
    full = text_of(collect(tiny, make_request(prompt, temperature=0.0, max_tokens=40)))
    assert len(full) >= start + width, "the greedy continuation is long enough to cut"
    stop = full[start : start + width]
    events = collect(tiny, make_request(prompt, temperature=0.0, max_tokens=40, stop=(stop,)))
    out = text_of(events)
    assert out == full[: full.find(stop)]
    assert stop not in out
    assert events[-1].finish_reason == "stop"
    # Generation stopped as soon as the stop string was complete.
    assert events[-1].completion_tokens == full.find(stop) + width


def test_stop_string_never_produced_changes_nothing(tiny: TorchEngine) -> None:
    plain = collect(tiny, make_request("Hello", temperature=0.0, max_tokens=20))
    absent = "\t~never~\t"  # tabs are masked out of the tiny vocabulary
    with_stop = collect(tiny, make_request("Hello", temperature=0.0, max_tokens=20, stop=(absent,)))
    assert text_of(with_stop) == text_of(plain)
    assert with_stop[-1].finish_reason == plain[-1].finish_reason


def test_seeded_sampling_with_stop_is_a_cut_of_the_unstopped_run(tiny: TorchEngine) -> None:
    full = text_of(collect(tiny, make_request("abc", temperature=1.0, seed=99, max_tokens=40)))
    if len(full) < 10:
        pytest.skip("sampled run ended too early to cut")
    stop = full[6:8]
    out = text_of(collect(tiny, make_request("abc", temperature=1.0, seed=99, max_tokens=40, stop=(stop,))))
    assert out == full[: full.find(stop)]


def test_context_limit(tiny: TorchEngine) -> None:
    # bos + prompt bytes + max_tokens must fit in the context.
    fits = make_request("x" * (TINY_CONTEXT - 2), temperature=0.0, max_tokens=1)
    events = collect(tiny, fits)
    assert events[-1].prompt_tokens == TINY_CONTEXT - 1
    with pytest.raises(InvalidRequest):
        collect(tiny, make_request("x" * (TINY_CONTEXT - 1), temperature=0.0, max_tokens=1))
    with pytest.raises(InvalidRequest):
        collect(tiny, make_request("hi", temperature=0.0, max_tokens=TINY_CONTEXT))
    # Multi-byte characters count per byte.
    with pytest.raises(InvalidRequest):
        collect(tiny, make_request("é" * (TINY_CONTEXT // 2), temperature=0.0, max_tokens=1))


@pytest.mark.parametrize("seed", range(4))
def test_output_is_printable_ascii(tiny: TorchEngine, seed: int) -> None:
    events = collect(tiny, make_request("héllo wörld ✓", temperature=2.0, seed=seed, max_tokens=64))
    text = text_of(events)
    assert set(text) <= PRINTABLE
    for event in events:
        assert all(3 + 32 <= t < 3 + 127 or t == 3 + ord("\n") for t in event.token_ids)


def test_chat_messages_are_accepted(tiny: TorchEngine) -> None:
    msgs = (ChatMessage(role="user", content="hi"),)
    a = collect(tiny, make_request(None, messages=msgs, temperature=0.0, max_tokens=8))
    b = collect(tiny, make_request(None, messages=msgs, temperature=0.0, max_tokens=8))
    assert a == b
    assert a[-1].prompt_tokens > len("hi") + 1  # the chat template wraps the content


def test_engine_not_started_raises() -> None:
    engine = tiny_engine(threads=1)
    with pytest.raises(EngineError):
        collect(engine, make_request("hi", temperature=0.0, max_tokens=1))


# --- placement --------------------------------------------------------------------------------------------


def test_placement_llama_8b_on_h100_is_float16() -> None:
    assert placement_for(model_spec("llama-3-8b"), hardware_spec("h100-sxm")) == ("float16", "none")


def test_placement_llama_70b_on_rtx4090_is_quantized_or_refused() -> None:
    model, hw = model_spec("llama-3-70b"), hardware_spec("rtx4090")
    budget = hw.memory_gib * 2**30
    try:
        dtype, quant = placement_for(model, hw)
    except EmulationError as exc:
        assert model.name in str(exc)
        # Refused only when even the smallest placement would not fit the whole device.
        assert model.weight_bytes("float16", "q4_k_m") > budget * (1 - KV_RESERVE)
    else:
        assert quant != "none"
        assert model.weight_bytes(dtype, quant) <= budget


@pytest.mark.parametrize("model_name", sorted(MODELS))
@pytest.mark.parametrize("hw_key", sorted(HARDWARE))
def test_placement_is_the_widest_that_fits(model_name: str, hw_key: str) -> None:
    model, hw = model_spec(model_name), hardware_spec(hw_key)
    budget = hw.memory_gib * 2**30 * (1 - KV_RESERVE)
    widths = ["none", "q8_0", "q4_k_m"]  # widest first
    try:
        dtype, quant = placement_for(model, hw)
    except EmulationError:
        assert all(model.weight_bytes("float16", q) > budget for q in widths)
        return
    assert model.weight_bytes(dtype, quant) <= budget
    wider = widths[: widths.index(quant)]
    assert all(model.weight_bytes("float16", q) > budget for q in wider)


# --- emulated engine --------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_name", ["gemma-3-270m", "gridserve-tiny"])
def test_emulated_refuses_real_engine_models(tiny: TorchEngine, model_name: str) -> None:
    assert model_spec(model_name).real_engine
    with pytest.raises(EmulationError):
        EmulatedEngine(hardware="h100-sxm", models=[model_name], text_engine=tiny)
    with pytest.raises(EmulationError):
        EmulatedEngine(hardware="h100-sxm", models=["llama-3-8b", model_name], text_engine=tiny)


def test_emulated_needs_a_model_and_known_names(tiny: TorchEngine) -> None:
    with pytest.raises(EmulationError):
        EmulatedEngine(hardware="h100-sxm", models=[], text_engine=tiny)
    with pytest.raises(KeyError):
        EmulatedEngine(hardware="h100-sxm", models=["no-such-model"], text_engine=tiny)
    with pytest.raises(KeyError):
        EmulatedEngine(hardware="no-such-gpu", models=["llama-3-8b"], text_engine=tiny)


def test_emulated_advertises_a_model_that_cannot_fit_for_the_scheduler_to_reject(tiny: TorchEngine) -> None:
    """An operator may claim a model the card cannot hold; the node advertises it at the smallest quantization
    and the scheduler's memory filter (not the node) must refuse it."""
    from gridserve.scheduler.context import Context
    from gridserve.scheduler.filters import MemoryFitFilter
    from gridserve.scheduler.snapshot import NodeSnapshot
    from gridserve.types import Capability, NodeId, NodeState, RuntimeInfo
    from gridserve.types.scheduling import ScheduleRequest

    model, hw = model_spec("llama-3-70b"), hardware_spec("t4")
    assert model.weight_bytes("float16", "q4_k_m") > hw.memory_gib * 2**30  # does not fit at all
    with pytest.raises(EmulationError):
        placement_for(model, hw)
    engine = EmulatedEngine(hardware="t4", models=["llama-3-70b"], text_engine=tiny)
    (offer,) = engine.offers()
    assert offer.quantization == "q4_k_m"
    cap = Capability(
        node_id=NodeId("n"),
        public_key="k",
        endpoint="http://x",
        engine=engine.kind,
        models=(offer,),
        hardware=engine.advertised_hardware(),
        runtime=RuntimeInfo(gridserve="0", python="3", engine="e"),
    )
    node = NodeSnapshot(node_id=NodeId("n"), state=NodeState.UP, capability=cap, last_heartbeat=0.0)
    ctx = Context.build(ScheduleRequest(request_id="r", model="llama-3-70b", prompt_tokens=10, max_tokens=10), 0.0)
    reason = MemoryFitFilter().reject(ctx, node)
    assert reason is not None and "has 16.0 GiB" in reason


def test_emulated_advertises_emulated_hardware_and_offers(tiny: TorchEngine) -> None:
    engine = EmulatedEngine(hardware="t4", models=["llama-3-8b", "mistral-7b"], text_engine=tiny)
    hw = engine.advertised_hardware()
    assert hw.emulated is True
    assert hw.accelerator == "t4"
    assert hw.memory_bytes == int(hardware_spec("t4").memory_gib * 2**30)
    assert engine.kind == "emulated:t4"
    offers = {o.name: o for o in engine.offers()}
    assert set(offers) == {"llama-3-8b", "mistral-7b"}
    for name, offer in offers.items():
        spec = model_spec(name)
        assert offer.max_context == spec.max_context
        assert (offer.dtype, offer.quantization) == placement_for(spec, hardware_spec("t4"))


def test_emulated_rejects_bad_requests(tiny: TorchEngine) -> None:
    engine = EmulatedEngine(
        hardware="h100-sxm", models=["llama-3-8b"], text_engine=tiny, fixed=FixedTimings(ttft_s=0, itl_s=0)
    )
    with pytest.raises(InvalidRequest):
        collect(engine, make_request("hi", model="qwen2.5-7b", temperature=0.0, max_tokens=4))
    with pytest.raises(InvalidRequest):
        collect(engine, make_request("hi", model="llama-3-8b", temperature=0.0, max_tokens=8193))
    assert engine.stats.active == 0


def _instant(tiny: TorchEngine, **options: Any) -> EmulatedEngine:
    return EmulatedEngine(
        hardware="h100-sxm", models=["llama-3-8b"], text_engine=tiny, fixed=FixedTimings(ttft_s=0, itl_s=0), **options
    )


def test_emulated_text_comes_from_the_tiny_model_spelled_in_words(tiny: TorchEngine) -> None:
    """The tiny model's tokens, one event each, spelled as the emulated vocabulary's words: the answer is as many
    tokens as `usage` says to a client's tokenizer too (about 4 characters each, not 1)."""
    engine = _instant(tiny)
    request = make_request("Hello", model="llama-3-8b", temperature=0.0, max_tokens=16)
    emulated = collect(engine, request)
    direct = collect(tiny, make_request("Hello", temperature=0.0, max_tokens=16))
    assert [e.token_ids for e in emulated] == [e.token_ids for e in direct]
    assert [e.text for e in emulated[:-1]] == [spell(e.token_ids[0]) for e in direct[:-1]]
    assert emulated[-1].completion_tokens == direct[-1].completion_tokens == len(emulated) - 1
    assert count_tokens(text_of(emulated)) == emulated[-1].completion_tokens
    assert emulated[-1].prompt_tokens == 1 + count_tokens("Hello")  # not the tiny model's bytes
    # A repeat (served from the deterministic cache) is the same.
    assert collect(engine, request) == emulated


def test_emulated_counts_the_prompt_as_its_model_would(tiny: TorchEngine) -> None:
    """An English prompt counts within 10% of Llama 3's count (plus its template), plain or chat, short or long;
    the prefill is timed on that count."""
    engine = _instant(tiny)
    for name, text in TEXTS.items():
        plain = collect(engine, make_request(text, model="llama-3-8b", temperature=0.0, max_tokens=2))[-1]
        assert abs(plain.prompt_tokens - (1 + LLAMA3[name])) <= max(2, 0.1 * LLAMA3[name]), name
    messages = tuple(ChatMessage(role=role, content=text) for role, text in CHAT)
    chat = collect(engine, make_request(None, model="llama-3-8b", messages=messages, temperature=0.0, max_tokens=2))
    assert abs(chat[-1].prompt_tokens / LLAMA3_CHAT - 1) <= 0.10
    assert chat[-1].prompt_tokens == len(prompt_ids(make_request(None, model="llama-3-8b", messages=messages)))


def test_emulated_stops_on_its_own_words_and_holds_back_a_partial_match(tiny: TorchEngine) -> None:
    engine = _instant(tiny)
    whole = collect(engine, make_request("Stops", model="llama-3-8b", temperature=0.9, seed=5, max_tokens=24))
    words = [e.text for e in whole[:-1]]
    stop = words[5] + words[6][:3]  # ends inside the 7th token
    cut = collect(
        engine, make_request("Stops", model="llama-3-8b", temperature=0.9, seed=5, max_tokens=24, stop=(stop,))
    )
    assert text_of(cut) == "".join(words[:5])
    assert cut[-1].finish_reason == "stop" and cut[-1].stop_sequence == stop
    assert cut[-1].completion_tokens == 7 and len(cut) == 8
    # from min_tokens on: a stop string that ends in the 7th token is not looked for in the 6th's text
    held = {"temperature": 0.9, "seed": 5, "max_tokens": 24, "min_tokens": 7}
    unheld = [e.text for e in collect(engine, make_request("Stops", model="llama-3-8b", **held))[:-1]]
    late_stop = unheld[5] + unheld[6][:3]
    late = collect(engine, make_request("Stops", model="llama-3-8b", stop=(late_stop,), **held))
    assert text_of(late).startswith("".join(unheld[:7]))


def test_emulated_logprobs_name_the_words(tiny: TorchEngine) -> None:
    engine = _instant(tiny)
    events = collect(engine, make_request("Scores", model="llama-3-8b", temperature=0.0, max_tokens=6, logprobs=3))
    direct = collect(tiny, make_request("Scores", temperature=0.0, max_tokens=6, logprobs=3))
    for event, raw in zip(events[:-1], direct[:-1], strict=True):
        (entry,), (byte,) = event.logprobs, raw.logprobs
        assert entry.token == event.text and bytes(entry.bytes) == event.text.encode()
        assert entry.logprob == byte.logprob
        assert [t.logprob for t in entry.top_logprobs] == [t.logprob for t in byte.top_logprobs]
        assert all(t.token in {f" {w}" for w in WORDS} | {""} for t in entry.top_logprobs)


def test_emulated_resumes_after_the_tokens_another_node_sent(tiny: TorchEngine) -> None:
    engine = _instant(tiny)
    request = make_request("Resume me", model="llama-3-8b", temperature=0.9, seed=2, max_tokens=20, ignore_eos=True)
    whole = collect(engine, request)
    sent = tuple(i for e in whole[:8] for i in e.token_ids)
    rest = collect(engine, request.model_copy(update={"resume": sent}))
    assert text_of(whole[:8]) + text_of(rest) == text_of(whole)
    assert rest[-1].completion_tokens == 20 and len(rest) == 20 - 8 + 1


def test_emulated_answers_longer_than_the_tiny_model_writes_at_once(
    tiny: TorchEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The tiny model writes at most TEXT_MAX_TOKENS at once (16 here); the answer goes on in rounds to max_tokens,
    also after a failover that resumed more than a round's tokens, and stop strings are matched across rounds."""
    monkeypatch.setattr(emulated, "TEXT_MAX_TOKENS", 16)
    engine = _instant(tiny)
    request = make_request("Long", model="llama-3-8b", temperature=0.9, seed=4, max_tokens=40, ignore_eos=True)
    whole = collect(engine, request)
    assert whole[-1].finish_reason == "length" and whole[-1].completion_tokens == 40 and len(whole) == 41
    assert count_tokens(text_of(whole)) == 40
    sent = tuple(i for e in whole[:20] for i in e.token_ids)
    rest = collect(engine, request.model_copy(update={"resume": sent}))
    assert rest[-1].completion_tokens == 40 and len(rest) == 40 - 20 + 1
    words = [e.text for e in whole[:-1]]
    stop = words[17] + words[18]  # across the first round's end
    cut = collect(
        engine, request.model_copy(update={"sampling": request.sampling.model_copy(update={"stop": (stop,)})})
    )
    assert stop not in "".join(words[:18])  # (the seed's answer: the stop string's first occurrence)
    assert text_of(cut) == "".join(words[:17]) and cut[-1].completion_tokens == 19


def test_emulated_structured_output_keeps_the_tiny_models_characters(tiny: TorchEngine) -> None:
    fmt = ResponseFormat(type="json_object")
    events = collect(_instant(tiny), make_request("{", model="llama-3-8b", temperature=0.0, max_tokens=30))
    shaped = collect(
        _instant(tiny),
        make_request("{", model="llama-3-8b", temperature=0.0, max_tokens=30, response_format=fmt),
    )
    direct = collect(tiny, make_request("{", temperature=0.0, max_tokens=30, response_format=fmt))
    assert [(e.text, e.token_ids) for e in shaped[:-1]] == [(e.text, e.token_ids) for e in direct[:-1]]
    assert text_of(shaped) != text_of(events)


def test_emulated_prefix_cache_reuses_whole_blocks_of_counted_tokens(tiny: TorchEngine) -> None:
    engine = _instant(tiny)
    document = TEXTS["long"]
    first = asyncio.run(_collect(engine, make_request(document + " First?", model="llama-3-8b", max_tokens=2)))
    second = asyncio.run(_collect(engine, make_request(document + " Second?", model="llama-3-8b", max_tokens=2)))
    assert first[-1].cached_tokens == 0
    held = second[-1].cached_tokens
    assert held % PREFIX_BLOCK_TOKENS == 0
    assert 1 + count_tokens(document) - PREFIX_BLOCK_TOKENS < held <= 1 + count_tokens(document)
    assert engine.prefix_block_tokens() == PREFIX_BLOCK_TOKENS


def test_emulated_fixed_timings_are_lower_bounds(tiny: TorchEngine) -> None:
    ttft, itl = 0.05, 0.01
    engine = EmulatedEngine(
        hardware="h100-sxm", models=["llama-3-8b"], text_engine=tiny, fixed=FixedTimings(ttft_s=ttft, itl_s=itl)
    )
    req = make_request("The quick brown fox", model="llama-3-8b", temperature=0.0, max_tokens=12)

    async def timed() -> tuple[list[float], float]:
        stamps: list[float] = []
        start = time.monotonic()
        async for _ in engine.generate(req):
            stamps.append(time.monotonic() - start)
        return stamps, time.monotonic() - start

    for _ in range(2):  # the second run is served from the cache: timings still apply
        stamps, total = asyncio.run(timed())
        n = len(stamps)
        assert n >= 2
        slack = 1e-6  # asyncio may fire a timer up to its clock resolution early
        assert stamps[0] >= ttft - slack
        for i, stamp in enumerate(stamps):
            assert stamp >= ttft + i * itl - slack
        assert total >= ttft + (n - 1) * itl - slack
        assert stamps == sorted(stamps)


def test_emulated_perfmodel_timings_are_lower_bounds(tiny: TorchEngine) -> None:
    engine = EmulatedEngine(hardware="h100-sxm", models=["llama-3-8b"], text_engine=tiny)
    req = make_request("Hello", model="llama-3-8b", temperature=0.0, max_tokens=8)

    async def timed() -> tuple[list[TokenEvent], float]:
        start = time.monotonic()
        events = [e async for e in engine.generate(req)]
        return events, time.monotonic() - start

    events, total = asyncio.run(timed())
    (offer,) = engine.offers()
    pred = predict(
        model_spec("llama-3-8b"),
        hardware_spec("h100-sxm"),
        prompt_tokens=events[-1].prompt_tokens,
        dtype=offer.dtype,
        quantization=offer.quantization,
    )
    assert total >= pred.ttft_s + (len(events) - 1) * pred.itl_s - 1e-6


def test_slower_hardware_predicts_larger_itl(tiny: TorchEngine) -> None:
    def predicted(hw_key: str) -> tuple[float, float]:
        engine = EmulatedEngine(hardware=hw_key, models=["llama-3-8b"], text_engine=tiny)
        (offer,) = engine.offers()
        pred = predict(
            model_spec("llama-3-8b"),
            hardware_spec(hw_key),
            prompt_tokens=512,
            dtype=offer.dtype,
            quantization=offer.quantization,
        )
        return pred.ttft_s, pred.itl_s

    t4_ttft, t4_itl = predicted("t4")
    h100_ttft, h100_itl = predicted("h100-sxm")
    assert t4_itl > h100_itl
    assert t4_ttft > h100_ttft
    assert h100_itl > 0


def test_prediction_grows_with_load_and_prompt() -> None:
    model, hw = model_spec("llama-3-8b"), hardware_spec("a100-80g")
    base = predict(model, hw, prompt_tokens=128)
    assert predict(model, hw, prompt_tokens=128, load=Load(active=7)).itl_s > base.itl_s
    assert predict(model, hw, prompt_tokens=4096).ttft_s > base.ttft_s
    assert predict(model, hw, prompt_tokens=128, quantization="q4_k_m").itl_s < base.itl_s
    assert base.decode_tokens_per_s == pytest.approx(1 / base.itl_s)


def _strip(events: list[TokenEvent]) -> list[TokenEvent]:
    return [e.model_copy(update={"queue_s": 0.0, "prefill_s": 0.0, "decode_s": 0.0}) for e in events]


def test_concurrent_requests_interleave_and_keep_their_outputs(tiny: TorchEngine) -> None:
    requests = [make_request(p, temperature=0.0, max_tokens=24) for p in PROMPTS]
    requests.append(make_request("seeded", temperature=0.9, seed=3, max_tokens=24))
    solo = [collect(tiny, r) for r in requests]

    async def together() -> list[list[TokenEvent]]:
        return list(await asyncio.gather(*(_collect(tiny, r) for r in requests)))

    assert [_strip(events) for events in asyncio.run(together())] == solo


def _long_prompt(tiny: TorchEngine, tokens: int) -> str:
    for i in range(50):
        prompt = f"a long answer {i}"
        if collect(tiny, make_request(prompt, temperature=0.0, max_tokens=tokens))[-1].finish_reason == "length":
            return prompt
    raise AssertionError("no prompt runs to the limit")


def test_a_new_request_is_not_queued_behind_a_running_one(tiny: TorchEngine) -> None:
    """Token-by-token interleaving: a short request submitted while a long one runs finishes first."""
    prompt = _long_prompt(tiny, 300)

    async def run() -> tuple[float, float]:
        async def long() -> float:
            async for _ in tiny.generate(make_request(prompt, temperature=0.0, max_tokens=300)):
                pass
            return time.monotonic()

        async def short() -> float:
            await asyncio.sleep(0.05)
            async for _ in tiny.generate(make_request("short", temperature=0.0, max_tokens=3)):
                pass
            return time.monotonic()

        ends = await asyncio.gather(long(), short())
        return ends[0], ends[1]

    long_end, short_end = asyncio.run(run())
    assert short_end < long_end


def test_emulated_fifo_slots_run_at_most_the_batch_and_queue_the_rest_in_order(tiny: TorchEngine) -> None:
    slots = hardware_spec("t4").batch_slots
    engine = EmulatedEngine(
        hardware="t4",
        models=["llama-3-8b"],
        text_engine=tiny,
        fixed=FixedTimings(ttft_s=0.2, itl_s=0.0),
        fifo_slots=True,
    )
    requests = [
        make_request(f"prompt {i}", model="llama-3-8b", temperature=0.0, max_tokens=2) for i in range(slots + 3)
    ]
    peak = {"active": 0, "queued": 0}

    async def one(req: GenerateRequest, delay: float) -> float:
        await asyncio.sleep(delay)
        async for event in engine.generate(req):
            peak["active"] = max(peak["active"], engine.stats.active)
            peak["queued"] = max(peak["queued"], engine.stats.queued)
            if event.finish_reason is not None:
                return event.queue_s
        raise AssertionError("no final event")

    async def all_of_them() -> list[float]:
        return await asyncio.gather(*(one(r, 0.005 * i) for i, r in enumerate(requests)))

    waits = asyncio.run(all_of_them())
    assert engine.max_running() == slots, "it says it runs its batch slots at once (the gateway queues beyond)"
    assert peak["active"] == slots and peak["queued"] >= 1
    assert all(w < 0.1 for w in waits[:slots])  # the first `slots` start at once
    assert all(w > 0.1 for w in waits[slots:])  # the rest wait for a slot (each holds it ~0.2 s)
    assert engine.stats.active == 0 and engine.stats.queued == 0


def test_an_emulated_card_without_fifo_slots_says_it_runs_every_request_at_once(tiny: TorchEngine) -> None:
    engine = EmulatedEngine(hardware="t4", models=["llama-3-8b"], text_engine=tiny)
    assert engine.max_running() == 0
