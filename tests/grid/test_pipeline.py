"""Pipelines across node processes on 127.0.0.1: stage nodes, the gateway driving them, re-planning."""

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import cast

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from openai import BadRequestError, OpenAI
from tests.conftest import ADMIN, API_KEY, admin_get, free_port_block, make_grid

from gridserve.catalog.models import TINY_MODEL
from gridserve.cli.grid import LocalGrid
from gridserve.engines.stage_engine import StageEngine
from gridserve.engines.tiny import tiny_engine
from gridserve.gateway.pipeline.session import LinkPool
from gridserve.gateway.transport import AiohttpTransport
from gridserve.node.agent import NodeAgent
from gridserve.node.stage_link import add_stage_routes
from gridserve.planner.chain import StageRoute
from gridserve.trust import Identity
from gridserve.trust.frames import Frame
from gridserve.types import GenerateRequest, SamplingParams

THREADS = 1
PLAN = [sys.executable, "-m", "gridserve", "plan"]


def direct_text(prompt: str, max_tokens: int) -> str:
    engine = tiny_engine(threads=THREADS)
    engine.load_sync()
    job = GenerateRequest(
        request_id="direct",
        model=TINY_MODEL,
        prompt=prompt,
        sampling=SamplingParams(max_tokens=max_tokens, temperature=0),
    )

    async def go() -> str:
        return "".join([e.text async for e in engine.generate(job)])

    return asyncio.run(go())


