"""The transformers engine's prefix cache (engines/prefix_cache.py) on the tiny model, in process: a cache hit gives
the logits of a cold run bit for bit (prefixes shorter than, equal to and past the 64-token sliding window, whole
prompts repeated, failover resumes), least recently used blocks go first within the budget, and the cached count
travels from the engine's last event through the signed receipt to the OpenAI usage object."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from types import SimpleNamespace
from typing import Any

import orjson
import pytest
import torch
from tests.prefix_support import stepped
from tests.unit.answer_support import Scripted, context
from tests.unit.dispatch_support import CONFIG, store_writer

from gridserve.engines.base import DEFAULT_PREFIX_CACHE_MB
from gridserve.engines.prefix_cache import PrefixCache, block_keys, cacheable, kv_bytes_per_token
from gridserve.engines.tiny import TINY_MODEL, TINY_PREFIX_BLOCK, build_tiny_model, tiny_engine
from gridserve.engines.torch_engine import TorchEngine
from gridserve.gateway.api import answers
from gridserve.gateway.api.sse import ChunkFormatter, usage
from gridserve.gateway.api.surface import Answer
from gridserve.gateway.integrity.receipts import ReceiptChecker
from gridserve.node.dishonest import Dishonesty
from gridserve.node.receipts import Receipter
from gridserve.trust import Identity
from gridserve.types import (
    Capability,
    GenerateRequest,
    HardwareInfo,
    ModelOffer,
    NodeId,
    Receipt,
    RuntimeInfo,
    SamplingParams,
    StreamEvent,
    TokenEvent,
)
from gridserve.types.base import wire_payload

THREADS = 1
BLOCK = TINY_PREFIX_BLOCK
"""Tokens per block (and prefill chunk) on the tiny model."""
WINDOW = 64
"""The tiny model's sliding window (engines/tiny.py)."""


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(before)


def engine(prefix_cache_mb: int = DEFAULT_PREFIX_CACHE_MB) -> TorchEngine:
    built = tiny_engine(threads=THREADS, prefix_cache_mb=prefix_cache_mb)
    built.load_sync()
    return built


def ids(n: int, seed: int) -> list[int]:
    """`n` prompt token ids (bos, then printable bytes), fixed by `seed`."""
    gen = torch.Generator().manual_seed(seed)
    return [1, *(torch.randint(3 + 32, 3 + 127, (n - 1,), generator=gen).tolist())]


def job(max_tokens: int = 12, resume: tuple[int, ...] = ()) -> GenerateRequest:
    sampling = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    return GenerateRequest(request_id="r", model=TINY_MODEL, prompt="", sampling=sampling, resume=resume)


def run(eng: TorchEngine, prompt: list[int], request: GenerateRequest | None = None) -> tuple[list[torch.Tensor], int]:
    """Greedy decoding of `prompt` as the engine's worker runs it: the logits behind every token, and the prompt
    tokens that came from the cache."""
    gen, logits = stepped(eng, prompt, request or job())
    return logits, gen.cached


def bitwise(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) > 0 and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.fixture(scope="module")
def cold() -> Iterator[TorchEngine]:
    """No prefix cache: every prompt prefilled from its first token."""
    eng = engine(prefix_cache_mb=0)
    yield eng
    asyncio.run(eng.aclose())


