"""The scheduler end to end on grids of emulated nodes of different hardware classes."""

import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai import OpenAI
from tests.conftest import ADMIN, API_KEY, admin_get, make_grid

from gridserve.cli.grid import LocalGrid


def node_by_port(grid: LocalGrid, index: int) -> dict[str, Any]:
    return next(n for n in grid.nodes() if n["endpoint"].endswith(f":{grid.node_port(index)}"))


def admin_post(grid: LocalGrid, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(grid.url + path, json=body, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=10)


def start(tmp: Path, nodes: list[tuple[str, list[str]]]) -> LocalGrid:
    grid = make_grid(tmp, [engine for engine, _ in nodes], threads=1)
    grid.start_gateway()
    for i, (engine, extra) in enumerate(nodes):
        grid.start_node(i, engine, extra)
    grid.wait_nodes(len(nodes), 120)
    return grid


@pytest.fixture
def big_model_grid(tmp_path: Path) -> Iterator[LocalGrid]:
    model = ["--model", "llama-3-70b"]
    grid = start(
        tmp_path,
        [
            ("emulated:rtx4090", model),
            ("emulated:rtx3090", model),
            ("emulated:h100-sxm", model),
            ("emulated:a100-80g", model),
        ],
    )
    try:
        yield grid
    finally:
        grid.stop()


def test_model_too_large_for_consumer_cards_lands_only_where_it_fits(big_model_grid: LocalGrid) -> None:
    grid = big_model_grid
    client = OpenAI(base_url=grid.url + "/v1", api_key=API_KEY, max_retries=0)
    consumer = {node_by_port(grid, 0)["node_id"], node_by_port(grid, 1)["node_id"]}
    fits = {node_by_port(grid, 2)["node_id"], node_by_port(grid, 3)["node_id"]}
    served = Counter()
    for i in range(10):
        raw = client.chat.completions.with_raw_response.create(
            model="llama-3-70b", messages=[{"role": "user", "content": f"q{i}"}], max_tokens=4
        )
        served[raw.headers["x-gridserve-node"]] += 1
    assert set(served) <= fits and sum(served.values()) == 10
    decision = admin_get(grid, f"/v1/decisions/{raw.headers['x-gridserve-decision']}").json()
    rejected = {v["node_id"]: v for v in decision["nodes"] if not v["eligible"]}
    assert set(rejected) == consumer
    for verdict in rejected.values():
        assert verdict["filter"] == "memory-fit"
        assert "needs" in verdict["reason"] and "has 24.0 GiB" in verdict["reason"]
    assert {c["node_id"] for c in decision["candidates"]} == fits
    assert decision["requirements"]["model"] == "llama-3-70b"


def test_explain_renders_a_decision(big_model_grid: LocalGrid) -> None:
    client = OpenAI(base_url=big_model_grid.url + "/v1", api_key=API_KEY, max_retries=0)
    reply = client.chat.completions.create(
        model="llama-3-70b",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=2,
        extra_body={"gridserve": {"explain": True}},
    )
    inline = reply.model_extra["gridserve"]  # type: ignore[index]
    assert inline["eligible"] == 2 and inline["rejected"] == 2 and inline["price_per_mtok"] > 0
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "gridserve",
            "explain",
            inline["decision_id"],
            "--gateway",
            big_model_grid.url,
            "--admin-token",
            ADMIN,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    for needle in ("requirements", "every node", "eligible nodes", "memory-fit", "reliability", "latency", "margin"):
        assert needle in out.stdout


def test_unknown_tier_is_400(big_model_grid: LocalGrid) -> None:
    resp = httpx.post(
        big_model_grid.url + "/v1/completions",
        headers={"Authorization": f"Bearer {API_KEY}"},
        json={"model": "llama-3-70b", "prompt": "x", "gridserve": {"tier": "platinum"}},
        timeout=10,
    )
    assert resp.status_code == 400 and "platinum" in resp.json()["error"]["message"]


def test_price_ceiling_rejects_expensive_nodes(big_model_grid: LocalGrid) -> None:
    client = OpenAI(base_url=big_model_grid.url + "/v1", api_key=API_KEY, max_retries=0)
    with pytest.raises(Exception) as info:
        client.completions.create(
            model="llama-3-70b", prompt="x", max_tokens=2, extra_body={"gridserve": {"max_price_per_mtok": 0.0001}}
        )
    assert "price-ceiling" in str(info.value) or "ceiling" in str(info.value)


def test_silently_throttled_node_loses_traffic_once_observed(tmp_path: Path) -> None:
    model = ["--model", "llama-3-8b"]
    grid = start(tmp_path, [("emulated:h100-sxm", model), ("emulated:h100-sxm", [*model, "--slowdown", "4"])])
    try:
        client = OpenAI(base_url=grid.url + "/v1", api_key=API_KEY, max_retries=0)
        slow = node_by_port(grid, 1)["node_id"]

        def one(i: int) -> tuple[str, str]:
            """The node the scheduler chose for request `i` (a late first token may hand it to a hedge), and why."""
            raw = client.completions.with_raw_response.create(
                model="llama-3-8b",
                prompt=f"req {i}",
                max_tokens=16,
                extra_body={"ignore_eos": True, "gridserve": {"tier": "interactive"}},
            )  # 16 tokens each, so every answer shows its node's inter-token latency (a sampled answer may end at 1)
            decision = admin_get(grid, f"/v1/decisions/{raw.headers['x-gridserve-decision']}").json()
            return decision["chosen"], decision["picked_by"]

        # Phase 1: pairs of concurrent requests, so load spreads and both nodes are observed.
        with ThreadPoolExecutor(max_workers=2) as pool:
            early = [node for pair in range(8) for node, _ in pool.map(one, (2 * pair, 2 * pair + 1))]
        assert slow in early
        # Phase 2: one request at a time; the slow node, now calibrated, never wins on its score. It is still
        # explored now and then (its record is short: p = 0.05 a request), which a bound on all its requests
        # counted as losing (4 of 20 explorations happen in 1.6% of runs: a fresh clone's run failed so): more than
        # 7 explorations of 20 has a probability of ~3e-6.
        late = [one(100 + i) for i in range(20)]
        assert all(why.startswith("exploration") for node, why in late if node == slow), late
        assert sum(node == slow for node, _ in late) <= 7, late
        calibration = node_by_port(grid, 1)["calibration"]
        assert calibration["samples"] >= 1 and calibration["itl_factor"] > 2.5
        assert node_by_port(grid, 0)["calibration"]["itl_factor"] < 1.5
    finally:
        grid.stop()


def test_quarantined_node_gets_nothing_until_released(tmp_path: Path) -> None:
    model = ["--model", "llama-3-8b"]
    grid = start(tmp_path, [("emulated:h100-sxm", model), ("emulated:h100-sxm", model)])
    try:
        client = OpenAI(base_url=grid.url + "/v1", api_key=API_KEY, max_retries=0)
        target = node_by_port(grid, 0)["node_id"]
        resp = admin_post(grid, f"/admin/nodes/{target}/quarantine", {"reason": "suspected wrong weights"})
        assert resp.status_code == 200 and resp.json()["state"] == "quarantined"
        for i in range(10):
            raw = client.completions.with_raw_response.create(model="llama-3-8b", prompt=f"q{i}", max_tokens=2)
            assert raw.headers["x-gridserve-node"] != target
        decision = admin_get(grid, f"/v1/decisions/{raw.headers['x-gridserve-decision']}").json()
        verdict = next(v for v in decision["nodes"] if v["node_id"] == target)
        assert verdict["filter"] == "node-state" and "quarantined" in verdict["reason"]
        assert "suspected wrong weights" in verdict["reason"]
        incidents = admin_get(grid, "/admin/incidents").json()
        assert any(t["node_id"] == target and t["new"] == "quarantined" for t in incidents["transitions"])

        resp = admin_post(grid, f"/admin/nodes/{target}/release", {"reason": "weights re-verified"})
        assert resp.status_code == 200 and resp.json()["state"] == "probation"
        raw = client.completions.with_raw_response.create(model="llama-3-8b", prompt="after", max_tokens=2)
        decision = admin_get(grid, f"/v1/decisions/{raw.headers['x-gridserve-decision']}").json()
        assert next(v for v in decision["nodes"] if v["node_id"] == target)["eligible"] is True

        # A severe incident quarantines at once; a second one bans for good (release is refused).
        other = node_by_port(grid, 1)["node_id"]
        for _ in range(2):
            resp = admin_post(
                grid, f"/admin/nodes/{other}/incident", {"reason": "output mismatch", "severity": "severe"}
            )
            assert resp.status_code == 200
        assert resp.json()["state"] == "banned"
        refused = admin_post(grid, f"/admin/nodes/{other}/release", {"reason": "please"})
        assert refused.status_code == 409 and refused.json()["error"]["code"] == "banned"
        assert admin_post(grid, "/admin/nodes/nobody/quarantine", {"reason": "x"}).status_code == 404
        assert admin_post(grid, f"/admin/nodes/{target}/quarantine", {}).status_code == 400
    finally:
        grid.stop()


def test_quarantine_survives_a_gateway_restart(tmp_path: Path) -> None:
    """The reliability ledger lives in the store: a restarted gateway replays it, so a quarantined node stays out."""
    model = ["--model", "llama-3-8b"]
    grid = start(tmp_path, [("emulated:h100-sxm", model), ("emulated:h100-sxm", model)])
    try:
        target = node_by_port(grid, 0)["node_id"]
        assert admin_post(grid, f"/admin/nodes/{target}/quarantine", {"reason": "audit mismatch"}).status_code == 200
        gateway = grid.procs["gateway"]
        gateway.terminate()
        assert gateway.wait(timeout=20) in (0, -15)  # uvicorn re-raises SIGTERM after a graceful shutdown
        grid.start_gateway()
        grid.wait_nodes(2, 60)  # nodes notice (heartbeat answered 404) and register again
        client = OpenAI(base_url=grid.url + "/v1", api_key=API_KEY, max_retries=0)
        for i in range(6):
            raw = client.completions.with_raw_response.create(model="llama-3-8b", prompt=f"r{i}", max_tokens=2)
            assert raw.headers["x-gridserve-node"] != target
        decision = admin_get(grid, f"/v1/decisions/{raw.headers['x-gridserve-decision']}").json()
        verdict = next(v for v in decision["nodes"] if v["node_id"] == target)
        assert "quarantined" in verdict["reason"] and "audit mismatch" in verdict["reason"]
    finally:
        grid.stop()
