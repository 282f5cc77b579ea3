"""Tests for the streaming text helpers: StopMatcher and IncrementalDecoder."""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise

from hypothesis import given, settings
from hypothesis import strategies as st

from gridserve.engines.text import IncrementalDecoder, StopMatcher

ALPHABET = "ab\n"


def split_at(text: str, cuts: Sequence[int]) -> list[str]:
    points = sorted({0, len(text), *cuts})
    return [text[i:j] for i, j in pairwise(points)] or [""]


@st.composite
def chunked_text(draw: st.DrawFn, alphabet: str = ALPHABET, max_size: int = 30) -> tuple[str, list[str]]:
    text = draw(st.text(alphabet, max_size=max_size))
    cuts = draw(st.lists(st.integers(0, len(text)), max_size=8))
    chunks = split_at(text, cuts)
    # Empty deltas can arrive too (a token that decodes to nothing yet).
    if draw(st.booleans()):
        chunks.insert(draw(st.integers(0, len(chunks))), "")
    return text, chunks


def run(stops: Sequence[str], chunks: Sequence[str]) -> tuple[str, StopMatcher, list[str]]:
    matcher = StopMatcher(stops)
    pieces = [matcher.feed(c) for c in chunks]
    pieces.append(matcher.flush())
    return "".join(pieces), matcher, pieces


