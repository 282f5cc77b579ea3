"""The emulated node's token count (engines/tokencount.py): a split of any text into tokens, and counts within 10%
of real tokenizers' on English text (their counts recorded in tests/english.py; Gemma's re-measured by
tests/grid/test_tokencount_gemma.py)."""

import pytest
from hypothesis import given
from hypothesis import strategies as st
from tests.english import CHAT, LLAMA3, LLAMA3_CHAT, TEXTS

from gridserve.engines import tokencount
from gridserve.engines.emulated import WORDS
from gridserve.engines.tokencount import MESSAGE_TOKENS, REPLY_TOKENS, count_tokens, tokens
from gridserve.types import ChatMessage

SEAM = 2
"""Tokens a seam between two texts of up to `SHORT` characters may add or remove (a word or a number run that
joins, a contraction that forms): BPE merges across the seam too."""
SHORT = 24

texts = st.text(max_size=200) | st.text(alphabet=st.sampled_from(list("abc XYZ 019 .,'!-_\n\té€")), max_size=200)


def test_no_text_is_no_tokens() -> None:
    assert tokens("") == [] and count_tokens("") == 0


@given(texts)
def test_the_tokens_are_the_text_cut_and_never_more_than_its_characters(text: str) -> None:
    cut = tokens(text)
    assert "".join(cut) == text
    assert all(cut)
    assert (len(cut) >= 1) == bool(text)
    assert len(cut) <= len(text)
    assert tokens(text) == cut  # the same text, the same split


@given(st.text(max_size=SHORT), st.text(max_size=SHORT))
def test_a_seam_changes_the_count_by_at_most_two(left: str, right: str) -> None:
    joined = count_tokens(left + right)
    assert count_tokens(left) + count_tokens(right) - SEAM <= joined <= count_tokens(left) + count_tokens(right) + SEAM


@given(texts, st.from_regex(r"[a-zA-Z]", fullmatch=True), st.from_regex(r" [a-z]+", fullmatch=True), texts)
def test_counts_add_up_across_a_word_boundary(head: str, last: str, word: str, tail: str) -> None:
    """Text that ends in a letter and text that starts with a space and a word are cut where each alone is."""
    left, right = head + last, word + tail
    assert tokens(left + right) == tokens(left) + tokens(right)


@given(st.lists(st.sampled_from(WORDS), max_size=100))
def test_the_emulated_vocabulary_counts_one_token_a_word(words: list[str]) -> None:
    assert count_tokens("".join(f" {w}" for w in words)) == len(words)


@pytest.mark.parametrize("name", sorted(TEXTS))
def test_english_text_counts_within_10_percent_of_llama_3(name: str) -> None:
    """Within 10%, or two tokens for a sentence of a dozen."""
    ours, theirs = count_tokens(TEXTS[name]), LLAMA3[name]
    assert abs(ours - theirs) <= max(2, 0.10 * theirs), (ours, theirs)
    assert len(tokencount.prompt_tokens(TEXTS[name])) == ours + 1  # and the beginning-of-text token


def test_all_of_the_english_texts_together_within_3_percent_of_llama_3() -> None:
    ours, theirs = sum(count_tokens(t) for t in TEXTS.values()), sum(LLAMA3.values())
    assert abs(ours / theirs - 1) <= 0.03


def test_a_chat_counts_a_handful_of_template_tokens_per_message() -> None:
    messages = [ChatMessage(role=role, content=text) for role, text in CHAT]
    counted = tokencount.chat_tokens(messages)
    content = sum(count_tokens(m.content.strip()) for m in messages)
    assert len(counted) == 1 + MESSAGE_TOKENS * len(messages) + content + REPLY_TOKENS
    assert abs(len(counted) / LLAMA3_CHAT - 1) <= 0.10
    one = tokencount.chat_tokens([ChatMessage(role="user", content="What is the capital of France?")])
    assert len(one) == 1 + 5 + LLAMA3["question"] + 4  # Llama 3's template: 17 tokens, not 56 + 30


def test_a_piece_costs_more_tokens_the_longer_it_is() -> None:
    words = [" " + "a" * n for n in range(1, 40)]
    expected = [tokencount.expected_tokens(w) for w in words]
    assert expected == sorted(expected) and expected[3] == 1.0 < expected[4]  # up to 5 characters: one token
    assert tokencount.expected_tokens("    ") == tokencount.expected_tokens("123") == 1.0
