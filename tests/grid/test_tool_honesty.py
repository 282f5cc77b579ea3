"""Tool calls are checked like tokens: a node that corrupts tool-call arguments (`corrupt_tool_args`, honest
otherwise) is caught on its first calling answer, explained and quarantined; an honest node's calling answers all
pass their audits (audit rate 1) with no accusation."""

import time
from collections.abc import Iterator
from typing import Any

import pytest
from openai import OpenAI
from tests.conftest import API_KEY, admin_get, make_grid

from gridserve.cli.grid import LocalGrid
from gridserve.engines.tiny import TINY_MODEL

ADD: Any = [
    {
        "type": "function",
        "function": {
            "name": "add",
            "parameters": {
                "type": "object",
                "properties": {
                    "a": {"type": "integer", "minimum": 0, "maximum": 999},
                    "b": {"type": "integer", "minimum": 0, "maximum": 999},
                },
                "required": ["a", "b"],
                "additionalProperties": False,
            },
        },
    }
]
CORRUPT, HONEST = 0, 1


@pytest.fixture(scope="module")
def grid(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalGrid]:
    gateway = ["--audit-rate", "1", "--canary-interval", "0", "--vetting-checks", "0"]
    grid = make_grid(tmp_path_factory.mktemp("tools"), ["tiny"] * 2, threads=1, extra_gateway_args=gateway)
    try:
        grid.start_gateway()
        grid.start_node(CORRUPT, "tiny", ["--allow-dishonest", "--dishonest", "corrupt_tool_args"])
        grid.wait_nodes(1, 120)
        yield grid
    finally:
        grid.stop()


def _client(grid: LocalGrid) -> OpenAI:
    return OpenAI(base_url=grid.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


def _call(client: OpenAI, i: int) -> Any:
    return client.chat.completions.with_raw_response.create(
        model=TINY_MODEL,
        messages=[{"role": "user", "content": f"Add {i} and {i + 1}."}],
        tools=ADD,
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=80,
        seed=i,
        extra_body={"gridserve": {"hedge": False}},
    )


def test_a_node_corrupting_tool_arguments_is_caught_explained_and_quarantined(grid: LocalGrid) -> None:
    (node,) = grid.nodes()
    raw = _call(_client(grid), 0)
    answer = raw.parse().choices[0]
    assert raw.headers["x-gridserve-node"] == node["node_id"]
    assert answer.message.tool_calls is None and "x" in (answer.message.content or ""), (
        "the client is not handed an invalid call"
    )
    incidents = admin_get(grid, f"/admin/incidents?node_id={node['node_id']}").json()["incidents"]
    assert incidents and incidents[0]["severity"] == "severe", incidents
    assert "tool call outside its grammar" in incidents[0]["detail"], incidents
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _reliability(grid, node["node_id"]) != "quarantined":
        time.sleep(0.2)
    assert _reliability(grid, node["node_id"]) == "quarantined"
    # its re-execution fails too, and is counted before the next test takes its baseline
    request_id = raw.parse().id
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not _audits_of(grid, request_id):
        time.sleep(0.2)
    audits = _audits_of(grid, request_id)
    assert [bool(a["problems"]) for a in audits] == [True], audits


def test_an_honest_nodes_calls_pass_every_audit(grid: LocalGrid) -> None:
    grid.start_node(HONEST, "tiny")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len([n for n in grid.nodes() if n["state"] == "up"]) < 2:
        time.sleep(0.3)
    client = _client(grid)
    before = admin_get(grid, "/admin/audits").json()
    ids = []
    for i in range(1, 25):
        raw = _call(client, i)
        choice = raw.parse().choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.tool_calls, choice
        ids.append(raw.parse().id)
    honest = {raw.headers["x-gridserve-node"]}
    # every answer audited (by the counts: the admin view lists only the last 20 audits), none failed
    deadline = time.monotonic() + 120
    summary = admin_get(grid, "/admin/audits").json()
    while time.monotonic() < deadline and summary["audited"] - before["audited"] < len(ids):
        time.sleep(0.2)
        summary = admin_get(grid, "/admin/audits").json()
    assert (summary["audited"] - before["audited"], summary["failed"] - before["failed"]) == (len(ids), 0), summary
    assert all(not r["problems"] for r in summary["recent"] if r["request_id"] in ids), summary["recent"]
    for node_id in honest:
        assert admin_get(grid, f"/admin/incidents?node_id={node_id}").json()["incidents"] == []


def _audits_of(grid: LocalGrid, request_id: str) -> list[dict[str, Any]]:
    return [r for r in admin_get(grid, "/admin/audits").json()["recent"] if r["request_id"] == request_id]


def _reliability(grid: LocalGrid, node_id: str) -> str:
    node = next(n for n in grid.nodes() if n["node_id"] == node_id)
    return str((node.get("reliability") or {}).get("state", ""))
