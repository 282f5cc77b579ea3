"""The SSE answer goes out in one write per run of tokens that were already at the gateway (`Source.ready`): the
same bytes as token by token, in fewer writes when the gateway is behind on a stream, and never a token held back
while the next one is still to come."""

import asyncio

import orjson
from tests.answer_support import CTX, Scripted

from gridserve.gateway.api import answers
from gridserve.gateway.api.sse import ChunkFormatter
from gridserve.types import StreamEvent


def tokens(count: int) -> list[StreamEvent]:
    return [{"text": f"t{i} ", "token_ids": [i]} for i in range(count)]


FINAL: StreamEvent = {"finish_reason": "stop", "prompt_tokens": 3, "completion_tokens": 5}


def chunks(events: list[StreamEvent], here: list[bool]) -> list[bytes]:
    fmt = ChunkFormatter(chat=True, response_id="x", model="m", created=1)

    async def go() -> list[bytes]:
        return [c async for c in answers.sse(CTX, Scripted(events, here), fmt)]

    return asyncio.run(go())


def texts(chunk: bytes) -> list[str]:
    out = []
    for line in chunk.split(b"\n\n"):
        if line.startswith(b"data: {") and b'"choices"' in line:
            delta = orjson.loads(line[6:])["choices"][0]["delta"]
            out.append(delta.get("content", "") or "")
    return out


def test_tokens_already_here_go_out_with_the_one_before_in_one_write() -> None:
    events = [*tokens(5), FINAL]
    here = [False, False, True, True, False, False]  # t2 and t3 had arrived while t1 was handled
    batched = chunks(events, here)
    alone = chunks(events, [False] * len(events))
    assert b"".join(batched) == b"".join(alone), "the same bytes either way"
    assert [texts(c) for c in batched] == [["", "t0 "], ["t1 ", "t2 ", "t3 "], ["t4 "], [""], []]
    assert batched[-1] == b"data: [DONE]\n\n", "the close goes on its own (n > 1 streams drop each choice's)"
    assert len(alone) == 7 and len(batched) == 5


def test_a_token_is_never_held_while_the_next_is_still_to_come() -> None:
    events = [*tokens(3), FINAL]
    for i, chunk in enumerate(chunks(events, [False] * len(events))[:3]):
        assert texts(chunk)[-1] == f"t{i} "


def test_an_error_goes_out_with_the_tokens_made_before_it() -> None:
    events: list[StreamEvent] = [*tokens(2), {"error": {"message": "engine died"}}]
    out = chunks(events, [False, True, True])
    assert len(out) == 1 and texts(out[0]) == ["", "t0 ", "t1 "] and b"engine died" in out[0]
