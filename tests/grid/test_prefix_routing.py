"""Prefix-aware routing on a real gateway with emulated nodes, through the official OpenAI SDK: a conversation's
later turns go where its earlier turns were prefilled, and the decision says what that saves; with
`--no-prefix-routing` the gateway is blind to it."""

import itertools
from pathlib import Path

from openai import OpenAI
from tests.conftest import API_KEY, admin_get, make_grid

from gridserve.cli.grid import LocalGrid

MODEL = "llama-3-8b"
SYSTEM = "You answer questions about distributed inference precisely and briefly. " * 100  # ~1,800 tokens


def _conversation(grid: LocalGrid, turns: int) -> list[dict[str, object]]:
    """`turns` turns of one chat; each turn's decision record."""
    client = OpenAI(base_url=grid.url + "/v1", api_key=API_KEY, max_retries=0)
    messages: list[dict[str, str]] = [{"role": "system", "content": SYSTEM}]
    decisions = []
    for turn in range(turns):
        messages.append({"role": "user", "content": f"Question {turn}: why route by prefix? " * 4})
        raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=messages, max_tokens=4)  # type: ignore[arg-type]
        reply = raw.parse()
        messages.append({"role": "assistant", "content": reply.choices[0].message.content or ""})
        decision = admin_get(grid, f"/v1/decisions/{raw.headers['x-gridserve-decision']}").json()
        decision["served_by"] = raw.headers["x-gridserve-node"]
        decisions.append(decision)
    return decisions


def test_later_turns_go_where_the_conversation_was_prefilled(tmp_path: Path) -> None:
    grid = make_grid(tmp_path, ["emulated:rtx4090"] * 3, threads=1, extra_node_args=["--model", MODEL])
    try:
        grid.start(timeout_s=120)
        decisions = _conversation(grid, 4)
    finally:
        grid.stop()
    assert not any(c.get("cached_tokens") for c in decisions[0]["candidates"])  # nothing cached yet
    for before, now in itertools.pairwise(decisions):
        hits = {c["node_id"]: c.get("cached_tokens", 0) for c in now["candidates"]}
        assert hits[before["served_by"]] > 1_500, hits  # it holds at least the system prompt and earlier turns
        if "exploration" not in now["picked_by"]:
            # a node that holds the conversation: the last turn's, or one an earlier turn (or a hedge) prefilled too
            assert hits.get(now["chosen"], 0) > 1_500, now["explanation"]
            assert "reuses" in now["explanation"] and "of prefill on" in now["explanation"], now["explanation"]


def test_switched_off_the_gateway_routes_blind_to_prefixes(tmp_path: Path) -> None:
    grid = make_grid(
        tmp_path,
        ["emulated:rtx4090"] * 2,
        threads=1,
        extra_node_args=["--model", MODEL],
        extra_gateway_args=["--no-prefix-routing"],
    )
    try:
        grid.start(timeout_s=120)
        decisions = _conversation(grid, 3)
    finally:
        grid.stop()
    for decision in decisions:
        assert not any(c.get("cached_tokens") for c in decision["candidates"])
        assert "reuses" not in decision["explanation"]
