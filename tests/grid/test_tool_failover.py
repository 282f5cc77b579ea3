"""A node killed (kill -9) in the middle of a streamed tool call: another node continues it token-exact (its
grammar is past the tokens already made) and the client receives one complete, valid call, the same as an
uninterrupted run's."""

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
from openai import OpenAI
from tests.conftest import ADMIN, API_KEY, make_grid, streamed_calls

from gridserve.cli.grid import LocalGrid

MODEL = "llama-3-8b"
SLOW = ["--fixed-ttft-ms", "40", "--fixed-itl-ms", "60"]
PARAMS = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 16},
        "days": {"type": "integer", "minimum": 1, "maximum": 14},
    },
    "required": ["city", "days"],
    "additionalProperties": False,
}
TOOLS: Any = [{"type": "function", "function": {"name": "forecast", "parameters": PARAMS}}]
ASK: Any = [{"role": "user", "content": "Forecast for Lyon?"}]


@pytest.fixture
def grid(tmp_path: Path) -> Iterator[LocalGrid]:
    grid = make_grid(tmp_path, ["emulated:rtx4090"] * 2, threads=1, extra_node_args=SLOW)
    try:
        grid.start(timeout_s=120)
        yield grid
    finally:
        grid.stop()


def _client(grid: LocalGrid) -> OpenAI:
    return OpenAI(base_url=grid.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


def _ask(client: OpenAI, **more: Any) -> Any:
    return client.chat.completions.with_raw_response.create(
        model=MODEL,
        messages=ASK,
        tools=TOOLS,
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=120,
        temperature=0,
        **more,
    )


def test_a_node_killed_mid_tool_call_the_client_gets_one_complete_valid_call(grid: LocalGrid) -> None:
    reference = _ask(_client(grid)).parse().choices[0].message.tool_calls
    assert reference and len(reference) == 1
    got: dict[str, Any] = {}

    def stream() -> None:
        try:
            raw = _ask(_client(grid), stream=True)
            got["node"], got["decision"] = raw.headers["x-gridserve-node"], raw.headers["x-gridserve-decision"]
            got["chunks"] = list(raw.parse())
        except BaseException as exc:  # reported below
            got["error"] = exc

    reader = threading.Thread(target=stream, daemon=True)
    reader.start()
    deadline = time.monotonic() + 30
    while "node" not in got and "error" not in got and time.monotonic() < deadline:
        time.sleep(0.01)
    assert "node" in got, got
    time.sleep(0.6)  # about ten of the call's ~40 tokens made (60 ms each)
    index = next(
        i
        for i in range(2)
        if any(n["node_id"] == got["node"] and n["endpoint"].endswith(f":{grid.node_port(i)}") for n in grid.nodes())
    )
    victim = grid.procs[f"node-{index}"]
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    reader.join(60)
    assert "error" not in got, got.get("error")
    chunks = got["chunks"]
    calls = streamed_calls(chunks)
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert reasons == ["tool_calls"] and len(calls) == 1, chunks
    (call,) = calls
    assert (call.function.name, call.function.arguments) == (
        reference[0].function.name,
        reference[0].function.arguments,
    )
    jsonschema.validate(json.loads(call.function.arguments), PARAMS)
    decision = httpx.get(
        f"{grid.url}/v1/decisions/{got['decision']}", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=10
    ).json()
    assert decision["failovers"] >= 1 and decision["route"][0]["outcome"] == "failed", decision["route"]
    assert decision["route"][-1]["resumed_from"] > 0, decision["route"]
