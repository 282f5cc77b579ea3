"""A node in front of an upstream server runs without torch, transformers, llama.cpp or the gateway's packages: a
real node process started as a light install runs it (tests/light_node.py: those packages cannot be imported)
registers with a real gateway, serves a chat from a real llama.cpp server through the official OpenAI SDK, and a
built-in engine on the same install stops with one line naming the extra it needs. The package split itself
(`pip install 'gridserve[node]'` in fresh 3.11, 3.12 and 3.13 venvs) is scripts/light_node_venvs.sh."""

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from openai import OpenAI
from tests.conftest import API_KEY
from tests.grid.test_upstream_llamacpp import llama_server  # noqa: F401 (the fixture)
from tests.llama_support import SERVED, grid_in_front_of

from gridserve.cli.grid import LocalGrid

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def light_grid(llama_server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalGrid]:  # noqa: F811
    yield from grid_in_front_of(llama_server, tmp_path_factory.mktemp("light"), node_module="tests.light_node")


def test_a_light_node_registers_and_serves_through_the_gateway(light_grid: LocalGrid) -> None:
    (node,) = light_grid.nodes()
    assert node["engine"] == "openai-upstream" and node["state"] == "up"
    client = OpenAI(base_url=light_grid.url + "/v1", api_key=API_KEY, max_retries=0)
    reply = client.chat.completions.with_raw_response.create(
        model=SERVED, messages=[{"role": "user", "content": "Name a colour."}], max_tokens=8, temperature=0
    )
    assert reply.headers["x-gridserve-node"] == node["node_id"]
    answer = reply.parse()
    assert answer.choices[0].message.content and answer.usage is not None and answer.usage.completion_tokens > 0
    stream = client.chat.completions.create(
        model=SERVED, messages=[{"role": "user", "content": "Name a colour."}], max_tokens=8, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)


def test_a_built_in_engine_on_a_light_install_names_the_extra_it_needs(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "tests.light_node", "node", "--gateway", "http://127.0.0.1:9", "--port", "9"]
    done = subprocess.run(
        [*command, "--engine", "tiny", "--key", str(tmp_path / "node.key")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    line = done.stderr.strip()
    assert "\n" not in line and line.startswith("error: engine tiny needs torch"), line
    assert "pip install 'gridserve[gemma]'" in line, line
