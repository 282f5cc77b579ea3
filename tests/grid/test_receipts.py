"""Signed receipts, settlement and attestation: honest nodes settle cleanly; each receipt-level cheat is caught,
explained and quarantined; a node offering unattested weights cannot register."""

import contextlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI
from tests.conftest import ADMIN, API_KEY, admin_get, make_grid

from gridserve.cli.grid import LocalGrid
from gridserve.engines.tiny import TINY_MODEL

MODEL = "llama-3-8b"
CHEATS = {"a100-80g": "inflate_tokens", "l40s": "replay_receipt", "h100-sxm": "spoof_identity", "rtx3090": "truncate"}
EVIDENCE = {
    "inflate_tokens": "settlement: receipt claims",
    "replay_receipt": "identity: receipt refused: replayed",
    "spoof_identity": "identity: receipt refused: wrong_signer",
    "truncate": "integrity: truncated",
}


@pytest.fixture(scope="module")
def cheat_grid(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalGrid]:
    grid = make_grid(tmp_path_factory.mktemp("cheats"), ["emulated:rtx4090", *(f"emulated:{c}" for c in CHEATS)])
    fixed = ["--fixed-ttft-ms", "20", "--fixed-itl-ms", "5"]
    try:
        grid.start_gateway()
        grid.start_node(0, "emulated:rtx4090", fixed)
        for i, (card, mode) in enumerate(CHEATS.items(), start=1):
            grid.start_node(i, f"emulated:{card}", [*fixed, "--allow-dishonest", "--dishonest", mode])
        grid.wait_nodes(len(CHEATS) + 1, 120)
        yield grid
    finally:
        grid.stop()


def _client(grid: LocalGrid) -> OpenAI:
    return OpenAI(base_url=grid.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


def _ask(client: OpenAI, card: str, prompt: str, stream: bool = False) -> Any:
    extra = {"gridserve": {"engines": [f"emulated:{card}"], "hedge": False}}
    if stream:
        return "".join(
            c.choices[0].text
            for c in client.completions.create(
                model=MODEL, prompt=prompt, max_tokens=12, temperature=0, stream=True, extra_body=extra
            )
            if c.choices
        )
    return client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0, extra_body=extra)


def _long_prompts(client: OpenAI, count: int) -> list[str]:
    """Prompts whose greedy 12-token answer runs to the limit (so a truncation is visible)."""
    found = []
    for i in range(60):
        prompt = f"receipt {i}"
        if _ask(client, "rtx4090", prompt).choices[0].finish_reason == "length":
            found.append(prompt)
            if len(found) == count:
                return found
    raise AssertionError("no long answers")


def _node(grid: LocalGrid, card: str) -> dict[str, Any]:
    return next(n for n in grid.nodes() if n["engine"] == f"emulated:{card}")


def test_honest_node_settles_cleanly_and_each_cheat_is_caught(cheat_grid: LocalGrid) -> None:
    grid = cheat_grid
    client = _client(grid)
    prompts = _long_prompts(client, 2)
    honest = [_ask(client, "rtx4090", p, stream=True) for p in prompts]
    assert all(honest)
    for card in CHEATS:
        for p in prompts:
            with contextlib.suppress(openai.APIError):  # once quarantined, the node is not eligible: refused
                _ask(client, card, p)
    for card, mode in CHEATS.items():
        node = _node(grid, card)
        assert node["reliability"]["state"] == "quarantined", (mode, node["reliability"])
        incidents = admin_get(grid, f"/admin/incidents?node_id={node['node_id']}").json()["incidents"]
        assert any(EVIDENCE[mode] in i["detail"] for i in incidents), (mode, incidents)
        assert all(i["severity"] == "severe" for i in incidents)
    honest_node = _node(grid, "rtx4090")
    assert honest_node["reliability"]["state"] == "healthy"
    assert admin_get(grid, f"/admin/incidents?node_id={honest_node['node_id']}").json()["incidents"] == []
    report = admin_get(grid, "/admin/settlement").json()
    totals = {t["node_id"]: t for t in report["totals"]}
    assert totals[honest_node["node_id"]]["disputed"] == 0 and totals[honest_node["node_id"]]["tokens"] > 0
    inflated = _node(grid, "a100-80g")["node_id"]
    entry = next(d for d in report["disputed"] if d["node_id"] == inflated)
    assert entry["claimed_tokens"] == 2 * entry["tokens"]  # the gateway pays its own count, not the claim