# --- a hit is bitwise a cold run -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("before", "shared", "length"),
    [
        (90, 20, 90),  # less than a block shared: nothing reused
        (90, 32, 90),  # exactly one block
        (90, 50, 90),  # one block and part of the next
        (170, WINDOW + 40, 170),  # past the sliding window: its layers keep only the last 63 positions
        (300, 250, 260),  # far past it
        (161, 160, 161),  # all but the last token shared, on a block boundary
        (161, 161, 200),  # the whole earlier prompt, and more
    ],
)
def test_a_cache_hit_gives_the_cold_logits_bit_for_bit(
    cold: TorchEngine, before: int, shared: int, length: int
) -> None:
    warm = engine()
    first = ids(before, seed=1)
    tail = ids(length - shared + 1, seed=2)[1:]
    if shared < before and tail[0] == first[shared]:
        tail[0] = 3 + ord("~") if tail[0] != 3 + ord("~") else 3 + ord("!")
    second = [*first[:shared], *tail]
    assert len(second) == length and second[:shared] == first[:shared]
    assert shared == before or second[shared] != first[shared]
    run(warm, first)
    warm_logits, cached = run(warm, second)
    cold_logits, none = run(cold, second)
    assert none == 0
    assert cached == min(shared // BLOCK, (length - 1) // BLOCK) * BLOCK > 0 or shared < BLOCK
    assert bitwise(warm_logits, cold_logits)


@pytest.mark.parametrize("length", [31, 32, 33, 64, 65, 130])
def test_the_same_prompt_again_reuses_all_but_its_last_token(cold: TorchEngine, length: int) -> None:
    """At most (n - 1) // block blocks: the last prompt token is computed for its logits, from its block's start."""
    warm = engine()
    prompt = ids(length, seed=3)
    first_logits, first_cached = run(warm, prompt)
    again_logits, again_cached = run(warm, prompt)
    assert first_cached == 0
    assert again_cached == ((length - 1) // BLOCK) * BLOCK
    assert bitwise(again_logits, first_logits)
    assert bitwise(again_logits, run(cold, prompt)[0])


def test_a_resumed_generation_reuses_the_prompt_and_equals_a_cold_resume(cold: TorchEngine) -> None:
    """Failover: the node that takes over prefills prompt + the tokens the client has; the prompt's blocks count."""
    warm = engine()
    prompt = ids(100, seed=4)
    run(warm, prompt)
    resume = tuple(ids(41, seed=5)[1:])
    request = job(max_tokens=52, resume=resume)
    warm_logits, cached = run(warm, prompt, request)
    cold_logits, _ = run(cold, prompt, request)
    assert cached == 96
    assert bitwise(warm_logits, cold_logits)


def test_served_events_with_and_without_the_cache_are_equal_but_for_the_count() -> None:
    """Through `generate`, as the node serves it: the same tokens, text and proof; the last event counts the hit."""
    warm, off = engine(), engine(prefix_cache_mb=0)
    system = "You are a helpful assistant of the grid. Answer briefly and precisely. " * 3

    def request(question: str) -> GenerateRequest:
        sampling = SamplingParams(max_tokens=24, temperature=0.0)
        return GenerateRequest(request_id="q", model=TINY_MODEL, prompt=system + question, sampling=sampling)

    async def events(eng: TorchEngine, req: GenerateRequest) -> list[TokenEvent]:
        return [e async for e in eng.generate(req)]

    asyncio.run(events(warm, request("What is a node?")))
    hit = asyncio.run(events(warm, request("What is a gateway?")))
    miss = asyncio.run(events(off, request("What is a gateway?")))
    prompt_tokens = 1 + len(system) + len("What is a gateway?")  # bos, then a token per byte
    shared = 1 + len(system) + len("What is a ")
    assert hit[-1].prompt_tokens == miss[-1].prompt_tokens == prompt_tokens
    assert miss[-1].cached_tokens == 0
    assert hit[-1].cached_tokens == shared // BLOCK * BLOCK > 0
    timings = {"queue_s": 0.0, "prefill_s": 0.0, "decode_s": 0.0, "cached_tokens": 0}
    assert [e.model_copy(update=timings) for e in hit] == [e.model_copy(update=timings) for e in miss]
    assert hit[-1].wire()["cached_tokens"] == hit[-1].cached_tokens
    assert "cached_tokens" not in miss[-1].wire()  # 0, the default, is left out like the empty digest


# --- blocks, budget, eviction --------------------------------------------------------------------------------


def test_block_keys_name_whole_prefixes() -> None:
    a, b = ids(200, seed=6), ids(200, seed=7)
    c = [*a[:100], *b[100:]]
    ka, kc = block_keys(a, 32), block_keys(c, 32)
    assert len(ka) == 200 // 32
    assert ka[:3] == kc[:3]  # blocks [0, 96) are shared
    assert all(x != y for x, y in zip(ka[3:], kc[3:], strict=True))  # block 3 differs at 100; so does all after it
    assert block_keys(a[:95], 32) == ka[:2]  # only whole blocks
    assert block_keys([*a[:32], *a[:32]], 32)[1] != ka[0]  # a block's key covers what comes before it


def test_the_budget_is_whole_blocks_and_the_engine_advertises_it() -> None:
    model = build_tiny_model().model
    per_token = kv_bytes_per_token(model)
    assert per_token == 2 * 2 * 1 * 32 * 4  # 2 layers x (keys + values) x 1 kv head x head_dim 32 x float32
    eng = engine(prefix_cache_mb=1)
    assert eng.prefix_cache_tokens() == (2**20 // (BLOCK * per_token)) * BLOCK
    assert engine(prefix_cache_mb=0).prefix_cache_tokens() == 0
    assert tiny_engine(prefix_cache_mb=1, lazy=True).prefix_cache_tokens() is None  # not loaded: not known yet
    run(eng, ids(100, seed=8))
    stats = eng.prefix_cache.stats()  # type: ignore[union-attr]
    assert stats.blocks == 3 and stats.bytes == 3 * BLOCK * per_token  # what it counts is what it holds


def test_a_model_whose_window_cannot_hold_a_block_keeps_nothing() -> None:
    model = build_tiny_model().model
    assert cacheable(model, WINDOW - 1) is None
    assert "sliding window" in str(cacheable(model, WINDOW))
    assert not PrefixCache.for_model(model, 2**20, block=WINDOW).enabled


def test_least_recently_used_prompts_go_first_and_a_prefix_outlives_its_continuations() -> None:
    per_block = BLOCK * kv_bytes_per_token(build_tiny_model().model)
    eng = tiny_engine(threads=THREADS)
    eng._prefix_budget = 8 * per_block  # room for 8 blocks
    eng.load_sync()
    cache = eng.prefix_cache
    assert cache is not None and cache.capacity_tokens() == 8 * BLOCK
    stem = ids(64, seed=9)  # 2 blocks, shared
    a = [*stem, *ids(65, seed=10)[1:]]  # 4 blocks
    b = [*stem, *ids(65, seed=11)[1:]]  # 2 shared + 2 more
    c = ids(129, seed=12)  # 4 blocks of its own
    assert run(eng, a)[1] == 0 and cache.stats().blocks == 4
    assert run(eng, b)[1] == 64 and cache.stats().blocks == 6
    run(eng, c)  # 4 new blocks in a budget of 8: a's 2 own blocks (least recently used) go, not the shared stem
    assert cache.stats().blocks == 8 and cache.stats().evicted_blocks == 2
    assert run(eng, b)[1] == 96  # b whole (but its last token's block)
    assert run(eng, [*a[:64], *ids(40, seed=13)[1:]])[1] == 64  # a's stem is there; its own blocks are gone
    assert run(eng, c)[1] == 96


def test_a_prompt_larger_than_the_budget_keeps_its_first_blocks() -> None:
    per_block = BLOCK * kv_bytes_per_token(build_tiny_model().model)
    eng = tiny_engine(threads=THREADS)
    eng._prefix_budget = 3 * per_block
    eng.load_sync()
    long = ids(300, seed=14)
    run(eng, long)
    assert eng.prefix_cache.stats().blocks == 3  # type: ignore[union-attr]
    assert run(eng, long)[1] == 96  # the first three, not the last three (useless without their prefix)


# --- the count on the wire: event, receipt, usage ------------------------------------------------------------


@pytest.fixture(scope="module")
def writer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    yield from store_writer(tmp_path_factory.mktemp("prefix-store"))


def test_the_signed_receipt_carries_the_count_and_the_gateway_accepts_it(writer: Any) -> None:
    from gridserve.gateway.ops.metrics import GatewayMetrics
    from gridserve.gateway.registry.events import Registered
    from gridserve.gateway.registry.membership import Membership
    from gridserve.trust import EnvelopeVerifier, FreshnessPolicy

    identity = Identity.generate()
    offer = ModelOffer(name=TINY_MODEL, weights_digest="seed:test")
    cap = Capability(
        node_id=NodeId(identity.node_id),
        public_key=identity.public_key,
        endpoint="http://node.test",
        engine="tiny",
        models=(offer,),
        hardware=HardwareInfo(accelerator="cpu"),
        runtime=RuntimeInfo(gridserve="t", python="t", engine="t"),
        prefix_cache_tokens=4096,
    )
    now = time.time()
    membership = Membership(CONFIG, EnvelopeVerifier(FreshnessPolicy(), time.time), writer, GatewayMetrics())
    membership.apply(Registered(cap, at=now, registered_at=now, capability_at=now, last_seen=now))
    request = job(max_tokens=2)
    receipts = Receipter(SimpleNamespace(identity=identity), wire_payload(request), "seed:test", Dishonesty())  # type: ignore[arg-type]
    lines = [
        receipts.line(TokenEvent(text="a", token_ids=(100,))),
        receipts.line(TokenEvent(text="b", token_ids=(101,))),
        receipts.line(TokenEvent(finish_reason="length", prompt_tokens=70, completion_tokens=2, cached_tokens=64)),
    ]
    final: StreamEvent = orjson.loads(lines[-1])
    assert final["cached_tokens"] == 64
    check = ReceiptChecker(membership, writer).check(identity.node_id, request, [100, 101], final)
    assert check.ok, check.problems
    assert check.receipt is not None and check.receipt.cached_tokens == 64
    old = check.receipt.model_dump(mode="json")
    del old["cached_tokens"]
    assert Receipt.model_validate(old).cached_tokens == 0  # a node that predates the field


def test_capability_without_the_prefix_cache_field_still_parses() -> None:
    cap = {
        "node_id": "n1",
        "public_key": "k",
        "endpoint": "http://n1",
        "engine": "tiny",
        "models": [],
        "hardware": {"accelerator": "cpu"},
        "runtime": {"gridserve": "0", "python": "3", "engine": "tiny"},
    }
    assert Capability.model_validate_json(orjson.dumps(cap)).prefix_cache_tokens is None


def test_usage_reports_cached_tokens_as_openai_does() -> None:
    assert usage(70, 5, 64) == {
        "prompt_tokens": 70,
        "completion_tokens": 5,
        "total_tokens": 75,
        "prompt_tokens_details": {"cached_tokens": 64},
    }
    assert usage(70, 5)["prompt_tokens_details"] == {"cached_tokens": 0}
    assert usage(10, 5, 64)["prompt_tokens_details"] == {"cached_tokens": 10}  # never more than the prompt
    for chat in (True, False):
        fmt = ChunkFormatter(chat=chat, response_id="x", model=TINY_MODEL, created=1)
        assert fmt.whole(Answer("stop", 70, 5, 64, "hi"))["usage"] == usage(70, 5, 64)
        chunk = orjson.loads(fmt.usage(70, 5, 64)[len(b"data: ") :])
        assert chunk["usage"] == usage(70, 5, 64) and chunk["choices"] == []


@pytest.mark.parametrize("chat", [True, False], ids=["chat", "completions"])
def test_answers_carry_the_nodes_cached_count_streamed_and_whole(chat: bool) -> None:
    node: list[StreamEvent] = [
        {"text": "hi", "token_ids": [5]},
        {"finish_reason": "stop", "prompt_tokens": 70, "completion_tokens": 2, "cached_tokens": 64},
    ]
    ctx = context()
    fmt = ChunkFormatter(chat=chat, response_id="x", model=TINY_MODEL, created=1, include_usage=True)

    async def streamed() -> list[bytes]:
        return [c async for c in answers.sse(ctx, Scripted(node), fmt)]

    lines = b"".join(asyncio.run(streamed())).split(b"\n\n")
    assert lines[-2:] == [b"data: [DONE]", b""]
    last = orjson.loads(lines[-3][len(b"data: ") :])
    assert last["usage"]["prompt_tokens_details"] == {"cached_tokens": 64}
    whole = asyncio.run(answers.collect(ctx, Scripted(node), fmt))
    assert whole["usage"] == usage(70, 2, 64)
    older = [node[0], {"finish_reason": "stop", "prompt_tokens": 70, "completion_tokens": 2}]  # no count: 0
    assert asyncio.run(answers.collect(ctx, Scripted(older), fmt))["usage"]["prompt_tokens_details"] == {
        "cached_tokens": 0
    }


# --- an upstream server's own cache ---------------------------------------------------------------------------


class _Body:
    """What `_events` reads of an aiohttp response: its body, line by line."""

    def __init__(self, chunks: list[dict[str, Any]]) -> None:
        self.content = self._lines([b"data: " + orjson.dumps(c) + b"\n" for c in chunks] + [b"data: [DONE]\n"])

    @staticmethod
    async def _lines(lines: list[bytes]) -> AsyncIterator[bytes]:
        for line in lines:
            yield line


def _upstream_final(*extra: dict[str, Any]) -> TokenEvent:
    from gridserve.engines.upstream import UpstreamEngine

    engine = UpstreamEngine(url="http://upstream.test", served_name="m", upstream_model="m", max_context=4096)
    chunks = [{"choices": [{"index": 0, "text": "hi", "finish_reason": None}]}, *extra]

    async def go() -> list[TokenEvent]:
        return [e async for e in engine._events(_Body(chunks))]  # type: ignore[arg-type]

    return asyncio.run(go())[-1]


def test_upstream_requests_ask_the_server_to_cache_the_prompt() -> None:
    from gridserve.engines.upstream import UpstreamEngine

    engine = UpstreamEngine(url="http://upstream.test", served_name="m", upstream_model="m", max_context=4096)
    for req in (job(), job().model_copy(update={"prompt": None, "messages": ()})):
        assert engine._body(req)[1]["cache_prompt"] is True


def test_upstream_cached_count_from_openai_details_or_llama_cpp_timings() -> None:
    usage = {"prompt_tokens": 70, "completion_tokens": 1, "total_tokens": 71}
    done = {"choices": [{"index": 0, "text": "", "finish_reason": "stop"}]}
    # vLLM (--enable-prompt-tokens-details), recent llama.cpp servers: OpenAI's form
    detailed = {**done, "usage": {**usage, "prompt_tokens_details": {"cached_tokens": 48}}}
    assert _upstream_final(detailed).cached_tokens == 48
    # llama.cpp's server: its timings (cache_n), in the last chunk
    assert _upstream_final({**done, "usage": usage, "timings": {"cache_n": 32, "prompt_n": 38}}).cached_tokens == 32
    # llama-cpp-python 0.3.x: usage without a cached count
    plain = _upstream_final({**done, "usage": usage})
    assert plain.cached_tokens == 0 and plain.prompt_tokens == 70
    # never more than the prompt
    assert (
        _upstream_final({**done, "usage": {**usage, "prompt_tokens_details": {"cached_tokens": 99}}}).cached_tokens
        == 70
    )
    # a server that does not count the prompt: no cached count either (the receipt check bounds one by the other)
    assert _upstream_final({**done, "timings": {"cache_n": 32}}).cached_tokens == 0


def test_the_node_option_defaults_to_the_engines_budget() -> None:
    import typer.main

    from gridserve.cli.main import app

    node = typer.main.get_command(app).commands["node"]  # type: ignore[attr-defined]
    (option,) = [p for p in node.params if p.name == "prefix_cache_mb"]
    assert option.default == DEFAULT_PREFIX_CACHE_MB and "--prefix-cache-mb" in option.opts
