"""Pre-warmed fallbacks: a standby node is loaded when a model is in demand, more when demand rises, and
a node killed mid-answer is replaced by a warm one."""

import threading
import time
from pathlib import Path
from typing import Any

import httpx
from openai import OpenAI
from tests.conftest import API_KEY, admin_get, make_grid

from gridserve.cli.grid import LocalGrid
from gridserve.engines.tiny import TINY_MODEL

EMULATED = "llama-3-8b"


NO_HEDGE: Any = {"gridserve": {"hedge": False}}


def _warm(grid: LocalGrid, model: str) -> set[str]:
    return {n["node_id"] for n in grid.nodes() if any(m["name"] == model for m in n["models"])}


def _wait(check: Any, timeout_s: float) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    return check()


def test_lazy_nodes_advertise_loadable_and_serve_cold_when_asked(tmp_path: Path) -> None:
    grid = make_grid(tmp_path, ["tiny"], threads=1, extra_gateway_args=["--standby", "0"])
    grid.extra_node_args = ["--lazy"]
    try:
        grid.start(timeout_s=120)
        node = grid.nodes()[0]
        assert node["models"] == [] and node["loadable_models"] == [TINY_MODEL]
        client = OpenAI(base_url=grid.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)
        assert [m.id for m in client.models.list().data] == [TINY_MODEL]
        resp = client.completions.create(model=TINY_MODEL, prompt="cold", max_tokens=4, temperature=0)
        assert resp.usage is not None and resp.usage.completion_tokens >= 1
        assert _wait(lambda: _warm(grid, TINY_MODEL), 10) == {node["node_id"]}  # it announced the loaded model
    finally:
        grid.stop()


def test_a_standby_is_prewarmed_and_more_when_demand_rises(tmp_path: Path) -> None:
    grid = make_grid(tmp_path, ["emulated:rtx4090"] * 4, threads=1, extra_gateway_args=["--standby", "1"])
    try:
        grid.start_gateway()
        grid.start_node(0, "emulated:rtx4090", ["--fixed-ttft-ms", "30", "--fixed-itl-ms", "30"])
        for i in (1, 2, 3):  # the model on disk only (loads in 16 GB / 100 GB/s = 0.16 s)
            extra = ["--model", "mistral-7b", "--loadable", EMULATED, "--load-gbps", "100"]
            grid.start_node(i, "emulated:rtx4090", [*extra, "--fixed-ttft-ms", "30", "--fixed-itl-ms", "30"])
        grid.wait_nodes(4, 120)
        assert len(_warm(grid, EMULATED)) == 1
        client = OpenAI(base_url=grid.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)
        # no hedges: a hedge to a node with the model on disk warms it too (a cold start, not the keeper's pre-load),
        # as a loaded machine's late first token did in a fresh-clone run (two pre-loads counted of three warm-ups)
        client.completions.create(model=EMULATED, prompt="first", max_tokens=2, extra_body=NO_HEDGE)
        # demand for the model: one node carries it, one more is kept warm as a standby (pre-loaded)
        assert len(_wait(lambda: len(_warm(grid, EMULATED)) >= 2 and _warm(grid, EMULATED), 10)) == 2

        def plan() -> dict[str, Any]:
            """The keeper's plan for the model; an empty one until the keeper has planned since the first request
            (a hedge or a cold start can warm a second node before its next tick)."""
            status = admin_get(grid, "/admin/standby").json()
            found: dict[str, Any] = next((m for m in status["models"] if m["model"] == EMULATED), {"warm": []})
            return found

        assert _wait(lambda: len(plan()["warm"]) == 2, 5)  # (the keeper re-plans every second)
        assert plan()["target"] == 2 and plan()["in_flight"] == 0
        # rising demand: 12 concurrent long streams (4 per node) -> the keeper pre-loads the rest
        stop = threading.Event()

        def stream(i: int) -> None:
            while not stop.is_set():
                for _ in client.completions.create(
                    model=EMULATED, prompt=f"load {i}", max_tokens=60, temperature=0, stream=True, extra_body=NO_HEDGE
                ):
                    pass

        threads = [threading.Thread(target=stream, args=(i,), daemon=True) for i in range(12)]
        for t in threads:
            t.start()
        try:
            assert len(_wait(lambda: len(_warm(grid, EMULATED)) == 4 and _warm(grid, EMULATED), 20)) == 4
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=30)

        def preloads() -> list[dict[str, Any]]:  # events are written by the ledger's writer thread, shortly after
            found: list[dict[str, Any]] = admin_get(grid, "/admin/events?kind=preload&limit=10").json()["events"]
            return found

        _wait(lambda: len(preloads()) >= 3, 10)
        events = preloads()
        assert len(events) == 3 and all(e["detail"]["model"] == EMULATED for e in events)
        assert any("target" in e["detail"]["reason"] for e in events)
        metrics = httpx.get(grid.url + "/metrics", timeout=10).text
        assert f'gridserve_preloads_total{{model="{EMULATED}"}} 3.0' in metrics
    finally:
        grid.stop()
