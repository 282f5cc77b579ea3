"""An upstream server's stream as the node reads it: which stop string ended the answer, where the server says
(vLLM's `stop_reason`), reaches the last event; a stop token id or a server that does not say gives none."""

import asyncio
from collections.abc import AsyncIterator
from typing import Any, cast

import orjson
import pytest

from gridserve.engines.upstream import UpstreamEngine
from gridserve.types import TokenEvent


class FakeResponse:
    def __init__(self, chunks: list[dict[str, Any]]) -> None:
        self.lines = [b"data: " + orjson.dumps(c) + b"\n" for c in chunks] + [b"data: [DONE]\n"]

    @property
    def content(self) -> AsyncIterator[bytes]:
        async def lines() -> AsyncIterator[bytes]:
            for line in self.lines:
                yield line

        return lines()


def last_event(chunks: list[dict[str, Any]]) -> TokenEvent:
    engine = UpstreamEngine(url="http://127.0.0.1:1", served_name="m", upstream_model="m", max_context=64)

    async def read() -> list[TokenEvent]:
        return [e async for e in engine._events(cast(Any, FakeResponse(chunks)))]

    return asyncio.run(read())[-1]


def chunk(text: str = "", finish: str | None = None, **extra: Any) -> dict[str, Any]:
    return {"choices": [{"index": 0, "text": text, "finish_reason": finish, **extra}]}


@pytest.mark.parametrize(
    ("said", "finish", "named"),
    [
        ("END", "stop", "END"),  # vLLM: the stop string that matched
        (2, "stop", None),  # vLLM: a stop token id is not a stop sequence
        (None, "stop", None),  # end of sequence
        ("END", "length", None),  # cut by max_tokens whatever it says
    ],
)
def test_the_stop_string_an_upstream_names_reaches_the_last_event(said: Any, finish: str, named: str | None) -> None:
    final = last_event([chunk("Hello"), chunk(" there", finish, stop_reason=said)])
    assert final.finish_reason == ("length" if finish == "length" else "stop")
    assert final.stop_sequence == named
    assert ("stop_sequence" in final.wire()) == (named is not None)


def test_a_server_that_never_says_gives_none() -> None:
    final = last_event([chunk("Hi"), chunk("", "stop")])
    assert final.finish_reason == "stop" and final.stop_sequence is None
