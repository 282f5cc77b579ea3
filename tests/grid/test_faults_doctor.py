"""Fault injection on real nodes, and the latency doctor naming each fault's cause.

Each node emulates a different card, so requests can be aimed at one node with `gridserve.engines`.
"""

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI
from tests.conftest import ADMIN, API_KEY, admin_get, make_grid

from gridserve.cli.grid import LocalGrid

MODEL = "llama-3-8b"
CARDS = ["rtx4090", "a100-80g", "l40s", "h100-sxm", "rtx3090", "t4"]
FAULTS: dict[str, dict[str, Any]] = {
    "a100-80g": {"delay_ms": 300},
    "l40s": {"slow_decode_factor": 5},
    "h100-sxm": {"memory_pressure": 0.95},
    "rtx3090": {"thermal": True},
    "t4": {"error_burst": 1000, "error_message": "CUDA error: an illegal memory access was encountered"},
}
EXPECTED = {
    "rtx4090": "healthy",
    "a100-80g": "network",
    "l40s": "compute_saturation",
    "h100-sxm": "memory_pressure",
    "rtx3090": "thermal_throttling",
    "t4": "node_failure",
}


@pytest.fixture(scope="module")
def fault_grid(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalGrid]:
    grid = make_grid(
        tmp_path_factory.mktemp("faults"),
        [f"emulated:{c}" for c in CARDS],
        threads=1,
        heartbeat_interval_s=1.0,
        extra_node_args=["--allow-faults"],
    )
    try:
        grid.start(timeout_s=180)
        yield grid
    finally:
        grid.stop()


def _nodes(grid: LocalGrid) -> dict[str, dict[str, Any]]:
    return {n["engine"].split(":")[1]: n for n in grid.nodes()}


def _aimed(client: OpenAI, card: str, i: int, tokens: int = 12) -> str | None:
    """A streamed request that only `card` may serve; returns the error text if it failed."""
    try:
        stream = client.completions.create(
            model=MODEL,
            prompt=f"doctor any {i}",
            max_tokens=tokens,
            temperature=0,
            stream=True,
            extra_body={"gridserve": {"engines": [f"emulated:{card}"], "hedge": False}},
        )
        for chunk in stream:
            for choice in chunk.choices:
                if choice.finish_reason is None and not choice.text:
                    continue
        return None
    except openai.APIError as exc:
        return str(exc)


def _long_answers(client: OpenAI, card: str, count: int) -> list[int]:
    """Prompt numbers whose 12-token answer on `card` runs to the limit (emulated nodes share the text model)."""
    found: list[int] = []
    for i in range(100, 160):
        resp = client.completions.create(
            model=MODEL,
            prompt=f"doctor any {i}",
            max_tokens=12,
            temperature=0,  # greedy: the same answer when asked again
            extra_body={"gridserve": {"engines": [f"emulated:{card}"], "hedge": False}},
        )
        if resp.choices[0].finish_reason == "length":
            found.append(i)
            if len(found) == count:
                return found
    raise AssertionError("no long answers")


def _doctor(grid: LocalGrid) -> dict[str, dict[str, Any]]:
    report = admin_get(grid, "/admin/doctor?window_s=300").json()
    return {n["node_id"]: n for n in report["nodes"]}


def test_fault_injection_is_refused_unless_enabled(tiny_grid: LocalGrid) -> None:
    endpoint = tiny_grid.nodes()[0]["endpoint"]
    resp = httpx.post(endpoint + "/faults", json={"delay_ms": 100}, timeout=5)
    assert resp.status_code == 403 and "--allow-faults" in resp.json()["error"]["message"]


def test_bad_fault_is_a_clear_400(fault_grid: LocalGrid) -> None:
    endpoint = _nodes(fault_grid)["rtx4090"]["endpoint"]
    resp = httpx.post(endpoint + "/faults", json={"slow_decode_factor": 0.5}, timeout=5)
    assert resp.status_code == 400 and "slow_decode_factor" in resp.json()["error"]["message"]
    resp = httpx.post(endpoint + "/faults", json={"explode": True}, timeout=5)
    assert resp.status_code == 400 and "explode" in resp.json()["error"]["message"]


