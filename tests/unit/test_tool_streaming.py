"""Streamed tool calls (gateway/api/tools.py CallStream, answers.Calls, sse.ChunkFormatter.call_delta): a calling
answer's calls go out as they are made, in OpenAI's chunk shape (a call's id and name once its name is whole, then
its arguments' text as it comes), however the node's text is cut into tokens; what the deltas add up to is the
whole answer's calls; text in another form stops the stream of calls, and a call that fails its check once part of
it went out ends the stream with an error and an incident, never with a different call."""

import asyncio
import json
from types import SimpleNamespace
from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st
from tests.answer_support import Scripted

from gridserve.gateway.api import answers
from gridserve.gateway.api.sse import ChunkFormatter
from gridserve.gateway.api.tools import CallStream, parse_calls, tool_format
from gridserve.types import StreamEvent
from gridserve.types.wire import TOOL_CALL_TAG

SCALARS = st.none() | st.booleans() | st.integers(-(10**6), 10**6) | st.text(max_size=8)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=12,
)
CALLS = st.lists(
    st.tuples(st.text(min_size=1, max_size=10), st.dictionaries(st.text(max_size=6), VALUES, max_size=4)),
    min_size=1,
    max_size=4,
)


def spaced(calls: list[tuple[str, dict[str, Any]]], space: str) -> str:
    """The calls' text as an engine writes them: compact (the gateway's grammar) or with whitespace between tokens."""
    items = [{"name": name, "arguments": arguments} for name, arguments in calls]
    if not space:
        return TOOL_CALL_TAG + orjson.dumps(items).decode()
    return TOOL_CALL_TAG + space + json.dumps(items, separators=(space + "," + space, space + ":" + space))


def read(text: str, cuts: list[int]) -> tuple[CallStream, list[Any]]:
    stream, deltas, at = CallStream(), [], 0
    for cut in [*sorted(cuts), len(text)]:
        deltas += stream.feed(text[at:cut])
        at = max(at, cut)
    return stream, deltas


@settings(max_examples=150, deadline=None)
@given(calls=CALLS, space=st.sampled_from(["", " ", "\n  "]), data=st.data())
def test_deltas_add_up_to_the_calls_however_the_text_is_cut(calls: Any, space: str, data: Any) -> None:
    text = spaced(calls, space)
    cuts = data.draw(st.lists(st.integers(0, len(text)), max_size=40))
    stream, deltas = read(text, cuts)
    assert stream.done
    starts = [d for d in deltas if d.name is not None]
    assert [(d.index, d.name, d.arguments) for d in starts] == [(i, name, "") for i, (name, _) in enumerate(calls)]
    seen: list[int] = []
    for d in deltas:  # each call starts before its arguments, and calls come in order
        assert d.index == len(seen) - 1 or (d.name is not None and d.index == len(seen))
        if d.name is not None:
            seen.append(d.index)
    joined = ["".join(d.arguments for d in deltas if d.index == i) for i in range(len(calls))]
    assert [json.loads(j) for j in joined] == [arguments for _, arguments in calls]
    made = stream.made()
    assert made is not None and [(c.name, c.arguments, c.made, c.id) for c in made] == [
        (name, arguments, j, s.id) for (name, arguments), j, s in zip(calls, joined, starts, strict=True)
    ]
    whole = parse_calls(text)
    assert whole is not None and [(c.name, c.arguments, c.arguments_text) for c in whole] == [
        (name, arguments, j) for (name, arguments), j in zip(calls, joined, strict=True)
    ]


@given(calls=CALLS, data=st.data())
def test_calls_are_made_only_from_text_that_is_calls(calls: Any, data: Any) -> None:
    """The reading follows the calls' structure, not every JSON rule: what it makes at the end is checked whole, and
    only text that parses as these very calls makes calls."""
    text = spaced(calls, "")
    bad = data.draw(st.integers(len(TOOL_CALL_TAG), len(text) - 1))
    broken = text[:bad] + data.draw(st.sampled_from(["x", "]]", '"', "}", ",", "\\"])) + text[bad:]
    stream, _ = read(broken, data.draw(st.lists(st.integers(0, len(broken)), max_size=20)))
    made = stream.made()
    try:
        parsed = json.loads(broken[len(TOOL_CALL_TAG) :])
    except ValueError:
        parsed = None
    if made is not None:
        assert parsed == [{"name": c.name, "arguments": c.arguments} for c in made]


