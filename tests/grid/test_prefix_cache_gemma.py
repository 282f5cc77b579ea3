"""The prefix cache on the real Gemma 3 270M, in process: a follow-up that shares a long prefix with an earlier
prompt (a chat's next turn, a shared document) gets the logits of a cold run bit for bit, past the model's
512-token sliding window too, and its prefill skips the cached part."""

import asyncio
from collections.abc import Iterator

import pytest
import torch
from tests.prefix_support import stepped

from gridserve.engines.gemma import GEMMA_MODEL, ensure_cache, gemma_engine
from gridserve.engines.prefix_cache import BLOCK_TOKENS, PrefixCache
from gridserve.engines.torch_engine import TorchEngine
from gridserve.types import ChatMessage, GenerateRequest, SamplingParams, TokenEvent

THREADS = 2  # as the other Gemma tests: fp32 results are bitwise equal at one thread count

pytestmark = pytest.mark.slow

DOCUMENT = (
    "The lighthouse stood on a spit of black rock at the mouth of the bay. Its keeper, a patient woman named Ines, "
    "climbed the hundred and twelve steps every evening at dusk to light the lamp, trim the wick and wind the "
    "clockwork that turned the great lens. Ships coming in from the north relied on its beam to find the channel "
    "between the shoals. "
) * 14


@pytest.fixture(scope="module")
def engines() -> Iterator[tuple[TorchEngine, TorchEngine]]:
    """(with a prefix cache, without one)."""
    ensure_cache()
    warm, cold = gemma_engine(threads=THREADS), gemma_engine(threads=THREADS, prefix_cache_mb=0)
    warm.load_sync()
    cold.load_sync()
    yield warm, cold
    for engine in (warm, cold):
        asyncio.run(engine.aclose())


@pytest.fixture(autouse=True)
def threads() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(before)


def request(messages: tuple[ChatMessage, ...], max_tokens: int = 16) -> GenerateRequest:
    sampling = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    return GenerateRequest(request_id="g", model=GEMMA_MODEL, messages=messages, sampling=sampling)


def logits_run(engine: TorchEngine, job: GenerateRequest) -> tuple[list[torch.Tensor], int, float]:
    """Greedy decoding as the engine's worker runs it, one step at a time: the logits behind each token, the
    prompt tokens taken from the cache, and the prefill's seconds."""
    gen, logits = stepped(engine, engine.prompt_ids(job), job)
    assert gen.began is not None and gen.first_at is not None
    return logits, gen.cached, gen.first_at - gen.began


def served(engine: TorchEngine, job: GenerateRequest) -> list[TokenEvent]:
    async def go() -> list[TokenEvent]:
        return [e async for e in engine.generate(job)]

    return asyncio.run(go())


def test_a_follow_up_sharing_a_long_prefix_gets_the_cold_logits_bit_for_bit(
    engines: tuple[TorchEngine, TorchEngine],
) -> None:
    warm, cold = engines
    system = ChatMessage(role="system", content="Answer in one short sentence.\n\n" + DOCUMENT)
    first = request((system, ChatMessage(role="user", content="Who keeps the lighthouse?")))
    follow = request((system, ChatMessage(role="user", content="How many steps does the keeper climb?")))
    ids, before = warm.prompt_ids(follow), warm.prompt_ids(first)
    length = len(ids)
    assert length > 1000  # past the 512-token sliding window, twice
    shared = next(i for i, (a, b) in enumerate(zip(ids, before, strict=False)) if a != b)
    assert isinstance(warm.prefix_cache, PrefixCache) and warm.prefix_cache.block == BLOCK_TOKENS
    _, cached_first, cold_prefill = logits_run(warm, first)
    warm_logits, cached, warm_prefill = logits_run(warm, follow)
    cold_logits, none, _ = logits_run(cold, follow)
    assert cached_first == none == 0
    assert cached == shared // BLOCK_TOKENS * BLOCK_TOKENS > length - 2 * BLOCK_TOKENS  # all but the question's block
    assert len(warm_logits) == len(cold_logits) == 16
    assert all(torch.equal(a, b) for a, b in zip(warm_logits, cold_logits, strict=True))
    assert warm_prefill < cold_prefill / 2  # ~100 of ~1,000 tokens computed


def test_a_chats_next_turn_reuses_the_last_turns_prompt_and_answers_as_a_cold_node(
    engines: tuple[TorchEngine, TorchEngine],
) -> None:
    """Through `generate`, as a node serves it: same tokens, text and proof; the last event counts the reuse."""
    warm, cold = engines
    turn = [
        ChatMessage(role="system", content="You are a lighthouse historian. " + DOCUMENT[:1500]),
        ChatMessage(role="user", content="Describe the lighthouse."),
    ]
    events = served(warm, request(tuple(turn), max_tokens=24))
    answer = "".join(e.text for e in events)
    previous = len(warm.prompt_ids(request(tuple(turn))))
    turn += [ChatMessage(role="assistant", content=answer), ChatMessage(role="user", content="And its keeper?")]
    hit = served(warm, request(tuple(turn), max_tokens=24))
    miss = served(cold, request(tuple(turn), max_tokens=24))
    assert hit[-1].cached_tokens >= previous - BLOCK_TOKENS  # the earlier prompt's whole blocks
    assert miss[-1].cached_tokens == 0 and hit[-1].prompt_tokens == miss[-1].prompt_tokens
    unset = {"queue_s": 0.0, "prefill_s": 0.0, "decode_s": 0.0, "cached_tokens": 0}
    assert [e.model_copy(update=unset) for e in hit] == [e.model_copy(update=unset) for e in miss]
    assert "".join(e.text for e in hit).strip()
