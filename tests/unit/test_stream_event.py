"""The node's stream lines and the gateway's reading of them share one type (types/wire.py StreamEvent): the
node writes TokenEvent.wire() (plus its receipt), the transport decodes the line into the same fields."""

from gridserve.types import StreamEvent, TokenEvent


def test_stream_event_names_every_token_event_field_but_the_proof() -> None:
    """A field added to TokenEvent must be added to the wire type too (or the gateway reads it untyped). The
    lines that are not token events (the receipt, an error line, a busy line) are the wire type's own."""
    lines_of_their_own = {"receipt", "error", "busy"}
    assert set(TokenEvent.model_fields) - {"proof"} == set(StreamEvent.__annotations__) - lines_of_their_own


def test_a_token_event_carries_only_its_text_and_ids() -> None:
    assert TokenEvent(text="hi", token_ids=(5, 6)).wire() == {"text": "hi", "token_ids": [5, 6]}
    assert TokenEvent(token_ids=(7,)).wire() == {"token_ids": [7]}  # text pending (a stop string, a multi-byte char)


def test_the_last_event_carries_counts_and_timings_and_never_the_proof() -> None:
    last = TokenEvent(
        finish_reason="length",
        prompt_tokens=3,
        completion_tokens=4,
        queue_s=0.5,
        prefill_s=0.25,
        decode_s=1.0,
        prompt_digest="ab",
        proof="secret-in-receipt",
    ).wire()
    assert last == {
        "finish_reason": "length",
        "prompt_tokens": 3,
        "completion_tokens": 4,
        "queue_s": 0.5,
        "prefill_s": 0.25,
        "decode_s": 1.0,
        "prompt_digest": "ab",
    }
