"""The official openai SDK against a grid started like `gridserve up` (tiny engine)."""

import asyncio
import json
import socket
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlparse

import httpx
import pytest
from openai import OpenAI
from tests.conftest import API_KEY, admin_get

from gridserve.cli.grid import LocalGrid
from gridserve.engines.tiny import TINY_MODEL, tiny_engine
from gridserve.types import ChatMessage, GenerateRequest, SamplingParams


@pytest.fixture(scope="module")
def client(tiny_grid: LocalGrid) -> OpenAI:
    return OpenAI(base_url=tiny_grid.url + "/v1", api_key=API_KEY, max_retries=0)


def engine_output(
    *, prompt: str | None = None, messages: list[dict[str, str]] | None = None, **sampling: object
) -> str:
    """What the tiny engine itself produces, run directly in this process."""

    async def run() -> str:
        engine = tiny_engine(threads=1)
        await engine.start()
        request = GenerateRequest(
            request_id="direct",
            model=TINY_MODEL,
            prompt=prompt,
            messages=tuple(ChatMessage(**m) for m in messages) if messages else None,
            sampling=SamplingParams(**sampling),  # type: ignore[arg-type]
        )
        return "".join([event.text async for event in engine.generate(request)])

    return asyncio.run(run())


def test_models_list_names_live_models(client: OpenAI) -> None:
    models = {m.id: m for m in client.models.list().data}
    assert set(models) == {TINY_MODEL, "llama-3-8b"}
    assert models["llama-3-8b"].model_extra and models["llama-3-8b"].model_extra["emulated"] is True
    assert models[TINY_MODEL].model_extra and models[TINY_MODEL].model_extra["emulated"] is False


def test_chat_non_stream_equals_engine_greedy(client: OpenAI) -> None:
    messages = [{"role": "user", "content": "Tell me about grids."}]
    reply = client.chat.completions.create(model=TINY_MODEL, messages=messages, max_tokens=24, temperature=0)  # type: ignore[arg-type]
    expected = engine_output(messages=messages, max_tokens=24, temperature=0.0)
    assert reply.choices[0].message.content == expected
    assert reply.choices[0].finish_reason in ("length", "stop")
    assert reply.usage is not None and reply.usage.completion_tokens <= 24 and reply.usage.prompt_tokens > 0


def test_chat_stream_equals_engine_greedy_with_usage(client: OpenAI) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    stream = client.chat.completions.create(
        model=TINY_MODEL,
        messages=messages,
        max_tokens=20,
        temperature=0,
        stream=True,  # type: ignore[arg-type]
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == engine_output(messages=messages, max_tokens=20, temperature=0.0)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 20


def test_chat_stream_with_continuous_usage_counts_up_in_every_chunk(client: OpenAI) -> None:
    """vLLM's `continuous_usage_stats` (benchmark clients send it): every chunk carries the usage so far."""
    stream = client.chat.completions.create(
        model=TINY_MODEL,
        messages=[{"role": "user", "content": "Count with me"}],
        max_tokens=12,
        temperature=0,
        stream=True,  # type: ignore[arg-type]
        stream_options={"include_usage": True, "continuous_usage_stats": True},  # type: ignore[typeddict-unknown-key]
    )
    chunks = list(stream)
    counts = [c.usage.completion_tokens for c in chunks if c.usage is not None]
    assert len(counts) == len(chunks) and counts[0] == 0 and counts[-1] == 12
    assert counts == sorted(counts) and len(set(counts)) >= 12  # one more with (nearly) every token
    last = chunks[-1].usage
    assert last is not None and last.total_tokens == last.prompt_tokens + 12 and last.prompt_tokens > 0
    assert chunks[-1].choices == []
    assert any(c.choices and c.choices[0].finish_reason == "length" for c in chunks)


def test_completions_stream_and_non_stream_agree(client: OpenAI) -> None:
    prompt = "The grid serves"
    whole = client.completions.create(model=TINY_MODEL, prompt=prompt, max_tokens=16, temperature=0)
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(model=TINY_MODEL, prompt=prompt, max_tokens=16, temperature=0, stream=True)
        if c.choices
    )
    expected = engine_output(prompt=prompt, max_tokens=16, temperature=0.0)
    assert whole.choices[0].text == expected == streamed