def _client(grid: LocalGrid) -> OpenAI:
    return OpenAI(base_url=grid.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


def _wait(check: object, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return
        time.sleep(0.1)
    raise AssertionError("condition not met in time")


@pytest.fixture
def tiny_pipeline(tmp_path: Path) -> Iterator[LocalGrid]:
    """A gateway and three tiny stage nodes: layers [0, 1) once, [1, 2) twice (a spare for re-planning)."""
    grid = make_grid(tmp_path, ["tiny"] * 3, threads=THREADS)
    try:
        grid.start_gateway()
        for index, layers in enumerate(("0:1", "1:2", "1:2")):
            grid.start_node(index, "tiny", ["--layers", layers])
        grid.wait_nodes(3, 120)
        yield grid
    finally:
        grid.stop()


def test_a_two_stage_pipeline_answers_like_one_node(tiny_pipeline: LocalGrid) -> None:
    grid = tiny_pipeline
    client = _client(grid)
    models = admin_get(grid, "/admin/pipelines").json()["models"]
    assert models == [TINY_MODEL]
    listed = {m.id: m for m in client.models.list()}
    assert TINY_MODEL in listed and listed[TINY_MODEL].model_extra["pipeline"] is True  # type: ignore[index]
    with pytest.raises(BadRequestError, match="context"):
        client.completions.create(model=TINY_MODEL, prompt="x", max_tokens=5000)
    prompt = "pipelines split the layers"
    raw = client.completions.with_raw_response.create(model=TINY_MODEL, prompt=prompt, max_tokens=40, temperature=0)
    answer = raw.parse()
    assert answer.choices[0].text == direct_text(prompt, 40)
    assert answer.usage is not None and answer.usage.completion_tokens == 40
    assert len(raw.headers["x-gridserve-node"].split(",")) == 2
    # streaming gives the same text
    chunks = client.completions.create(model=TINY_MODEL, prompt=prompt, max_tokens=40, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == answer.choices[0].text
    runs = admin_get(grid, "/admin/pipelines").json()["runs"]
    assert len(runs) == 2 and all(r["status"] == "ok" for r in runs)
    stages = runs[-1]["stages"]
    assert [s["layers"] for s in stages] == [[0, 1], [1, 2]]
    assert all(s["steps"] == 40 and s["compute_s"] > 0 and s["sent_bytes"] > 0 for s in stages)
    # the doctor reads the same per-stage timings and says where each token's time went
    doctor = admin_get(grid, "/admin/doctor").json()["pipelines"]
    assert [d["session"] for d in doctor] == [r["session"] for r in runs]
    diagnosis = doctor[-1]["diagnosis"]
    assert diagnosis["cause"] in ("healthy", "pipeline_overhead", "compute_saturation")
    assert any(line.startswith("per token:") for line in diagnosis["evidence"])


def test_a_stage_node_killed_mid_generation_is_replanned_and_the_text_is_the_same(tiny_pipeline: LocalGrid) -> None:
    grid = tiny_pipeline
    client = _client(grid)
    prompt = "kill a stage"
    expected = direct_text(prompt, 300)
    nodes = {n["node_id"]: n for n in admin_get(grid, "/admin/nodes").json()["nodes"]}
    pieces: list[str] = []
    first_chain: list[str] = []

    def consume() -> None:
        raw = client.completions.with_raw_response.create(
            model=TINY_MODEL, prompt=prompt, max_tokens=300, temperature=0, stream=True
        )
        first_chain.extend(raw.headers["x-gridserve-node"].split(","))
        for chunk in raw.parse():
            if chunk.choices:
                pieces.append(chunk.choices[0].text)

    reader = threading.Thread(target=consume)
    reader.start()
    _wait(lambda: len(pieces) > 20, 30)
    victim = first_chain[1]  # the stage running layers [1, 2)
    port = int(nodes[victim]["endpoint"].rsplit(":", 1)[1])
    index = port - grid.port - 1
    proc = grid.procs[f"node-{index}"]
    os.killpg(proc.pid, signal.SIGKILL)
    reader.join(timeout=120)
    assert not reader.is_alive()
    assert "".join(pieces) == expected
    run = admin_get(grid, "/admin/pipelines").json()["runs"][-1]
    assert run["status"] == "ok" and run["completion_tokens"] == 300
    (replan,) = run["replans"]
    assert replan["failed"] == victim and replan["replaced_by"] != [victim]
    assert replan["replayed_steps"] >= 20  # the new stage's cache was rebuilt from the session's inputs
    assert [c["layers"] for c in run["chain"]] == [[0, 1], [1, 2]] and run["chain"][1]["node_id"] != victim
    assert httpx.get(grid.url + "/health", timeout=5).status_code == 200


def _admin_post(grid: LocalGrid, path: str, body: dict[str, object]) -> httpx.Response:
    return httpx.post(grid.url + path, json=body, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=10)


def _node_at(grid: LocalGrid, index: int) -> str:
    return str(next(n for n in grid.nodes() if n["endpoint"].endswith(f":{grid.node_port(index)}"))["node_id"])


def test_the_scheduler_weighs_the_pipeline_against_whole_nodes(tmp_path: Path) -> None:
    """A whole-model node and a chain of stage nodes: the pipeline is one candidate in the decision (predicted
    latency, price, reliability of its weakest stage); the node wins while healthy, the pipeline once the node is
    quarantined, and a quarantined stage takes the pipeline out."""
    grid = make_grid(tmp_path, ["tiny"] * 3, threads=THREADS)
    try:
        grid.start_gateway()
        grid.start_node(0, "tiny")
        for index, layers in ((1, "0:1"), (2, "1:2")):
            grid.start_node(index, "tiny", ["--layers", layers])
        grid.wait_nodes(3, 120)
        whole, first_stage = _node_at(grid, 0), _node_at(grid, 1)
        client = _client(grid)
        pipeline = f"pipeline:{TINY_MODEL}"
        prompt = "one candidate among nodes"

        planned = subprocess.run(  # the planner over the grid's registered nodes (their cards, memory, RTTs)
            [*PLAN, TINY_MODEL, "--gateway", grid.url, "--admin-token", ADMIN, "--json"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert planned.returncode == 0, planned.stderr
        stages = json.loads(planned.stdout)["stages"]
        assert stages[0]["layers"].startswith("0:") and stages[-1]["layers"].endswith(":2")
        assert {s["node"] for s in stages} <= {n["node_id"] for n in grid.nodes()}

        raw = client.completions.with_raw_response.create(model=TINY_MODEL, prompt=prompt, max_tokens=12, temperature=0)
        decision = admin_get(grid, f"/v1/decisions/{raw.headers['x-gridserve-decision']}").json()
        ranked = {c["node_id"]: c for c in decision["candidates"]}
        assert set(ranked) == {whole, pipeline}  # stage nodes are not candidates on their own
        assert ranked[whole]["rank"] == 0 and ranked[whole]["score"] > ranked[pipeline]["score"]
        if not decision["picked_by"].startswith("exploration"):  # newcomers are explored now and then (p=0.05)
            assert raw.headers["x-gridserve-node"] == whole and "x-gridserve-pipeline" not in raw.headers
        chain = ranked[pipeline]
        assert chain["predicted_itl_s"] > ranked[whole]["predicted_itl_s"]  # two hops cost more than none
        assert chain["price_per_mtok"] > ranked[whole]["price_per_mtok"]  # two cards run for one token
        assert {d["scorer"] for d in chain["scores"]} == {"reliability", "latency", "load", "price", "warm"}

        assert _admin_post(grid, f"/admin/nodes/{whole}/quarantine", {"reason": "test"}).status_code == 200
        raw = client.completions.with_raw_response.create(model=TINY_MODEL, prompt=prompt, max_tokens=12, temperature=0)
        assert "x-gridserve-pipeline" in raw.headers
        assert raw.parse().choices[0].text == direct_text(prompt, 12)
        decision = admin_get(grid, f"/v1/decisions/{raw.headers['x-gridserve-decision']}").json()
        assert decision["chosen"] == pipeline and decision["status"] in ("streaming", "ok")
        verdict = next(v for v in decision["nodes"] if v["node_id"] == whole)
        assert verdict["filter"] == "node-state" and "quarantined" in verdict["reason"]
        _wait(lambda: admin_get(grid, f"/v1/decisions/{decision['decision_id']}").json()["status"] == "ok", 10)

        assert _admin_post(grid, f"/admin/nodes/{whole}/release", {"reason": "test"}).status_code == 200
        assert _admin_post(grid, f"/admin/nodes/{first_stage}/quarantine", {"reason": "test"}).status_code == 200
        raw = client.completions.with_raw_response.create(model=TINY_MODEL, prompt=prompt, max_tokens=4, temperature=0)
        assert raw.headers["x-gridserve-node"] == whole
        decision = admin_get(grid, f"/v1/decisions/{raw.headers['x-gridserve-decision']}").json()
        assert pipeline not in {v["node_id"] for v in decision["nodes"]}  # no chain covers the model any more
    finally:
        grid.stop()


def test_auto_stage_nodes_get_their_layers_from_the_planner(tmp_path: Path) -> None:
    """Nodes started with `--layers auto`, each with room for one of the tiny model's two layers: the first
    request has the gateway plan the split, assign each node its range, and answer over the chain."""
    grid = make_grid(tmp_path, ["tiny"] * 3, threads=THREADS)
    try:
        grid.start_gateway()
        for index in range(3):
            grid.start_node(index, "tiny", ["--layers", "auto", "--memory-gib", "0.0006"])
        grid.wait_nodes(3, 120)
        client = _client(grid)
        assert TINY_MODEL in {m.id for m in client.models.list()}
        assert admin_get(grid, "/admin/pipelines").json()["placements"] == []
        prompt = "the planner places the layers"
        raw = client.completions.with_raw_response.create(model=TINY_MODEL, prompt=prompt, max_tokens=20, temperature=0)
        assert raw.parse().choices[0].text == direct_text(prompt, 20)
        placements = admin_get(grid, "/admin/pipelines").json()["placements"]
        assert [p["status"] for p in placements] == ["placed"]
        stages = placements[0]["stages"]
        assert [s["layers"] for s in stages] == [[0, 1], [1, 2]]  # no node has room for both layers
        assert raw.headers["x-gridserve-node"].split(",") == [s["node_id"] for s in stages]
        assert "planner" in placements[0]["explanation"]
        again = client.completions.with_raw_response.create(model=TINY_MODEL, prompt=prompt, max_tokens=5)
        assert "x-gridserve-pipeline" in again.headers
        assert len(admin_get(grid, "/admin/pipelines").json()["placements"]) == 1  # placed once
    finally:
        grid.stop()


class _AckingStage:
    """What the node's stage route asks of its engine, for `open` and `close` frames only."""

    def __init__(self) -> None:
        self.span = SimpleNamespace(start=0, end=1, n_layers=2)
        self.stats = SimpleNamespace(note_error=lambda _: None)
        self.sessions: set[str] = set()

    def open(self, session: str) -> None:
        self.sessions.add(session)

    def close(self, session: str) -> None:
        self.sessions.discard(session)


def test_an_idle_stage_link_answers_the_nodes_keepalive_pings() -> None:
    """A node's server pings each stage connection and closes one whose pings go unanswered (uvicorn: every 20 s,
    20 s to answer). The gateway's link to a healthy node, idle between two requests, must still be open for the
    second one: here the node pings every 0.2 s and waits 0.2 s, and the link stays idle 1.5 s."""
    node, gateway = Identity.generate(), Identity.generate()
    engine = _AckingStage()
    app = FastAPI()
    add_stage_routes(
        app, cast(NodeAgent, SimpleNamespace(identity=node, gateway_key=gateway.public_key)), cast(StageEngine, engine)
    )
    port = free_port_block(1)
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error", ws_ping_interval=0.2, ws_ping_timeout=0.2)
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    _wait(lambda: server.started, 10)
    route = StageRoute(node.node_id, f"http://127.0.0.1:{port}", node.public_key, 0, 1, 2)

    async def drive() -> None:
        transport = AiohttpTransport(gateway)
        await transport.start()
        try:
            pool = LinkPool(gateway, transport)
            link = await pool.link(route)
            await link.exchange(Frame("open", "first"), None, 5.0)
            connection = link.ws
            await asyncio.sleep(1.5)  # several ping intervals and timeouts
            reply, _ = await link.exchange(Frame("open", "second"), None, 5.0)
            assert reply.kind == "ack" and link.ws is connection  # the same connection: it was kept open
            await pool.aclose()
        finally:
            await transport.aclose()

    try:
        asyncio.run(drive())
    finally:
        server.should_exit = True
        thread.join(10)
    assert engine.sessions == {"first", "second"}
