"""Outbound-only nodes (issue 18): every node runs `--outbound-only`, opens no listening socket, and is called by
the gateway over the tunnel it dialled. Chat, streaming, failover on kill -9, a 2-stage pipeline and audits pass
over tunnels; one node runs in a network namespace that nothing outside can reach (tests/netns.py)."""

import contextlib
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from openai import OpenAI
from tests import netns
from tests.conftest import API_KEY, admin_get, make_grid, until_one_at_work
from tests.grid.test_failover import all_completed_unchanged, greedy_streams_under_way
from tests.grid.test_pipeline import direct_text

from gridserve.catalog.models import TINY_MODEL
from gridserve.cli.grid import LocalGrid
from gridserve.trust import load_or_create_identity

FIXED = ["--fixed-ttft-ms", "40", "--fixed-itl-ms", "40"]
EMULATED = "llama-3-8b"


def _client(grid: LocalGrid) -> OpenAI:
    return OpenAI(base_url=grid.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


def _outbound_grid(tmp: Path, engines: list[str], **kwargs: Any) -> LocalGrid:
    return make_grid(tmp, engines, threads=1, outbound_only=True, **kwargs)


def _proc(grid: LocalGrid, node_id: str) -> psutil.Process:
    """The process of the node with this id (its key file says which)."""
    for name, proc in grid.procs.items():
        key = grid.data_dir / "keys" / f"{name}.key"
        if name.startswith("node-") and key.exists() and load_or_create_identity(key).node_id == node_id:
            return psutil.Process(proc.pid)
    raise AssertionError(f"no process for {node_id}")


def _sockets(process: psutil.Process) -> tuple[list[str], list[int]]:
    """(the listening sockets the process holds, the remote ports of its established TCP connections), read from
    /proc/PID/net, which shows the process's own network namespace (psutil reads this one's: a node inside a
    namespace would show no sockets at all)."""
    inodes = set()
    for fd in Path(f"/proc/{process.pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    listening: list[str] = []
    remote_ports: list[int] = []
    for table in ("tcp", "tcp6"):
        for row in Path(f"/proc/{process.pid}/net/{table}").read_text().splitlines()[1:]:
            cols = row.split()
            if cols[9] not in inodes:
                continue
            if cols[3] == "0A":  # TCP_LISTEN
                listening.append(f"{table} {cols[1]}")
            elif cols[3] == "01":  # TCP_ESTABLISHED
                remote_ports.append(int(cols[2].rsplit(":", 1)[1], 16))
    for table in ("udp", "udp6"):  # a bound UDP socket takes datagrams from anyone
        listening += [f"{table} {r.split()[1]}" for r in _rows(process, table) if r.split()[9] in inodes]
    for row in _rows(process, "unix"):
        cols = row.split()
        if cols[6] in inodes and int(cols[3], 16) & 0x10000:  # __SO_ACCEPTCON: a listening unix socket
            listening.append(f"unix {cols[7] if len(cols) > 7 else '(unnamed)'}")
    return listening, remote_ports


def _rows(process: psutil.Process, table: str) -> list[str]:
    return Path(f"/proc/{process.pid}/net/{table}").read_text().splitlines()[1:]


def _assert_outbound_only(grid: LocalGrid, gateway_port: int) -> None:
    nodes = grid.nodes()
    assert nodes and all(n["endpoint"] == f"tunnel://{n['node_id']}" for n in nodes), nodes
    for node in nodes:
        listening, remote_ports = _sockets(_proc(grid, node["node_id"]))
        assert listening == [], (node["node_id"], listening)
        assert gateway_port in remote_ports, remote_ports  # its tunnel


@pytest.fixture(scope="module")
def outbound(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalGrid]:
    grid = _outbound_grid(tmp_path_factory.mktemp("outbound"), ["emulated:rtx4090"] * 3, extra_node_args=FIXED)
    try:
        grid.start(timeout_s=120)
        yield grid
    finally:
        grid.stop()


def test_outbound_nodes_listen_nowhere_and_serve_chat_and_streams(outbound: LocalGrid) -> None:
    grid = outbound
    _assert_outbound_only(grid, grid.port)
    client = _client(grid)
    raw = client.chat.completions.with_raw_response.create(
        model=EMULATED, messages=[{"role": "user", "content": "hello over a tunnel"}], max_tokens=12, temperature=0
    )
    reply = raw.parse()
    assert reply.choices[0].message.content and reply.usage is not None and reply.usage.completion_tokens == 12
    assert raw.headers["x-gridserve-node"] in {n["node_id"] for n in grid.nodes()}
    stream = client.chat.completions.create(
        model=EMULATED,
        messages=[{"role": "user", "content": "hello over a tunnel"}],
        max_tokens=12,
        temperature=0,
        stream=True,
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == reply.choices[0].message.content
    decision = admin_get(grid, f"/v1/decisions/{raw.headers['x-gridserve-decision']}").json()
    assert decision["status"] == "ok" and decision["route"][0]["outcome"] == "ok", decision
    # heartbeats come over the tunnels: every node is up, with telemetry
    assert all(n["state"] == "up" for n in grid.nodes())


def _fresh_telemetry(grid: LocalGrid, after: float) -> dict[str, int]:
    """Each node's requests running on it, from heartbeats that arrived after `after` (time.monotonic())."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        asked = time.monotonic()
        nodes = grid.nodes()
        if all(n["heartbeat_age_s"] < asked - after and n["telemetry"] for n in nodes):
            return {n["node_id"]: n["telemetry"]["active_requests"] for n in nodes}
        time.sleep(0.1)
    raise AssertionError("no fresh heartbeats")


def test_a_client_leaving_cancels_the_work_on_an_outbound_node(outbound: LocalGrid) -> None:
    """Seen through the nodes' own heartbeats (nothing can call an outbound node): one request running while the
    client reads, none soon after it left, where without the cancel it would run 1000 x 40 ms = 40 s."""
    grid = outbound
    body = {
        "model": EMULATED,
        "prompt": "a long answer",
        "max_tokens": 1000,
        "stream": True,
        "temperature": 0,
        "gridserve": {"hedge": False},  # one node at work (a hedge's loser would be a second, until cancelled)
    }
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with (
        httpx.Client(timeout=30) as http,
        http.stream("POST", grid.url + "/v1/completions", headers=headers, json=body) as resp,
    ):
        lines = resp.iter_lines()
        for _ in range(4):
            next(lines)
        # one request at work: on the node picked, or on the one it moved to if it stalled on a busy machine (then
        # the first one's cancel may land a moment later)
        running = until_one_at_work(lambda: _fresh_telemetry(grid, time.monotonic()), 5)
        assert sum(running.values()) == 1, running
    closed = time.monotonic()
    running = _fresh_telemetry(grid, closed + 0.5)
    assert not any(running.values()), running


def test_a_late_first_token_is_hedged_to_the_runner_up_over_tunnels(outbound: LocalGrid) -> None:
    """The node the scheduler picks is stopped (SIGSTOP: its tunnel stays open, it answers nothing) right before a
    request: the hedge goes to the runner-up over its own tunnel and answers (faults cannot be set on an outbound
    node from outside, so a stop stands in for tests/grid/test_failover.py's delay)."""
    grid = outbound
    client = _client(grid)
    for i in range(12):  # calibrate every node's TTFT
        client.completions.create(model=EMULATED, prompt=f"warm {i}", max_tokens=2)
    hedged = None
    seen: list[str] = []
    for i in range(10):
        probe = client.completions.with_raw_response.create(
            model=EMULATED, prompt=f"which {i}", max_tokens=2, extra_body={"gridserve": {"hedge": False}}
        )
        stopped = _proc(grid, probe.headers["x-gridserve-node"])
        pick = probe.headers["x-gridserve-node"]
        stopped.suspend()
        try:
            started = time.monotonic()
            raw = client.completions.with_raw_response.create(model=EMULATED, prompt=f"h{i}", max_tokens=2)
            took = time.monotonic() - started
        finally:
            stopped.resume()
        decision = admin_get(grid, f"/v1/decisions/{raw.headers['x-gridserve-decision']}").json()
        seen.append(f"{decision['chosen'][:8]} (stopped {pick[:8]}) hedged={decision['hedged']}")
        if decision["chosen"] == pick:
            hedged = (decision, raw.headers["x-gridserve-node"], pick, took)
            break
    assert hedged is not None, "the stopped node was never chosen: " + "; ".join(seen)
    decision, served_by, pick, took = hedged
    assert decision["hedged"] is True and served_by != pick, decision
    assert decision["status"] == "ok" and took < 2.0, (took, decision)  # not waiting for the stopped node
    metrics = httpx.get(grid.url + "/metrics", timeout=10).text
    assert any(
        line.startswith("gridserve_hedges_total ") and float(line.split()[1]) >= 1 for line in metrics.split("\n")
    )
    # the stopped node, resumed, is still in rotation (its tunnel held; it was stopped for well under a heartbeat
    # timeout)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(n["state"] != "up" for n in grid.nodes()):
        time.sleep(0.1)
    assert all(n["state"] == "up" for n in grid.nodes()), grid.nodes()


def test_a_stopping_gateway_finishes_its_streams_and_the_node_rejoins_it_restarted(tmp_path: Path) -> None:
    # --drain 15: the stream below runs ~5 s, past the default 3 s the gateway gives requests under way
    grid = _outbound_grid(tmp_path, ["emulated:rtx4090"], extra_node_args=FIXED, extra_gateway_args=["--drain", "15"])
    try:
        grid.start(timeout_s=120)
        client = _client(grid)
        reference = client.completions.create(model=EMULATED, prompt="in flight", max_tokens=120, temperature=0)
        # a stream under way when the gateway is told to stop ends whole: its tunnel drains before it closes
        stream = client.completions.create(
            model=EMULATED, prompt="in flight", max_tokens=120, temperature=0, stream=True
        )
        chunks = iter(stream)
        first = next(chunks)
        gateway = grid.procs["gateway"]
        gateway.send_signal(signal.SIGTERM)
        text = "".join(c.choices[0].text for c in [first, *chunks] if c.choices)
        assert text == reference.choices[0].text
        gateway.wait(20)
        grid.start_gateway()  # same port, same store and key
        restarted = time.monotonic()
        grid.wait_nodes(1, 30)
        # ignore_eos: a sampled answer may end at its first token (fresh clone A read 2 of 4)
        answer = client.completions.create(
            model=EMULATED, prompt="after", max_tokens=4, extra_body={"ignore_eos": True}
        )
        assert answer.usage is not None and answer.usage.completion_tokens == 4
        assert time.monotonic() - restarted < 15  # the node dialled again within its backoff (at most 5 s)
        node_log = (grid.data_dir / "logs" / "node-0.log").read_text()
        assert node_log.count("tunnel to ") >= 2 and node_log.count(" open") >= 2, node_log[-2000:]
    finally:
        grid.stop()


def test_kill_9_mid_stream_fails_over_token_exact_over_tunnels(tmp_path: Path) -> None:
    grid = _outbound_grid(tmp_path, ["emulated:rtx4090"] * 3, extra_node_args=FIXED)
    try:
        grid.start(timeout_s=120)
        reference, streams, victim, under_way = greedy_streams_under_way(
            grid, 12, streaming_on_victim=3, tokens=80
        )  # 3.2 s a stream: at 40 tokens, CI's streams on the victim never had 3 within their first 24 tokens at once
        killed_at = time.time()
        os.kill(_proc(grid, victim).pid, signal.SIGKILL)
        all_completed_unchanged(streams, reference, victim)
        moved = [admin_get(grid, f"/v1/decisions/{s.decision}").json() for s in under_way]
        resumed = [d for d in moved if d["failovers"] >= 1]
        summary = [(d["failovers"], [(r["node_id"][:8], r["outcome"]) for r in d["route"]]) for d in moved]
        assert len(resumed) >= 3, summary  # at least 3 were streaming on it when it was killed
        for d in resumed:
            assert d["route"][0]["node_id"] == victim and d["route"][0]["outcome"] == "failed", summary
            assert d["route"][-1]["resumed_from"] > 0 and d["status"] == "ok", summary
        # the node's tunnel is gone: it is down within the bound, by the gateway's own record of the change (the
        # streams' completion above may take longer than that on a loaded machine)
        downs: list[dict[str, Any]] = []
        deadline = time.monotonic() + 10
        while not downs and time.monotonic() < deadline:
            events = admin_get(grid, f"/admin/events?kind=state&node_id={victim}&limit=50").json()["events"]
            downs = [e for e in events if e["detail"].get("to") == "down" and e["at"] >= killed_at]
            time.sleep(0.1)
        assert downs and min(e["at"] for e in downs) - killed_at < 3.0, (downs, killed_at)
    finally:
        grid.stop()


def test_a_two_stage_pipeline_over_tunnels(tmp_path: Path) -> None:
    grid = _outbound_grid(tmp_path, ["tiny"] * 2)
    try:
        grid.start_gateway()
        for index, layers in enumerate(("0:1", "1:2")):
            grid.start_node(index, "tiny", ["--layers", layers])
        grid.wait_nodes(2, 120)
        _assert_outbound_only(grid, grid.port)
        prompt = "pipelines split the layers, even behind NAT"
        client = _client(grid)
        raw = client.completions.with_raw_response.create(model=TINY_MODEL, prompt=prompt, max_tokens=24, temperature=0)
        assert raw.parse().choices[0].text == direct_text(prompt, 24)
        assert len(raw.headers["x-gridserve-node"].split(",")) == 2
        runs = admin_get(grid, "/admin/pipelines").json()["runs"]
        assert runs and runs[-1]["status"] == "ok" and [s["layers"] for s in runs[-1]["stages"]] == [[0, 1], [1, 2]]
    finally:
        grid.stop()


def test_audits_run_over_tunnels(tmp_path: Path) -> None:
    gateway = ["--audit-rate", "1", "--canary-interval", "0"]
    grid = _outbound_grid(tmp_path, ["tiny"] * 2, extra_gateway_args=gateway)
    try:
        grid.start(timeout_s=120)
        client = _client(grid)
        ids = []
        for i in range(3):
            answer = client.completions.create(model=TINY_MODEL, prompt=f"audit me {i}", max_tokens=8, temperature=0)
            ids.append(answer.id)
        deadline = time.monotonic() + 30
        recent: dict[str, Any] = {}
        while time.monotonic() < deadline and not all(r in recent for r in ids):
            recent = {r["request_id"]: r for r in admin_get(grid, "/admin/audits").json()["recent"]}
            time.sleep(0.2)
        assert all(r in recent for r in ids), list(recent)
        assert all(not recent[r]["problems"] for r in ids), [recent[r] for r in ids]
    finally:
        grid.stop()


@pytest.mark.skipif(not netns.available(), reason="network namespaces need root (CAP_SYS_ADMIN)")
def test_a_node_in_a_namespace_nothing_can_reach_serves_through_its_tunnel(tmp_path: Path) -> None:
    grid = _outbound_grid(tmp_path, ["tiny"])
    with netns.isolated() as name:
        grid.start_gateway()
        egress = netns.Egress(name, grid.port)
        try:
            assert netns.interfaces(name) == ["lo"]  # no link to this machine: no way in
            grid.node_gateways = f"http://127.0.0.1:{egress.inside_port}"  # the gateway, as seen from inside
            grid.node_wrapper = ["ip", "netns", "exec", name]
            grid.start_node(0, "tiny")
            grid.wait_nodes(1, 120)
            node = grid.nodes()[0]
            listening, remote_ports = _sockets(_proc(grid, node["node_id"]))
            assert listening == [] and egress.inside_port in remote_ports, (listening, remote_ports)
            answer = _client(grid).completions.create(
                model=TINY_MODEL, prompt="from inside", max_tokens=8, extra_body={"ignore_eos": True}
            )
            assert answer.usage is not None and answer.usage.completion_tokens == 8
            assert egress.relayed >= 2  # registration (HTTP) and the tunnel went out through the egress
        finally:
            grid.stop()
            egress.close()
