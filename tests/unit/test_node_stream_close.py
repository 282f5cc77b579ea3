"""A generation whose caller goes away is closed at once on the node, wherever the response was when the caller
left: its engine generator's cleanup (the batch slot, the KV cache, the active count) runs before the response
returns, not when the garbage collector finds it. The case Starlette misses is a cancel that comes while a chunk is
being sent, which is when the tunnel's sends wait (a hedge's loser is cancelled at its first token)."""

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
from starlette.requests import ClientDisconnect
from starlette.responses import StreamingResponse

from gridserve.engines import EngineStats
from gridserve.node import app as node_app
from gridserve.types import GenerateRequest, SamplingParams, TokenEvent


class Generation:
    """An engine's generator that counts itself active while it runs, as the engines do."""

    def __init__(self, stats: EngineStats) -> None:
        self.stats = stats

    async def run(self) -> AsyncIterator[TokenEvent]:
        self.stats.active += 1
        try:
            for i in range(1000):
                await asyncio.sleep(0.001)
                yield TokenEvent(text="x", token_ids=(i,))
        finally:
            self.stats.active -= 1


SPECS = ["2.3", "2.4"]
"""ASGI 2.3 (the node's tunnel declares it): the response listens for the disconnect and cancels its sending; 2.4
(uvicorn): a send after the disconnect raises OSError."""


def _caller_leaves_during_a_send(
    response_type: type[StreamingResponse], body: AsyncIterator[bytes], spec: str, stats: EngineStats
) -> int:
    """The response sends its first chunk; the caller goes away while the second one is being sent. The engine's
    active count when the response has returned (read at once, in the loop: the loop's own shutdown would close
    any generator left open)."""

    async def go() -> int:
        sent: list[bytes] = []
        sending = asyncio.Event()

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.body" and message.get("body"):
                sent.append(message["body"])
                if len(sent) == 2:  # the tunnel waits on the gateway's connection here
                    sending.set()
                    if spec == "2.4":
                        raise OSError("the caller went away")
                    await asyncio.Event().wait()

        async def receive() -> dict[str, Any]:
            await sending.wait()
            return {"type": "http.disconnect"}

        scope = {"type": "http", "asgi": {"spec_version": spec}, "method": "POST", "path": "/", "headers": []}
        with contextlib.suppress(ClientDisconnect):
            await asyncio.wait_for(response_type(body)(scope, receive, send), 5)
        assert len(sent) == 2
        return stats.active

    return asyncio.run(go())


@pytest.mark.parametrize("spec", SPECS)
def test_the_generation_is_closed_when_the_caller_leaves_during_a_send(spec: str) -> None:
    stats = EngineStats()
    generation = Generation(stats).run()
    seen: list[str] = []

    async def lines() -> AsyncIterator[bytes]:
        try:
            async for event in generation:
                yield event.text.encode()
        finally:
            seen.append("closed")
            await generation.aclose()

    assert _caller_leaves_during_a_send(node_app._ClosingStream, lines(), spec, stats) == 0
    assert seen == ["closed"]


@pytest.mark.parametrize("spec", SPECS)
def test_starlettes_own_response_leaves_it_open_which_is_why(spec: str) -> None:
    stats = EngineStats()
    generation = Generation(stats).run()
    body = (event.text.encode() async for event in generation)
    assert _caller_leaves_during_a_send(StreamingResponse, body, spec, stats) == 1  # until it is collected


@pytest.mark.parametrize("steps", [None, 0], ids=["engine-without-steps", "engine-with-steps"])
def test_closing_the_nodes_stream_closes_the_engines_generator_under_its_wrappers(steps: int | None) -> None:
    """_stream holds the engine's generator under the wrappers (faults, dishonesty, busy lines): closing it midway
    runs the engine's cleanup, whichever wrapper was waiting."""

    async def go() -> int:
        stats = EngineStats()
        stats.steps = steps
        generation = Generation(stats).run()
        job = GenerateRequest(request_id="r", model="m", prompt="p", sampling=SamplingParams(max_tokens=1000))
        wrapped = node_app._dishonest(generation, node_app.Dishonesty(), job)
        seen = node_app._Observed(node_app.NodeMetrics(), "m")
        receipts: Any = type("R", (), {"line": staticmethod(lambda e: e.text.encode())})()
        engine: Any = type("E", (), {"stats": stats})()
        lines = node_app._stream(None, wrapped, seen, engine, receipts, generation)
        assert [await anext(lines) for _ in range(3)] == [b"x"] * 3 and stats.active == 1
        await lines.aclose()
        return stats.active  # (read in the loop: its shutdown would close what was left open)

    assert asyncio.run(go()) == 0
