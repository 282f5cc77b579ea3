"""The real model through the grid: a greedy answer equals the engine run directly."""

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openai import OpenAI
from pydantic import BaseModel, Field
from tests.conftest import API_KEY, admin_get, make_grid
from tests.json_schemas import bounded_schemas

from gridserve.cli.grid import LocalGrid
from gridserve.engines.gemma import GEMMA_MODEL, ensure_cache, gemma_engine
from gridserve.engines.torch_engine import TorchEngine
from gridserve.types import ChatMessage, GenerateRequest, SamplingParams, TokenEvent
from gridserve.types.wire import ResponseFormat

THREADS = 2  # the node and the direct run use the same thread count: fp32 results are then bitwise equal

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gemma_grid(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalGrid]:
    ensure_cache()
    grid = make_grid(tmp_path_factory.mktemp("gemma"), ["gemma-270m"], threads=THREADS)
    try:
        grid.start(timeout_s=300)
        yield grid
    finally:
        grid.stop()


@pytest.fixture(scope="module")
def direct() -> TorchEngine:
    engine = gemma_engine(threads=THREADS)
    engine.load_sync()
    return engine


def run_direct(engine: TorchEngine, request: GenerateRequest) -> str:
    async def go() -> str:
        return "".join([e.text async for e in engine.generate(request)])

    return asyncio.run(go())


def test_gemma_chat_greedy_equals_direct_engine(gemma_grid: LocalGrid, direct: TorchEngine) -> None:
    question = "What is the capital of France?"
    client = OpenAI(base_url=gemma_grid.url + "/v1", api_key=API_KEY, max_retries=0)
    raw = client.chat.completions.with_raw_response.create(
        model=GEMMA_MODEL, messages=[{"role": "user", "content": question}], max_tokens=20, temperature=0
    )
    reply = raw.parse()
    expected = run_direct(
        direct,
        GenerateRequest(
            request_id="d",
            model=GEMMA_MODEL,
            messages=(ChatMessage(role="user", content=question),),
            sampling=SamplingParams(max_tokens=20, temperature=0.0),
        ),
    )
    assert reply.choices[0].message.content == expected
    assert len(expected.strip()) > 0
    decision = admin_get(gemma_grid, f"/v1/decisions/{raw.headers['x-gridserve-decision']}").json()
    node = next(n for n in gemma_grid.nodes() if n["node_id"] == decision["served_by"])
    assert node["engine"] == "gemma-270m" and node["emulated"] is False
    assert node["models"][0]["weights_digest"].startswith("sha256:")


def test_gemma_completion_stream_equals_direct_engine(gemma_grid: LocalGrid, direct: TorchEngine) -> None:
    prompt = "The three primary colours are"
    client = OpenAI(base_url=gemma_grid.url + "/v1", api_key=API_KEY, max_retries=0)
    chunks = client.completions.create(model=GEMMA_MODEL, prompt=prompt, max_tokens=16, temperature=0, stream=True)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    expected = run_direct(
        direct,
        GenerateRequest(
            request_id="d", model=GEMMA_MODEL, prompt=prompt, sampling=SamplingParams(max_tokens=16, temperature=0.0)
        ),
    )
    assert text == expected and len(text) > 10


class City(BaseModel):
    name: str = Field(max_length=20)
    country: str = Field(max_length=20)
    population: int = Field(ge=0, le=100_000_000)


def test_gemma_structured_output_and_a_tool_call_validate(gemma_grid: LocalGrid) -> None:
    """The real model under a grammar, through the SDK: `parse` returns the pydantic object, greedy and sampled,
    and a required tool call names the tool with valid arguments."""
    client = OpenAI(base_url=gemma_grid.url + "/v1", api_key=API_KEY, max_retries=0, timeout=300)
    for temperature in (0.0, 1.0):
        completion = client.chat.completions.parse(
            model=GEMMA_MODEL,
            messages=[{"role": "user", "content": "Describe Paris as JSON."}],
            response_format=City,
            max_tokens=60,
            temperature=temperature,
            seed=3,
        )
        choice = completion.choices[0]
        assert choice.finish_reason == "stop" and isinstance(choice.message.parsed, City), choice
    params = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 20}},
        "required": ["city"],
        "additionalProperties": False,
    }
    reply = client.chat.completions.create(
        model=GEMMA_MODEL,
        messages=[{"role": "user", "content": "What is the weather in Rome?"}],
        tools=[{"type": "function", "function": {"name": "weather", "parameters": params}}],
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=40,
        temperature=0,
    )
    (call,) = reply.choices[0].message.tool_calls or []
    assert call.function.name == "weather" and reply.choices[0].finish_reason == "tool_calls"
    jsonschema.validate(json.loads(call.function.arguments), params)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)
@given(schema=bounded_schemas, seed=st.integers(0, 2**32), greedy=st.booleans())
def test_every_gemma_answer_under_a_json_schema_validates(
    direct: TorchEngine, schema: dict[str, Any], seed: int, greedy: bool
) -> None:
    """The property the tiny model's unit test checks, on the real model (ten schemas: ~10 tokens/s here)."""
    fmt = ResponseFormat(type="json_schema", schema_text=json.dumps(schema))
    sampling = SamplingParams(max_tokens=200, temperature=0.0 if greedy else 1.0, seed=seed, response_format=fmt)
    messages = (ChatMessage(role="user", content="Answer in JSON."),)
    request = GenerateRequest(request_id=f"json-{seed}", model=GEMMA_MODEL, messages=messages, sampling=sampling)

    async def go() -> list[TokenEvent]:
        return [e async for e in direct.generate(request)]

    events = asyncio.run(go())
    assert events[-1].finish_reason == "stop", "a bounded schema's answer ends by itself"
    jsonschema.validate(json.loads("".join(e.text for e in events)), schema)


def test_cache_is_reused(tmp_path: Path) -> None:
    cache = ensure_cache()
    assert (cache / "model.safetensors").exists() and (cache / "gridserve.json").exists()
    assert ensure_cache() == cache
