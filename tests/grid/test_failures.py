"""A node killed with SIGKILL is marked down within three heartbeat intervals; requests go elsewhere."""

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path
from typing import Any

from openai import OpenAI
from tests.conftest import API_KEY, admin_get, make_grid

from gridserve.cli.grid import LocalGrid
from gridserve.engines.tiny import TINY_MODEL

INTERVAL = 1.0


def _kill(grid: LocalGrid, index: int, after_heartbeat: bool = False) -> dict[str, Any]:
    """SIGKILL node `index` (`after_heartbeat`: as soon as the gateway has its next heartbeat)."""
    endpoint = f"http://127.0.0.1:{grid.node_port(index)}"
    node = next(n for n in grid.nodes() if n["endpoint"] == endpoint)
    assert node["state"] == "up"
    deadline = time.time() + 5 * INTERVAL
    seen = node["last_heartbeat"]
    while after_heartbeat and node["last_heartbeat"] == seen and time.time() < deadline:
        time.sleep(0.02)
        node = next(n for n in grid.nodes() if n["endpoint"] == endpoint)
    os.kill(grid.procs[f"node-{index}"].pid, signal.SIGKILL)
    grid.procs[f"node-{index}"].wait()
    return node


def test_kill_9_node_is_marked_down_and_traffic_moves(tmp_path: Path) -> None:
    round_robin = resources.files("gridserve.scheduler").joinpath("profiles/round-robin.yaml")
    # (no audits or canaries: each user request takes the next round-robin turn)
    gateway = ["--profile", str(round_robin), "--audit-rate", "0", "--canary-interval", "0"]
    grid = make_grid(
        tmp_path, ["tiny", "tiny", "tiny"], heartbeat_interval_s=INTERVAL, threads=1, extra_gateway_args=gateway
    )
    try:
        grid.start(timeout_s=120)
        client = OpenAI(base_url=grid.url + "/v1", api_key=API_KEY, max_retries=0)

        # 1. The failure detector alone (no traffic) marks a SIGKILLed node down within 3 intervals.
        victim = _kill(grid, 0)
        deadline = time.time() + 3 * INTERVAL + 5
        node = victim
        while time.time() < deadline and node["state"] != "down":
            time.sleep(0.1)
            node = next(n for n in grid.nodes() if n["node_id"] == victim["node_id"])
        assert node["state"] == "down"
        down = next(t for t in reversed(node["transitions"]) if "->down" in t["what"])
        assert "no heartbeat" in down["what"]  # the detector: heartbeats late (and, first, a failed probe)
        assert down["at"] - victim["last_heartbeat"] <= 3 * INTERVAL, down

        # 2. Kill a node the failure detector has not noticed yet: a request sent to it fails before the first token
        #    and moves to the other node, invisibly to the client. The round-robin profile sends one of any two
        #    consecutive requests to each node, so the dead one is tried whatever its score would be (with the
        #    default profile the first answer's timing can rank it below the other node, and nothing tries it).
        #    The requests go out right after the kill, nothing in between (the detector notices a dead node within
        #    about one heartbeat interval; a request sent later finds it down already and never tries it).
        #    The kill comes right after one of the node's heartbeats, and the requests go out together: the detector
        #    needs a heartbeat late by 1.3 intervals, which a starved test process once let pass between two requests
        #    sent one after the other (the next went to the survivor, and nothing tried the dead node).
        survivor = next(n["node_id"] for n in grid.nodes() if n["endpoint"].endswith(f":{grid.node_port(2)}"))
        second = _kill(grid, 1, after_heartbeat=True)

        def ask(i: int) -> Any:
            return client.completions.with_raw_response.create(model=TINY_MODEL, prompt=f"after {i}", max_tokens=2)

        with ThreadPoolExecutor(4) as pool:
            raws = list(pool.map(ask, range(4)))
        decisions = []
        for raw in raws:
            assert raw.parse().choices[0].finish_reason in ("length", "stop")
            assert raw.headers["x-gridserve-node"] == survivor
            decisions.append(raw.headers["x-gridserve-decision"])
        attempts = []
        for decision_id in decisions:
            decision = admin_get(grid, f"/v1/decisions/{decision_id}").json()
            attempts.append([(a["node_id"], a["outcome"]) for a in decision["attempts"]])
        assert [(second["node_id"], "failed"), (survivor, "served")] in attempts
        assert next(n for n in grid.nodes() if n["node_id"] == second["node_id"])["state"] == "down"
    finally:
        grid.stop()


def test_hung_node_is_down_within_3_s_and_returns_through_probation(tmp_path: Path) -> None:
    """SIGSTOP (a hung process, sockets open): with default settings it is marked down within 3 seconds;
    after SIGCONT it serves again on probation, then fully."""
    grid = make_grid(tmp_path, ["tiny", "tiny"], threads=1)  # default heartbeat interval (2 s)
    try:
        grid.start(timeout_s=120)
        client = OpenAI(base_url=grid.url + "/v1", api_key=API_KEY, max_retries=0)
        endpoint = f"http://127.0.0.1:{grid.node_port(0)}"
        victim = next(n for n in grid.nodes() if n["endpoint"] == endpoint)
        pid = grid.procs["node-0"].pid
        os.kill(pid, signal.SIGSTOP)
        stopped_at = time.time()
        try:
            state, node = "up", victim
            while time.time() < stopped_at + 6 and state != "down":
                time.sleep(0.05)
                node = next(n for n in grid.nodes() if n["node_id"] == victim["node_id"])
                state = node["state"]
            assert state == "down"
            down = next(t for t in reversed(node["transitions"]) if "->down" in t["what"])
            assert down["at"] - stopped_at <= 3.0, down
            for i in range(4):  # meanwhile requests are served by the other node
                raw = client.completions.with_raw_response.create(model=TINY_MODEL, prompt=f"h{i}", max_tokens=2)
                assert raw.headers["x-gridserve-node"] != victim["node_id"]
        finally:
            os.kill(pid, signal.SIGCONT)
        seen: list[str] = []
        deadline = time.time() + 20
        while time.time() < deadline and (not seen or seen[-1] != "up"):
            state = next(n for n in grid.nodes() if n["node_id"] == victim["node_id"])["state"]
            if not seen or seen[-1] != state:
                seen.append(state)
            time.sleep(0.05)
        assert seen[-1] == "up" and "probation" in seen, seen
        node = next(n for n in grid.nodes() if n["node_id"] == victim["node_id"])
        assert node["rtt_ms"] is not None and node["rtt_ms"] < 1000
    finally:
        grid.stop()
