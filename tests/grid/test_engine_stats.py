"""Engine stats: the token rate over the last 10 s, kept in bounded memory; the upstream engine feeds it."""

import asyncio
import time

import orjson
from aiohttp import web

from gridserve.engines.base import EngineStats
from gridserve.engines.upstream import UpstreamEngine
from gridserve.types import GenerateRequest, SamplingParams


def test_tokens_per_s_counts_the_last_ten_seconds() -> None:
    stats = EngineStats()
    for i in range(100):
        stats.note_tokens(1000.0 + 0.1 * i, 2)  # 20 tokens/s for 10 s
    assert stats.tokens_total == 200
    assert abs(stats.tokens_per_s(1009.9) - 20.0) < 0.3
    assert stats.tokens_per_s(1030.0) == 0.0


def test_recent_tokens_stay_bounded_by_the_window() -> None:
    stats = EngineStats()
    for i in range(100_000):
        stats.note_tokens(1000.0 + 0.001 * i, 1)  # 1000 tokens/s for 100 s
    assert len(stats.recent_tokens) <= 1001
    assert abs(stats.tokens_per_s(1000.0 + 99.999) - 1000.0) < 15.0
    assert stats.tokens_total == 100_000


def test_a_stuck_clock_does_not_grow_the_list() -> None:
    stats = EngineStats()
    for _ in range(10_000):
        stats.note_tokens(0.0, 3)
    assert len(stats.recent_tokens) == 1
    assert stats.tokens_per_s(5.0) == 30_000 / 10.0


CHUNKS = ["Hel", "lo", ", wor", "ld"]


async def _fake_upstream(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
    await resp.prepare(request)
    for text in CHUNKS:
        chunk = {"choices": [{"index": 0, "text": text, "finish_reason": None}]}
        await resp.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
    usage = {"prompt_tokens": 2, "completion_tokens": len(CHUNKS), "total_tokens": 2 + len(CHUNKS)}
    final = {"choices": [{"index": 0, "text": "", "finish_reason": "stop"}], "usage": usage}
    await resp.write(b"data: " + orjson.dumps(final) + b"\n\ndata: [DONE]\n\n")
    return resp


async def _run_upstream() -> EngineStats:
    app = web.Application()
    app.router.add_post("/v1/completions", _fake_upstream)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    engine = UpstreamEngine(url=f"http://127.0.0.1:{port}", served_name="m", upstream_model="m", max_context=512)
    try:
        await engine.start()
        request = GenerateRequest(request_id="r1", model="m", prompt="Hi", sampling=SamplingParams(max_tokens=8))
        events = [e async for e in engine.generate(request)]
        assert "".join(e.text for e in events) == "".join(CHUNKS)
        assert events[-1].completion_tokens == len(CHUNKS)
        return engine.stats
    finally:
        await engine.aclose()
        await runner.cleanup()


def test_upstream_tokens_show_in_the_node_token_rate() -> None:
    stats = asyncio.run(_run_upstream())
    assert stats.tokens_total == len(CHUNKS)
    assert stats.tokens_per_s(time.monotonic()) == len(CHUNKS) / 10.0
    assert stats.active == 0