def cut_at_earliest(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """Reference: the text cut where the stop that completes first (earliest end, then earliest start) begins."""
    ends = [(i + len(s), i) for s in stops if s for i in range(len(text)) if text.startswith(s, i)]
    return (text[: min(ends)[1]], True) if ends else (text, False)


stop_lists = st.lists(st.text(ALPHABET, max_size=4), max_size=4)


@given(case=chunked_text(), stops=stop_lists)
@settings(max_examples=500)
def test_output_is_text_cut_at_earliest_stop(case: tuple[str, list[str]], stops: list[str]) -> None:
    """For any stop list the stream's output is independent of chunking."""
    text, chunks = case
    out, matcher, _ = run(stops, chunks)
    expected, hit = cut_at_earliest(text, stops)
    assert out == expected
    assert matcher.stopped == hit
    ends = sorted((i + len(s), i, s) for s in stops if s for i in range(len(text)) if text.startswith(s, i))
    assert matcher.matched == (ends[0][2] if ends else None), "the stop string that ended it, named"


@given(case=chunked_text(), stops=stop_lists)
@settings(max_examples=500)
def test_output_invariants_for_any_stop_list(case: tuple[str, list[str]], stops: list[str]) -> None:
    """Any stop list: the output is a prefix of the text, contains no stop, and is followed by a stop iff stopped."""
    text, chunks = case
    out, matcher, _ = run(stops, chunks)
    real = [s for s in stops if s]
    assert text.startswith(out)
    assert not any(s in out for s in real)
    rest = text[len(out) :]
    if matcher.stopped:
        assert any(rest.startswith(s) for s in real)
    else:
        assert out == text
        assert not any(s in text for s in real)


@given(case=chunked_text(), stop=st.text(ALPHABET, min_size=1, max_size=5))
@settings(max_examples=300)
def test_single_stop_with_arbitrary_chunks(case: tuple[str, list[str]], stop: str) -> None:
    text, chunks = case
    out, matcher, _ = run([stop], chunks)
    i = text.find(stop)
    assert out == (text[:i] if i >= 0 else text)
    assert matcher.stopped == (i >= 0)


@given(case=chunked_text(st.characters(codec="utf-8"), max_size=20))
def test_no_stops_passes_everything_through_immediately(case: tuple[str, list[str]]) -> None:
    _, chunks = case
    matcher = StopMatcher([])
    for chunk in chunks:
        assert matcher.feed(chunk) == chunk
    assert matcher.flush() == ""
    assert not matcher.stopped


def test_empty_stop_strings_are_ignored() -> None:
    out, matcher, _ = run(["", ""], ["abc", "def"])
    assert out == "abcdef"
    assert not matcher.stopped


@given(case=chunked_text(), stops=stop_lists)
@settings(max_examples=300)
def test_nothing_is_emitted_after_stop(case: tuple[str, list[str]], stops: list[str]) -> None:
    _, chunks = case
    matcher = StopMatcher(stops)
    emitted_after = []
    for chunk in chunks:
        was_stopped = matcher.stopped
        piece = matcher.feed(chunk)
        if was_stopped:
            emitted_after.append(piece)
    if matcher.stopped:
        emitted_after.append(matcher.flush())
    assert all(p == "" for p in emitted_after)


@given(case=chunked_text(), stops=stop_lists)
@settings(max_examples=300)
def test_emitted_text_is_never_retracted(case: tuple[str, list[str]], stops: list[str]) -> None:
    """Text already emitted is final: every prefix of the emitted stream is a prefix of the final output."""
    _, chunks = case
    out, _, pieces = run(stops, chunks)
    running = ""
    for piece in pieces:
        running += piece
        assert out.startswith(running)


def test_holds_back_a_possible_stop_prefix() -> None:
    matcher = StopMatcher(["</s>"])
    assert matcher.feed("hello </") == "hello "
    assert matcher.feed("x") == "</x"
    assert matcher.feed("<") == ""
    assert matcher.flush() == "<"
    assert not matcher.stopped


def test_result_does_not_depend_on_chunking_when_stops_nest() -> None:
    stops = ["c", "aca"]
    whole, _, _ = run(stops, ["aca"])
    split, _, _ = run(stops, ["ac", "a"])
    assert whole == split


# --- IncrementalDecoder -----------------------------------------------------------------------------------


def utf8_decode(ids: Sequence[int]) -> str:
    """A byte-level decoder like the tiny engine's ByteCodec (one token per byte, replacement on errors)."""
    return bytes(ids).decode("utf-8", errors="replace")


@given(text=st.text(st.characters(codec="utf-8", exclude_characters="\ufffd"), max_size=40))
@settings(max_examples=400)
def test_decoder_never_emits_replacement_for_valid_utf8(text: str) -> None:
    data = text.encode("utf-8")
    decoder = IncrementalDecoder(utf8_decode)
    pieces = [decoder.push(b) for b in data]
    pieces.append(decoder.finish())
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == text
    # Characters come out as soon as their last byte arrives.
    for i, piece in enumerate(pieces[:-1]):
        prefix = data[: i + 1]
        try:
            prefix.decode("utf-8")
        except UnicodeDecodeError:
            assert piece == ""
    assert pieces[-1] == ""


@given(text=st.text(st.characters(codec="utf-8"), max_size=40))
def test_decoder_concatenation_equals_full_decode_including_literal_replacement_chars(text: str) -> None:
    data = text.encode("utf-8")
    decoder = IncrementalDecoder(utf8_decode)
    out = "".join(decoder.push(b) for b in data) + decoder.finish()
    assert out == text
    assert decoder.ids == list(data)


@given(data=st.binary(max_size=30))
def test_decoder_on_arbitrary_bytes_matches_full_decode(data: bytes) -> None:
    """Even invalid UTF-8: nothing is lost or duplicated, the stream equals the one-shot decode."""
    decoder = IncrementalDecoder(utf8_decode)
    out = "".join(decoder.push(b) for b in data) + decoder.finish()
    assert out == utf8_decode(list(data))


def test_decoder_with_the_tiny_byte_codec() -> None:
    from gridserve.engines.tiny import OFFSET, ByteCodec

    codec = ByteCodec()
    text = "héllo → 世界 🎉"
    ids = codec.encode_prompt(text)
    decoder = IncrementalDecoder(codec.decode)
    pieces = [decoder.push(i) for i in ids]
    pieces.append(decoder.finish())
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    assert all(i >= OFFSET for i in ids[1:])


def test_finish_is_idempotent() -> None:
    decoder = IncrementalDecoder(utf8_decode)
    for b in "aé".encode():
        decoder.push(b)
    decoder.push(0xE4)  # first byte of a three-byte character, never completed
    first = decoder.finish()
    assert first == "\ufffd"
    assert decoder.finish() == ""