def test_settle_cli_prints_totals_and_disputes(cheat_grid: LocalGrid) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "gridserve", "settle", "--gateway", cheat_grid.url, "--admin-token", ADMIN],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert "settlement" in out.stdout and "disputed entries" in out.stdout and "receipt claims" in out.stdout


def test_unattested_weights_cannot_register(tmp_path: Path) -> None:
    digests = tmp_path / "digests.json"
    digests.write_text(json.dumps({TINY_MODEL: ["sha256:not-the-tiny-weights"]}))
    grid = make_grid(tmp_path / "grid", ["tiny"], threads=1, extra_gateway_args=["--allowed-digests", str(digests)])
    try:
        grid.start_gateway()
        grid.start_node(0, "tiny")
        deadline = time.monotonic() + 60
        refused: list[dict[str, Any]] = []
        while time.monotonic() < deadline and not refused:
            events = admin_get(grid, "/admin/events?kind=protocol_rejected&limit=20").json()["events"]
            refused = [e for e in events if e["detail"]["reason"] == "unattested_weights"]
            time.sleep(0.3)
        assert refused and "seed:20261123" in refused[0]["detail"]["detail"]
        assert grid.nodes() == []
        resp = httpx.get(grid.url + "/v1/models", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=10)
        assert resp.json()["data"] == []
    finally:
        grid.stop()


