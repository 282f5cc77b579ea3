"""Faithfulness: a real grid of emulated nodes on 127.0.0.1 and the simulator, given the same cards and the
same requests, agree on TTFT and TPOT within 10% at the median and the 90th percentile.

The real figures are the gateway's record of each request, not the replaying client's clock: this client is a test
worker sharing two cores with other tests, and a starved client reads its streams late (sim/faithful.py)."""

import socket
import time
from pathlib import Path

import pytest

from conftest import ADMIN, make_grid
from gridserve.sim import faithful

CARDS = ["t4", "t4", "a10g"]
MODEL = "llama-3-8b"
CLIENT_KEEPALIVE_S = 5.0
"""How long httpx (the replay's client) and the OpenAI SDK keep an idle connection for reuse."""


@pytest.mark.serial  # timings: alone, not beside another worker's grid (Makefile)
def test_the_simulator_agrees_with_a_real_grid_within_10_percent(tmp_path: Path) -> None:
    grid = make_grid(
        tmp_path,
        [f"emulated:{card}" for card in CARDS],
        threads=1,
        extra_node_args=["--model", MODEL],
        extra_gateway_args=["--no-hedging"],  # the simulator does not hedge
    )
    trace = faithful.synthetic(60, rate=1.5, seed=0)
    try:
        grid.start(timeout_s=120)
        replayed = faithful.replay(grid.url, grid.api_key, MODEL, trace, admin_token=ADMIN)
    finally:
        grid.stop()
    real = replayed.measured
    assert not replayed.failed and len(real) == len(trace), replayed.failed  # every one answered, with usage
    assert max(m.prompt_tokens for m in real) > 3000  # long prompts: the node counts the whole prompt
    sim = faithful.simulate(real, CARDS, MODEL)
    report = faithful.compare(real, sim)
    for key in ("ttft_p50", "ttft_p90", "tpot_p50", "tpot_p90"):
        assert abs(report[key]["diff"]) <= 0.10, report


def _get_health(conn: socket.socket, port: int) -> bytes:
    """One GET /health on `conn`; the status line ("" if the gateway had closed the connection)."""
    conn.sendall(f"GET /health HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = conn.recv(65536)
        if not chunk:
            return b""
        head += chunk
    headers, _, body = head.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1]) for line in headers.split(b"\r\n") if line.lower().startswith(b"content-length")
    )
    while len(body) < length:
        body += conn.recv(65536)
    return headers.split(b"\r\n")[0]


def test_the_gateway_keeps_an_idle_connection_open_longer_than_a_client_reuses_it(tmp_path: Path) -> None:
    """The replay's client reuses a connection idle for up to 5 s. A gateway that closed idle connections at 5 s
    too closed some just as the client sent its next request on them: a reset, httpx.ReadError (issue 15). The
    gateway keeps them open longer, so the client is always the side that lets one go."""
    grid = make_grid(tmp_path, [])
    try:
        grid.start_gateway()
        with socket.create_connection(("127.0.0.1", grid.port), timeout=10) as conn:
            assert _get_health(conn, grid.port).startswith(b"HTTP/1.1 200")
            time.sleep(CLIENT_KEEPALIVE_S + 1.0)
            assert _get_health(conn, grid.port).startswith(b"HTTP/1.1 200")  # the same connection, still open
    finally:
        grid.stop()
