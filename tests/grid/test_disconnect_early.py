"""A client that leaves before its first token cancels the work on the node at once (the soak found abandoned
requests running on to their first token, filling the batch slots of the requests still waiting)."""

import time
from collections.abc import Iterator

import httpx
import pytest
from tests.conftest import API_KEY, admin_get, make_grid

from gridserve.cli.grid import LocalGrid

SLOW_TTFT_MS = 4000


@pytest.fixture(scope="module")
def slow_grid(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalGrid]:
    grid = make_grid(
        tmp_path_factory.mktemp("slow"),
        ["emulated:rtx4090"],
        extra_gateway_args=["--no-hedging", "--canary-interval", "0"],
        extra_node_args=["--fixed-ttft-ms", str(SLOW_TTFT_MS), "--fixed-itl-ms", "10"],
        threads=1,
    )
    try:
        grid.start(timeout_s=120)
        yield grid
    finally:
        grid.stop()


def node_active(grid: LocalGrid) -> int:
    return int(httpx.get(f"http://127.0.0.1:{grid.node_port(0)}/health", timeout=5).json()["active"])


def gateway_outstanding(grid: LocalGrid) -> int:
    return sum(int(n["outstanding"]) for n in admin_get(grid, "/admin/nodes").json()["nodes"])


def leave_early(grid: LocalGrid, stream: bool, clients: int) -> float:
    """Start `clients` requests, drop each connection after 0.5 s; seconds until neither node nor gateway holds
    any of them."""
    body = {"model": "llama-3-8b", "prompt": "x", "max_tokens": 8, "stream": stream}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    timeout = httpx.Timeout(5.0, read=0.5)
    for _ in range(clients):
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(grid.url + "/v1/completions", json=body, headers=headers, timeout=timeout)
    left = time.monotonic()
    while time.monotonic() - left < SLOW_TTFT_MS / 1e3:
        if node_active(grid) == 0 and gateway_outstanding(grid) == 0:
            return time.monotonic() - left
        time.sleep(0.05)
    return float("inf")


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "whole"])
def test_a_client_leaving_before_the_first_token_cancels_the_work_on_the_node(
    slow_grid: LocalGrid, stream: bool
) -> None:
    took = leave_early(slow_grid, stream, clients=3)
    assert took < 1.5, f"the node still ran the abandoned requests {took:.2f} s after the clients left"
    ok = httpx.post(
        slow_grid.url + "/v1/completions",
        json={"model": "llama-3-8b", "prompt": "x", "max_tokens": 4},
        headers={"Authorization": f"Bearer {API_KEY}"},
        timeout=30,
    )
    assert ok.status_code == 200, ok.text  # the node still serves those who wait
