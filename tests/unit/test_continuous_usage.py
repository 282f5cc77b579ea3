"""`stream_options.continuous_usage_stats` (vLLM's, sent by benchmark clients such as guidellm): with
`include_usage`, every chunk of a streamed chat or text completion carries the usage so far; the last one is the
node's count. Without `include_usage` it does nothing (as in vLLM); with n > 1 it is refused, not ignored."""

import asyncio

import orjson
import pytest
from tests.answer_support import CTX, Scripted

from gridserve.gateway.api import answers
from gridserve.gateway.api.schemas import ChatCompletionRequest, CompletionRequest
from gridserve.gateway.api.sse import ChunkFormatter
from gridserve.types import StreamEvent

EVENTS: list[StreamEvent] = [
    {"text": "He", "token_ids": [1]},
    {"text": "llo", "token_ids": [2, 3]},  # (an event may carry more than one token)
    {"text": " you", "token_ids": [4]},
    {"text": "", "token_ids": [], "finish_reason": "length", "prompt_tokens": 7, "completion_tokens": 4},
]


def stream(chat: bool, prompt_tokens: int | None) -> list[dict[str, object]]:
    """The chunks' JSON objects, as the client parses them."""
    fmt = ChunkFormatter(chat=chat, response_id="x", model="m", created=1, include_usage=True)
    if prompt_tokens is not None:
        fmt.continuous(prompt_tokens)

    async def go() -> bytes:
        return b"".join([c async for c in answers.sse(CTX, Scripted(list(EVENTS)), fmt)])

    body = asyncio.run(go())
    return [orjson.loads(line[6:]) for line in body.split(b"\n\n") if line.startswith(b"data: {")]


@pytest.mark.parametrize("chat", [True, False])
def test_every_chunk_carries_the_usage_so_far_and_the_last_the_nodes(chat: bool) -> None:
    chunks = stream(chat, prompt_tokens=6)  # the gateway counted 6 prompt tokens, the node says 7
    assert all("usage" in c for c in chunks)
    seen = [(c["usage"]["prompt_tokens"], c["usage"]["completion_tokens"]) for c in chunks]  # type: ignore[index]
    role = [(6, 0)] if chat else []  # the chat stream opens with the role
    assert seen == [*role, (6, 1), (6, 3), (6, 4), (7, 4), (7, 4)]  # ..., the finish, the usage-only chunk
    assert all(c["usage"]["total_tokens"] == p + k for c, (p, k) in zip(chunks, seen, strict=True))  # type: ignore[index]
    key = "delta" if chat else "text"
    text = "".join(
        (c["choices"][0][key].get("content") or "") if chat else c["choices"][0][key]  # type: ignore[index]
        for c in chunks
        if c["choices"]
    )
    assert text == "Hello you"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}  # type: ignore[index]


@pytest.mark.parametrize("chat", [True, False])
def test_without_it_only_the_last_chunk_carries_usage(chat: bool) -> None:
    chunks = stream(chat, prompt_tokens=None)
    assert ["usage" in c for c in chunks] == [False] * (len(chunks) - 1) + [True]


@pytest.mark.parametrize("model", [ChatCompletionRequest, CompletionRequest])
def test_it_asks_for_continuous_usage_only_with_include_usage(model: type) -> None:
    base = {"model": "m", "stream": True}
    base |= {"messages": [{"role": "user", "content": "hi"}]} if model is ChatCompletionRequest else {"prompt": "hi"}
    both = model.model_validate(base | {"stream_options": {"include_usage": True, "continuous_usage_stats": True}})
    alone = model.model_validate(base | {"stream_options": {"continuous_usage_stats": True}})
    plain = model.model_validate(base | {"stream_options": {"include_usage": True}})
    assert (both.continuous_usage(), alone.continuous_usage(), plain.continuous_usage()) == (True, False, False)