def test_bad_digest_file_is_one_readable_line(tmp_path: Path) -> None:
    bad = tmp_path / "digests.json"
    bad.write_text('{"gridserve-tiny": "not a list"}')
    out = subprocess.run(
        [sys.executable, "-m", "gridserve", "gateway", "--allowed-digests", str(bad), "--data-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2 and "expected a JSON object" in out.stderr and "Traceback" not in out.stderr


def test_dishonest_modes_are_refused_unless_enabled(tmp_path: Path) -> None:
    out = subprocess.run(
        [
            *(sys.executable, "-m", "gridserve", "node", "--gateway", "http://127.0.0.1:9", "--engine", "tiny"),
            *("--port", "9", "--dishonest", "inflate_tokens", "--key", str(tmp_path / "k")),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2 and "--allow-dishonest" in out.stderr


VERIFIED_CHEATS = ("wrong_model", "lazy_compute", "alter_output", "omit_proof")


def test_audits_and_canaries_catch_cheats_the_receipt_cannot_see(tmp_path: Path) -> None:
    """Other weights, a skipped layer, altered tokens and a missing proof come with consistent receipts; the
    verifier's re-execution (canaries aimed at each node, and sampled audits of client traffic) catches each."""
    grid = make_grid(
        tmp_path, ["tiny"] * (1 + len(VERIFIED_CHEATS)), threads=1, extra_gateway_args=["--canary-interval", "0"]
    )
    try:
        grid.start_gateway()
        grid.start_node(0, "tiny")
        for i, mode in enumerate(VERIFIED_CHEATS, start=1):
            grid.start_node(i, "tiny", ["--allow-dishonest", "--dishonest", mode])
        grid.wait_nodes(1 + len(VERIFIED_CHEATS), 120)
        by_port = {n["endpoint"].rsplit(":", 1)[1]: n["node_id"] for n in grid.nodes()}
        honest = by_port[str(grid.node_port(0))]
        cheats = {mode: by_port[str(grid.node_port(i))] for i, mode in enumerate(VERIFIED_CHEATS, start=1)}
        headers = {"Authorization": f"Bearer {ADMIN}"}
        for _ in range(3):
            verdict = httpx.post(grid.url + f"/admin/canary?node_id={honest}", headers=headers, timeout=60).json()
            assert verdict["ok"] and verdict["proof_checked"], verdict
        for mode, node_id in cheats.items():
            for _ in range(6):  # canaries sample like traffic: `alter_output` leaves an answer under 4 tokens alone
                verdict = httpx.post(grid.url + f"/admin/canary?node_id={node_id}", headers=headers, timeout=60).json()
                if not verdict["ok"]:
                    break
            assert not verdict["ok"] and all(p.startswith("canary:") for p in verdict["problems"]), (mode, verdict)
            incidents = admin_get(grid, f"/admin/incidents?node_id={node_id}").json()["incidents"]
            assert incidents and all(i["severity"] == "severe" for i in incidents)
            assert "canary:" in incidents[0]["detail"], incidents
            state = next(n for n in grid.nodes() if n["node_id"] == node_id)["reliability"]["state"]
            assert state == "quarantined", (mode, state)
        client = _client(grid)
        for i in range(20):  # client traffic now reaches only the honest node; new nodes are audited at 50%
            client.completions.create(model=TINY_MODEL, prompt=f"audited {i}", max_tokens=8, temperature=0)
        deadline = time.monotonic() + 30
        audits = admin_get(grid, "/admin/audits").json()
        while time.monotonic() < deadline and audits["audited"] < 3 + len(VERIFIED_CHEATS) + 4:
            time.sleep(0.3)
            audits = admin_get(grid, "/admin/audits").json()
        assert audits["audited"] >= 3 + len(VERIFIED_CHEATS) + 4 and audits["failed"] == len(VERIFIED_CHEATS), audits
        assert admin_get(grid, f"/admin/incidents?node_id={honest}").json()["incidents"] == []
    finally:
        grid.stop()


def _wait_serving(url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2).status_code == 200:
                return
        time.sleep(0.3)
    raise AssertionError(f"{url} did not answer in {timeout_s} s")


def test_one_key_used_from_two_places_is_an_identity_incident(tmp_path: Path) -> None:
    grid = make_grid(tmp_path, ["tiny", "tiny"], threads=1, heartbeat_interval_s=0.5)
    try:
        grid.start_gateway()
        grid.start_node(0, "tiny")
        grid.wait_nodes(1, 120)
        node_id = grid.nodes()[0]["node_id"]
        # a second agent with the same key file, somewhere else (another port)
        grid.procs["node-1"] = grid.procs.pop("node-0")
        grid.start_node(0, "tiny", ["--port", str(grid.node_port(1))])
        _wait_serving(f"http://127.0.0.1:{grid.node_port(1)}/health", 120)  # (its start is not what is measured)
        deadline = time.monotonic() + 30  # then two agents heartbeat with one key: seen within a few beats
        incidents: list[dict[str, Any]] = []
        while time.monotonic() < deadline and not incidents:
            incidents = admin_get(grid, f"/admin/incidents?node_id={node_id}").json()["incidents"]
            time.sleep(0.3)
        assert incidents and "key used from two places" in incidents[0]["detail"]
        assert next(n for n in grid.nodes() if n["node_id"] == node_id)["reliability"]["state"] == "quarantined"
    finally:
        grid.stop()


def test_forged_message_claiming_a_node_never_counts_against_it(cheat_grid: LocalGrid) -> None:
    from gridserve.trust import Identity, sign_envelope

    victim = _node(cheat_grid, "rtx4090")
    forger = Identity.generate()
    beat = {"node_id": victim["node_id"], "seq": 10**9, "telemetry": {}}
    body = sign_envelope(forger, beat, purpose="heartbeat", now=time.time())
    resp = httpx.post(cheat_grid.url + "/nodes/heartbeat", content=body, timeout=10)
    assert resp.status_code in (401, 404)
    events = admin_get(cheat_grid, "/admin/events?kind=protocol_rejected&limit=50").json()["events"]
    assert events and all(e["node_id"] != victim["node_id"] for e in events)  # recorded against its source
    assert all(e["detail"]["remote"] for e in events)
    assert admin_get(cheat_grid, f"/admin/incidents?node_id={victim['node_id']}").json()["incidents"] == []