FORECAST = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 8}, "days": {"type": "integer", "minimum": 1}},
    "required": ["city", "days"],
    "additionalProperties": False,
}
TOOLS = [{"type": "function", "function": {"name": "forecast", "parameters": FORECAST}}]


def stream_of(pieces: list[str], reason: str = "stop") -> tuple[list[dict[str, Any]], list[Any]]:
    """The chat chunks a calling answer made of `pieces` (one token each) becomes, and the incidents it made."""
    fmt_, _ = tool_format(TOOLS, "required", None)
    assert fmt_ is not None
    incidents: list[Any] = []
    ctx: Any = SimpleNamespace(lifecycle=_Lifecycle(), membership=SimpleNamespace(note=incidents.append))
    events: list[StreamEvent] = [{"text": p, "token_ids": [i]} for i, p in enumerate(pieces)]
    events.append({"finish_reason": reason, "prompt_tokens": 3, "completion_tokens": len(pieces)})
    source = Scripted(events)
    fmt = ChunkFormatter(chat=True, response_id="x", model="m", created=1)

    async def go() -> list[bytes]:
        return [c async for c in answers.sse(ctx, source, fmt, answers.Calls(ctx, source, fmt_))]

    lines = b"".join(asyncio.run(go())).split(b"\n\n")
    return [orjson.loads(line[6:]) for line in lines if line.startswith(b"data: {")], incidents


class _Lifecycle:
    def finished(self, scope: Any, end: Any) -> None:
        return None

    async def commit(self, end: Any, settled: Any) -> None:
        return None


def cut(text: str, size: int) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)]


def test_a_call_streams_in_openais_chunk_shape_and_is_not_sent_again_whole() -> None:
    text = TOOL_CALL_TAG + '[{"name":"forecast","arguments":{"city":"Lyon","days":3}}]'
    chunks, incidents = stream_of(cut(text, 3))
    deltas = [tc for c in chunks for tc in c["choices"][0]["delta"].get("tool_calls", ())]
    assert deltas[0] == {
        "index": 0,
        "id": deltas[0]["id"],
        "type": "function",
        "function": {"name": "forecast", "arguments": ""},
    }
    assert deltas[0]["id"].startswith("call_")
    assert all(d == {"index": 0, "function": {"arguments": d["function"]["arguments"]}} for d in deltas[1:])
    assert len(deltas) > 4, "the arguments come piece by piece"
    assert "".join(d["function"]["arguments"] for d in deltas) == '{"city":"Lyon","days":3}'
    reasons = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert reasons[-1] == "tool_calls" and reasons.count("tool_calls") == 1 and not incidents
    assert not any(c["choices"][0]["delta"].get("content") for c in chunks if c["choices"])


def test_a_streamed_call_that_fails_its_check_ends_the_stream_with_an_error_and_an_incident() -> None:
    text = TOOL_CALL_TAG + '[{"name":"forecast","arguments":{"city":"Lyon","days":0}}]'  # days below its minimum
    chunks, incidents = stream_of(cut(text, 4))
    assert chunks[-1]["error"]["code"] == "node_failed" and "not valid" in chunks[-1]["error"]["message"]
    assert not [c for c in chunks if c.get("choices") and c["choices"][0]["finish_reason"]], "no end, no call"
    assert len(incidents) == 1 and "tool call" in incidents[0].detail, incidents


def test_an_answer_cut_by_max_tokens_ends_length_with_what_was_streamed() -> None:
    text = TOOL_CALL_TAG + '[{"name":"forecast","arguments":{"city":"Ly'
    chunks, incidents = stream_of(cut(text, 5), reason="length")
    deltas = [tc for c in chunks if c["choices"] for tc in c["choices"][0]["delta"].get("tool_calls", ())]
    assert "".join(d["function"]["arguments"] for d in deltas) == '{"city":"Ly' and not incidents
    reasons = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert reasons == ["length"] and not any("error" in c for c in chunks)
    assert not any(c["choices"][0]["delta"].get("content") for c in chunks if c["choices"]), "no text sent after"