def test_each_injected_fault_is_diagnosed_as_its_cause(fault_grid: LocalGrid) -> None:
    grid = fault_grid
    nodes = _nodes(grid)
    for card, fault in FAULTS.items():
        httpx.post(nodes[card]["endpoint"] + "/faults", json=fault, timeout=5).raise_for_status()
    client = OpenAI(base_url=grid.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)
    errors: dict[str, list[str | None]] = {card: [_aimed(client, card, i) for i in range(5)] for card in CARDS}
    assert all(e is None for card in CARDS if card != "t4" for e in errors[card]), errors
    assert all(e is not None for e in errors["t4"])  # only the failing node may serve them, and it fails
    time.sleep(2.5)  # a heartbeat or two carries the faulted telemetry and error logs
    report = _doctor(grid)
    verdicts = {card: report[nodes[card]["node_id"]]["diagnosis"] for card in CARDS}
    assert {card: v["cause"] for card, v in verdicts.items()} == EXPECTED, verdicts
    assert any("probe RTT" in e for e in verdicts["a100-80g"]["evidence"])
    assert any("x the baseline" in e for e in verdicts["l40s"]["evidence"])
    assert any("95% used" in e for e in verdicts["h100-sxm"]["evidence"])
    assert any("92 C" in e for e in verdicts["rtx3090"]["evidence"])
    assert any("illegal memory access" in e for e in verdicts["t4"]["evidence"])
    assert all(v["next_check"] for v in verdicts.values())
    split = report[nodes["a100-80g"]["node_id"]]["requests"][-1]
    assert split["network_s"] > 0.25 and split["prefill_s"] < 0.25  # the time split names the network
    assert report[nodes["a100-80g"]["node_id"]]["telemetry"]["faults"] == ["delay_ms=300.0"]


def test_stall_and_crash_are_node_failures(fault_grid: LocalGrid) -> None:
    grid = fault_grid
    nodes = _nodes(grid)
    for card in ("l40s", "rtx3090"):
        httpx.delete(nodes[card]["endpoint"] + "/faults", timeout=5).raise_for_status()
    client = OpenAI(base_url=grid.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)
    long = _long_answers(client, "l40s", 3)  # prompts whose answers outlive 3 tokens (the text model may stop early)
    httpx.post(nodes["l40s"]["endpoint"] + "/faults", json={"stall_after_tokens": 3}, timeout=5).raise_for_status()
    httpx.post(nodes["rtx3090"]["endpoint"] + "/faults", json={"crash_after_tokens": 3}, timeout=5).raise_for_status()
    # together: a stream no other node may take over waits 30 s for its stalled node (stall_unresumable_s)
    with ThreadPoolExecutor(3) as pool:
        aimed = [
            pool.submit(_aimed, client, card, i) for card, i in zip(("l40s", "l40s", "rtx3090"), long, strict=True)
        ]
        *stalled, crashed = [f.result() for f in aimed]
    assert all(e is not None for e in stalled) and crashed is not None
    time.sleep(1.0)
    report = _doctor(grid)
    for card, needle in (("l40s", "stalled"), ("rtx3090", "")):
        diagnosis = report[nodes[card]["node_id"]]["diagnosis"]
        assert diagnosis["cause"] == "node_failure", diagnosis
        assert needle in " ".join(diagnosis["evidence"])
    assert "down" in " ".join(report[nodes["rtx3090"]["node_id"]]["diagnosis"]["evidence"])


def test_doctor_cli_prints_verdicts(fault_grid: LocalGrid) -> None:
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "gridserve", "doctor", "--gateway", fault_grid.url, "--admin-token", ADMIN],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert "latency doctor" in out.stdout and "next:" in out.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "gridserve", "doctor", "--gateway", fault_grid.url, "--admin-token", "wrong"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and "401" in bad.stderr and "Traceback" not in bad.stderr