def test_a_streams_head_arrives_with_its_first_chunk(tiny_grid: LocalGrid) -> None:
    """The gateway writes a stream's status line and headers together with its first chunk (one write on
    127.0.0.1 arrives whole): the first read after the request holds both."""
    url = urlparse(tiny_grid.url)
    body = json.dumps({"model": TINY_MODEL, "prompt": "The grid", "max_tokens": 4, "stream": True}).encode()
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: {url.netloc}\r\nAuthorization: Bearer {API_KEY}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    with socket.create_connection((url.hostname, url.port), timeout=30) as conn:
        conn.sendall(head.encode() + body)
        first = conn.recv(65536)
    assert first.startswith(b"HTTP/1.1 200 OK\r\n"), first[:200]
    assert b"transfer-encoding: chunked" in first.lower()
    assert b'data: {"id":"cmpl-' in first, first  # the first chunk, in the same read as the head


def test_seeded_sampling_is_reproducible_through_the_gateway(client: OpenAI) -> None:
    args = {"model": TINY_MODEL, "prompt": "seeded", "max_tokens": 16, "temperature": 0.9, "seed": 7}
    first = client.completions.create(**args).choices[0].text  # type: ignore[call-overload]
    second = client.completions.create(**args).choices[0].text  # type: ignore[call-overload]
    assert first == second == engine_output(prompt="seeded", max_tokens=16, temperature=0.9, seed=7)


def test_stop_sequence_cuts_output(client: OpenAI) -> None:
    full = engine_output(prompt="stop test", max_tokens=30, temperature=0.0)
    stop = full[5:7]
    reply = client.completions.create(model=TINY_MODEL, prompt="stop test", max_tokens=30, temperature=0, stop=[stop])
    assert reply.choices[0].text == full[: full.index(stop)]
    assert reply.choices[0].finish_reason == "stop"


def test_decision_header_and_lookup_name_the_serving_node(client: OpenAI, tiny_grid: LocalGrid) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model=TINY_MODEL, messages=[{"role": "user", "content": "which node?"}], max_tokens=4, temperature=0
    )
    decision_id = raw.headers["x-gridserve-decision"]
    node_header = raw.headers["x-gridserve-node"]
    decision = admin_get(tiny_grid, f"/v1/decisions/{decision_id}").json()
    assert decision["decision_id"] == decision_id
    assert decision["served_by"] == node_header == decision["chosen"]
    assert decision["status"] == "ok"
    tiny_nodes = {n["node_id"] for n in tiny_grid.nodes() if n["engine"] == "tiny"}
    assert decision["served_by"] in tiny_nodes
    assert {c["node_id"] for c in decision["candidates"]} == tiny_nodes
    assert any("does not serve gridserve-tiny" in r["reason"] for r in decision["rejections"])


def test_decisions_need_the_admin_token(tiny_grid: LocalGrid) -> None:
    resp = httpx.get(tiny_grid.url + "/v1/decisions/dec_x", headers={"Authorization": f"Bearer {API_KEY}"})
    assert resp.status_code == 401 and resp.json()["error"]["code"] == "invalid_api_key"
    assert admin_get(tiny_grid, "/v1/decisions/dec_missing").status_code == 404


def test_emulated_node_is_marked_and_serves_catalogue_model(client: OpenAI, tiny_grid: LocalGrid) -> None:
    reply = client.chat.completions.create(
        model="llama-3-8b", messages=[{"role": "user", "content": "hi"}], max_tokens=5, temperature=0
    )
    assert reply.choices[0].message.content is not None
    emulated = [n for n in tiny_grid.nodes() if n["emulated"]]
    assert len(emulated) == 1
    assert emulated[0]["hardware"]["accelerator"] == "rtx4090" and emulated[0]["hardware"]["emulated"] is True
    assert emulated[0]["models"][0]["quantization"] == "none" and emulated[0]["models"][0]["dtype"] == "float16"


def test_concurrent_load_spreads_over_nodes(client: OpenAI, tiny_grid: LocalGrid) -> None:
    """Requests in flight count against a node (load scorer): concurrent requests use both tiny nodes."""

    def one(i: int) -> str:
        raw = client.completions.with_raw_response.create(
            model=TINY_MODEL, prompt=f"p{i}", max_tokens=64, temperature=0
        )
        return raw.headers["x-gridserve-node"]

    with ThreadPoolExecutor(max_workers=6) as pool:
        served = set(pool.map(one, range(12)))
    assert len(served) == 2


def test_node_table_shows_capability_and_telemetry(tiny_grid: LocalGrid) -> None:
    nodes = admin_get(tiny_grid, "/admin/nodes").json()["nodes"]
    assert len(nodes) == 3
    for node in nodes:
        assert node["state"] == "up"
        assert node["runtime"]["python"].startswith("3.")
        if not node["emulated"]:
            assert node["hardware"]["cpu_cores"] >= 1 and node["hardware"]["ram_bytes"] > 0
    assert all(n["telemetry"] is not None for n in nodes)
