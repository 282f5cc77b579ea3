"""Permissioned mode on real processes: a gateway started with --join-tokens admits only nodes holding a token from
`gridserve tokens create`; a node without one (or with a revoked one) is refused with a clear line and stops; a
single-use token admits one identity; a revoked token admits no one (tests/unit/test_join_tokens.py: the rules)."""

import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from tests.conftest import ADMIN, API_KEY, make_grid
from tests.hostile import HostileNode

from gridserve.cli.grid import LocalGrid

ENGINE = "emulated:rtx4090"
MODEL = "llama-3-8b"
FIXED = ["--fixed-ttft-ms", "20", "--fixed-itl-ms", "5"]
TOKEN = re.compile(r"gsj_[0-9a-f]+\.[A-Za-z0-9_-]+")


@pytest.fixture(scope="module")
def grid(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalGrid]:
    """A gateway that requires join tokens, and room for three nodes (started by the tests)."""
    found = make_grid(
        Path(tmp_path_factory.mktemp("join-tokens")),
        [ENGINE] * 3,
        threads=1,
        extra_gateway_args=["--join-tokens"],
        extra_node_args=FIXED,
    )
    try:
        found.start_gateway()
        yield found
    finally:
        found.stop()


def cli(grid: LocalGrid, *args: str) -> str:
    """Run `gridserve tokens ...` against the grid's gateway; its output."""
    command = [sys.executable, "-m", "gridserve", "tokens", *args, "--gateway", grid.url, "--admin-token", ADMIN]
    done = subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout


def create_token(grid: LocalGrid, *args: str) -> tuple[str, str]:
    """(id, token) of a new token, from the CLI's own output."""
    out = cli(grid, "create", *args)
    token = TOKEN.search(out)
    assert token is not None, out
    assert f"GRIDSERVE_JOIN_TOKEN={token.group(0)} gridserve node --gateway {grid.url}" in out  # how to use it
    return token.group(0).removeprefix("gsj_").partition(".")[0], token.group(0)


def listed(grid: LocalGrid) -> dict[str, dict[str, Any]]:
    return {t["id"]: t for t in json.loads(cli(grid, "list", "--json"))}


def register(grid: LocalGrid, node: HostileNode, token: str | None) -> httpx.Response:
    body = node.envelope(node.capability("http://127.0.0.1:9", [MODEL]), "register")
    headers = {"content-type": "application/json", **({"X-Gridserve-Join-Token": token} if token else {})}
    return httpx.post(grid.url + "/nodes/register", content=body, headers=headers, timeout=10)


def refusal(resp: httpx.Response) -> str:
    assert resp.status_code == 401, resp.text
    assert resp.json()["error"]["type"] == "join_token", resp.text
    return str(resp.json()["error"]["message"])


def stopped_with(grid: LocalGrid, name: str, timeout_s: float = 40.0) -> str:
    """The error a node process that must stop by itself (exit code 2) ends its log with, in one line (the console
    wraps it); the process leaves the grid's."""
    proc = grid.procs.pop(name)
    try:
        assert proc.wait(timeout=timeout_s) == 2
    finally:
        if proc.poll() is None:
            proc.kill()
    log = (grid.data_dir / "logs" / f"{name}.log").read_text(errors="replace")
    assert "Traceback" not in log and "error: " in log, log
    return " ".join(log[log.rindex("error: ") :].split())


def test_a_node_without_a_token_is_refused_and_stops(grid: LocalGrid) -> None:
    message = refusal(register(grid, HostileNode(), None))
    assert "admits only nodes holding a join token" in message and "gridserve tokens create" in message
    grid.start_node(0, ENGINE)
    last = stopped_with(grid, "node-0")
    assert last.startswith("error: gateway ") and "admits only nodes holding a join token" in last, last
    assert grid.nodes() == []


def test_a_node_with_a_token_registers_and_serves_and_the_token_admits_no_other(grid: LocalGrid) -> None:
    token_id, token = create_token(grid, "--label", "node one")
    name = grid.start_node(1, ENGINE, ["--join-token", token])
    grid.wait_nodes(1, 60)
    resp = httpx.post(
        grid.url + "/v1/chat/completions",
        json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
        headers={"Authorization": f"Bearer {API_KEY}"},
        timeout=30,
    )
    assert resp.status_code == 200, resp.text
    assert resp.json()["choices"][0]["message"]["content"]
    (node,) = grid.nodes()
    shown = listed(grid)[token_id]
    assert shown["label"] == "node one" and shown["node_ids"] == [node["node_id"]] and shown["uses_left"] == 0
    assert "token" not in shown and token not in cli(grid, "list")
    assert "admitted its 1 node identity already" in refusal(register(grid, HostileNode(), token))
    assert [n["node_id"] for n in grid.nodes()] == [node["node_id"]]
    assert grid.procs[name].poll() is None  # the admitted node keeps running


def test_a_revoked_token_stops_new_registrations(grid: LocalGrid) -> None:
    token_id, token = create_token(grid, "--uses", "3", "--expires-in", "1h")
    assert abs(listed(grid)[token_id]["expires_at"] - (time.time() + 3600)) < 60
    first = HostileNode()
    assert register(grid, first, token).status_code == 200
    assert f"join token {token_id} revoked" in cli(grid, "revoke", token_id)
    assert listed(grid)[token_id]["status"] == "revoked"
    assert "revoked" in refusal(register(grid, HostileNode(), token))
    assert "revoked" in refusal(register(grid, first, token))  # the identity it admitted, registering again
    grid.start_node(2, ENGINE, ["--join-token", token])
    last = stopped_with(grid, "node-2")
    assert "refused this node" in last and f"join token {token_id} was revoked" in last, last


def test_the_cli_says_what_went_wrong_in_one_line(grid: LocalGrid) -> None:
    command = [sys.executable, "-m", "gridserve", "tokens", "revoke", "nosuchtoken", "--gateway", grid.url]
    done = subprocess.run([*command, "--admin-token", ADMIN], capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 2 and done.stderr.strip().count("\n") == 0 and "404" in done.stderr, done.stderr
    bad = [sys.executable, "-m", "gridserve", "tokens", "create", "--expires-in", "soon", "--gateway", grid.url]
    done = subprocess.run(bad, capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 2 and "--expires-in 'soon'" in done.stderr and "Traceback" not in done.stderr
