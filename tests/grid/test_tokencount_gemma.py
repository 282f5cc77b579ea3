"""The emulated node's token counts against a real tokenizer: Gemma 3 270M's, as gridserve's own Gemma engine
loads it (engines/gemma.py: converted from the GGUF). The prompt tokens an emulated node reports for English text,
plain or chat, short or long, agree with Gemma's within 10%; the words an emulated answer is spelled in are one
token each."""

import random

import pytest
from tests.english import CHAT, GEMMA3, TEXTS

from gridserve.engines import tokencount
from gridserve.engines.emulated import WORDS, prompt_ids
from gridserve.engines.gemma import HFCodec, ensure_cache
from gridserve.types import ChatMessage, GenerateRequest, SamplingParams

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gemma() -> HFCodec:
    from transformers import AutoTokenizer

    return HFCodec(AutoTokenizer.from_pretrained(str(ensure_cache())))


def _request(prompt: str | None = None, messages: tuple[ChatMessage, ...] | None = None) -> GenerateRequest:
    return GenerateRequest(
        request_id="r", model="llama-3-8b", prompt=prompt, messages=messages, sampling=SamplingParams()
    )


def test_the_recorded_counts_are_gemmas(gemma: HFCodec) -> None:
    """tests/english.py's figures, which the unit tests use without loading Gemma, are the tokenizer's own."""
    assert {name: len(gemma.tokenizer(text, add_special_tokens=False).input_ids) for name, text in TEXTS.items()} == (
        GEMMA3
    )


@pytest.mark.parametrize("name", sorted(TEXTS))
def test_a_plain_prompt_counts_within_10_percent_of_a_gemma_node(gemma: HFCodec, name: str) -> None:
    ours, theirs = len(prompt_ids(_request(TEXTS[name]))), len(gemma.encode_prompt(TEXTS[name]))
    assert abs(ours - theirs) <= max(2, 0.10 * theirs), (ours, theirs)


def gemma_chat(gemma: HFCodec, messages: tuple[ChatMessage, ...]) -> int:
    """Tokens of a chat (no system message) in Gemma 3's published turn format ("Prompt formatting" in Gemma's
    docs), line breaks included."""
    turns = "".join(
        f"<start_of_turn>{'model' if m.role == 'assistant' else m.role}\n{m.content.strip()}<end_of_turn>\n"
        for m in messages
    )
    rendered = f"<bos>{turns}<start_of_turn>model\n"
    return len(gemma.tokenizer(rendered, add_special_tokens=False).input_ids)


def test_a_chat_counts_within_10_percent_of_gemmas_template(gemma: HFCodec) -> None:
    """A conversation of user and assistant turns, and a one-line question: the template's tokens are a handful a
    message on both sides (Gemma 3: five a turn and three for the reply's; Llama 3, which the emulated count
    follows: five and four)."""
    turns = tuple(ChatMessage(role=role, content=text) for role, text in CHAT if role != "system")
    ours, theirs = len(prompt_ids(_request(messages=turns))), gemma_chat(gemma, turns)
    assert abs(ours / theirs - 1) <= 0.10, (ours, theirs)
    one = (ChatMessage(role="user", content=TEXTS["question"]),)
    ours, theirs = len(prompt_ids(_request(messages=one))), gemma_chat(gemma, one)
    assert abs(ours / theirs - 1) <= 0.10, (ours, theirs)


def test_an_emulated_answer_is_as_many_gemma_tokens_as_it_says(gemma: HFCodec) -> None:
    assert [w for w in WORDS if len(gemma.tokenizer(f" {w}", add_special_tokens=False).input_ids) != 1] == []
    rng = random.Random(0)
    answer = "".join(f" {rng.choice(WORDS)}" for _ in range(500))
    assert len(gemma.tokenizer(answer, add_special_tokens=False).input_ids) == 500
    assert tokencount.count_tokens(answer) == 500
