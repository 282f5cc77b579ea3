"""Under load: a gateway killed and restarted keeps every reliability event it acknowledged; a node that
becomes 5x slower loses its traffic within a bounded number of requests."""

import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
from openai import OpenAI
from tests.conftest import ADMIN, API_KEY, admin_get, make_grid

from gridserve.cli.grid import LocalGrid

MODEL = "llama-3-8b"
FIXED = ["--fixed-ttft-ms", "30", "--fixed-itl-ms", "15", "--allow-faults"]


def _admin_post(grid: LocalGrid, path: str, body: dict[str, str]) -> httpx.Response:
    return httpx.post(grid.url + path, json=body, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=30)


def _by_port(grid: LocalGrid, index: int) -> dict[str, str]:
    return next(n for n in grid.nodes() if n["endpoint"].endswith(f":{grid.node_port(index)}"))


class Load(threading.Thread):
    """Requests in a loop until stopped; errors while the gateway is down are expected and counted."""

    def __init__(self, grid: LocalGrid) -> None:
        super().__init__(daemon=True)
        self.client = OpenAI(base_url=grid.url + "/v1", api_key=API_KEY, max_retries=0, timeout=10)
        self.stop = threading.Event()
        self.ok = self.failed = 0

    def run(self) -> None:
        i = 0
        while not self.stop.is_set():
            i += 1
            try:
                self.client.completions.create(model=MODEL, prompt=f"load {i}", max_tokens=6)
                self.ok += 1
            except (openai.APIError, httpx.HTTPError):
                self.failed += 1
                time.sleep(0.05)


def test_gateway_killed_under_load_keeps_every_acknowledged_reliability_event(tmp_path: Path) -> None:
    grid = make_grid(tmp_path, ["emulated:rtx4090"] * 2, threads=1, heartbeat_interval_s=1.0, extra_node_args=FIXED)
    loads = [Load(grid) for _ in range(3)]
    try:
        grid.start(timeout_s=120)
        a, b = _by_port(grid, 0), _by_port(grid, 1)
        for load in loads:
            load.start()
        httpx.post(a["endpoint"] + "/faults", json={"error_burst": 6}, timeout=5).raise_for_status()
        time.sleep(1.5)  # the burst is spent on live traffic: failed attempts, each a ledger event
        incident = _admin_post(grid, f"/admin/nodes/{a['node_id']}/incident", {"reason": "disk SMART warning"})
        quarantine = _admin_post(grid, f"/admin/nodes/{b['node_id']}/quarantine", {"reason": "audit pending"})
        assert incident.status_code == 200 and quarantine.status_code == 200
        acknowledged = admin_get(grid, "/admin/events?limit=1000").json()["events"]
        kinds = {e["kind"] for e in acknowledged}
        assert {"job_failed", "incident", "reliability_state"} <= kinds, kinds
        gateway = grid.procs["gateway"]
        os.kill(gateway.pid, signal.SIGKILL)  # no graceful shutdown, traffic still flowing
        gateway.wait()
        grid.start_gateway()
        grid.wait_nodes(2, 60)
        after = {e["id"]: e for e in admin_get(grid, "/admin/events?limit=5000").json()["events"]}
        lost = [e for e in acknowledged if after.get(e["id"]) != e]
        assert not lost, lost
        incidents = admin_get(grid, f"/admin/incidents?node_id={a['node_id']}").json()["incidents"]
        assert any("disk SMART warning" in i["detail"] for i in incidents)
        node_b = next(n for n in grid.nodes() if n["node_id"] == b["node_id"])
        assert node_b["reliability"]["state"] == "quarantined"
        assert sum(load.ok for load in loads) > 0
    finally:
        for load in loads:
            load.stop.set()
        grid.stop()


def test_node_slowed_5x_loses_its_traffic_within_bounded_requests(tmp_path: Path) -> None:
    grid = make_grid(tmp_path, ["emulated:rtx4090"] * 3, threads=1, extra_node_args=["--allow-faults"])
    try:
        grid.start(timeout_s=120)
        client = OpenAI(base_url=grid.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)

        def one(i: int) -> tuple[str, str]:
            raw = client.completions.with_raw_response.create(
                model=MODEL,
                prompt=f"share {i}",
                max_tokens=16,
                temperature=0,
                extra_body={"gridserve": {"tier": "interactive", "hedge": False}},
            )
            return raw.headers["x-gridserve-node"], raw.headers["x-gridserve-decision"]

        with ThreadPoolExecutor(max_workers=3) as pool:
            before = [node for node, _ in pool.map(one, range(30))]
        counts = {n: before.count(n) for n in set(before)}
        victim = max(counts, key=lambda n: counts[n])
        endpoint = next(n["endpoint"] for n in grid.nodes() if n["node_id"] == victim)
        httpx.post(endpoint + "/faults", json={"slow_decode_factor": 5}, timeout=5).raise_for_status()
        with ThreadPoolExecutor(max_workers=3) as pool:
            after = list(pool.map(one, range(100, 160)))
        picked_by = [admin_get(grid, f"/v1/decisions/{decision}").json()["picked_by"] for _, decision in after]
        explored = [i for i, how in enumerate(picked_by) if how.startswith("exploration")]
        # exploration (p=0.05) may pick the slowed node at any time, as it may any node with a short record: its
        # picks are counted apart (a local run saw 3 of the last 30 requests go to the slowed node, all by exploration)
        by_score = [i for i, (node, _) in enumerate(after) if node == victim and i not in explored]
        assert len(by_score) <= 10, by_score  # bounded: it is observed a few times, then it is ranked down
        assert sum(1 for i in by_score if i >= 30) <= 2, (by_score, picked_by)  # and it stays down
        assert len(explored) <= 12, picked_by  # the exploration share holds (3 expected in 60 at p=0.05)
        assert counts[victim] >= 8  # it did have a fair share before
        node = next(n for n in grid.nodes() if n["node_id"] == victim)
        assert node["calibration"]["itl_factor"] > 2.5
    finally:
        grid.stop()
