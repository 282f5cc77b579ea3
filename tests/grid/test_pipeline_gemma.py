"""The real Gemma 3 270M split across node processes on 127.0.0.1: 2- and 3-stage pipelines give the single
node's tokens, and logits bitwise equal to the whole model's at the same thread count."""

import asyncio
import os
import signal
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
import torch
from openai import OpenAI
from tests.conftest import API_KEY, admin_get, make_grid

from gridserve.cli.grid import LocalGrid
from gridserve.engines.gemma import GEMMA_MODEL, ensure_cache, gemma_engine, load_gemma
from gridserve.gateway.pipeline.session import LinkPool, PipelineSession, generate_tokens
from gridserve.gateway.transport import AiohttpTransport
from gridserve.planner.chain import StageRoute
from gridserve.trust import load_or_create_identity
from gridserve.types import GenerateRequest, SamplingParams

THREADS = 2
SPANS = ("0:9", "9:18", "0:6", "6:12", "12:18", "9:18")  # the second [9, 18) is a spare for re-planning
PROMPT = "The three primary colours are"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gemma_stages(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalGrid]:
    ensure_cache()
    grid = make_grid(tmp_path_factory.mktemp("gemma-stages"), ["gemma-270m"] * len(SPANS), threads=THREADS)
    try:
        grid.start_gateway()
        for index, layers in enumerate(SPANS):
            grid.start_node(index, "gemma-270m", ["--layers", layers])
        grid.wait_nodes(len(SPANS), 300)
        yield grid
    finally:
        grid.stop()


def whole_model_logits(prompt: list[int], steps: int) -> list[np.ndarray]:
    torch.set_num_threads(THREADS)
    model = load_gemma().model.eval()
    with torch.inference_mode():
        out = model(input_ids=torch.tensor([prompt]), use_cache=True)
        logits = [out.logits[0, -1].numpy().copy()]
        for _ in range(steps):
            token = int(np.argmax(logits[-1]))
            out = model(input_ids=torch.tensor([[token]]), past_key_values=out.past_key_values, use_cache=True)
            logits.append(out.logits[0, -1].numpy().copy())
    return logits


def single_node_text(prompt: str, max_tokens: int) -> str:
    """The greedy answer of the whole-model engine, run directly at the same thread count."""
    engine = gemma_engine(threads=THREADS)
    engine.load_sync()
    sampling = SamplingParams(max_tokens=max_tokens, temperature=0)
    job = GenerateRequest(request_id="d", model=GEMMA_MODEL, prompt=prompt, sampling=sampling)

    async def run() -> str:
        return "".join([e.text async for e in engine.generate(job)])

    return asyncio.run(run())


def routes(grid: LocalGrid) -> dict[str, StageRoute]:
    found = {}
    for node in admin_get(grid, "/admin/nodes").json()["nodes"]:
        layers = next(m["layers"] for m in node["models"] if m["name"] == GEMMA_MODEL)
        key = f"{layers['start']}:{layers['end']}"
        route = StageRoute(node["node_id"], node["endpoint"], node["public_key"], layers["start"], layers["end"], 18)
        found.setdefault(key, route)
    return found


async def pipeline_logits(grid: LocalGrid, chain: list[StageRoute], prompt: list[int], steps: int) -> list[np.ndarray]:
    """Drive the stage nodes as the gateway does (with the gateway's key: the nodes accept only it)."""
    identity = load_or_create_identity(grid.data_dir / "gateway.key")
    transport = AiohttpTransport(identity)
    await transport.start()
    try:
        pool = LinkPool(identity, transport)
        session = PipelineSession(pool, list(chain), lambda: list(chain))
        await session.open()
        params = SamplingParams(max_tokens=steps + 1, temperature=0)
        out = [logits.copy() async for _, logits in generate_tokens(session, prompt, params, eos_ids=frozenset())]
        await session.close()
        await pool.aclose()
    finally:
        await transport.aclose()
    return out


@pytest.mark.parametrize("split", [("0:9", "9:18"), ("0:6", "6:12", "12:18")], ids=["2-stage", "3-stage"])
def test_gemma_pipeline_logits_are_bitwise_the_whole_models(gemma_stages: LocalGrid, split: tuple[str, ...]) -> None:
    prompt = load_gemma().codec.encode_prompt(PROMPT)
    found = routes(gemma_stages)
    piped = asyncio.run(pipeline_logits(gemma_stages, [found[s] for s in split], prompt, 12))
    whole = whole_model_logits(prompt, 12)
    assert len(piped) == len(whole) == 13
    assert all(np.array_equal(a, b) for a, b in zip(piped, whole, strict=True))


def test_gemma_pipeline_through_the_api_equals_the_single_node_engine(gemma_stages: LocalGrid) -> None:
    client = OpenAI(base_url=gemma_stages.url + "/v1", api_key=API_KEY, max_retries=0, timeout=300)
    answer = client.completions.create(model=GEMMA_MODEL, prompt=PROMPT, max_tokens=24, temperature=0)
    assert answer.choices[0].text == single_node_text(PROMPT, 24)
    run = admin_get(gemma_stages, "/admin/pipelines").json()["runs"][-1]
    assert run["status"] == "ok" and len(run["chain"]) in (2, 3)


def test_gemma_stage_killed_mid_generation_keeps_the_text(gemma_stages: LocalGrid) -> None:
    """(Last in this module: it kills one of the fixture's nodes, and quarantines another.)

    Only [9, 18) has a spare, so the chain must be 0:9 + 9:18: the 3-stage chain's first stage is quarantined
    first (which chain is cheaper otherwise depends on the step times the gateway learned under the machine's load).
    """
    for node in admin_get(gemma_stages, "/admin/nodes").json()["nodes"]:
        if node["models"][0]["layers"]["start"] == 0 and node["models"][0]["layers"]["end"] == 6:
            quarantined = httpx.post(
                f"{gemma_stages.url}/admin/nodes/{node['node_id']}/quarantine",
                headers={"Authorization": f"Bearer {gemma_stages.admin_token}"},
                json={"reason": "test: force the 2-stage chain"},
            )
            assert quarantined.status_code == 200, quarantined.text
    prompt = "Write a long story about a lighthouse keeper."
    expected = single_node_text(prompt, 48)
    client = OpenAI(base_url=gemma_stages.url + "/v1", api_key=API_KEY, max_retries=0, timeout=300)
    raw = client.completions.with_raw_response.create(
        model=GEMMA_MODEL, prompt=prompt, max_tokens=48, temperature=0, stream=True
    )
    chain = raw.headers["x-gridserve-node"].split(",")
    nodes = {n["node_id"]: n for n in admin_get(gemma_stages, "/admin/nodes").json()["nodes"]}
    victim = next(n for n in chain if nodes[n]["models"][0]["layers"]["start"] == 9)
    pieces: list[str] = []
    for chunk in raw.parse():
        if chunk.choices:
            pieces.append(chunk.choices[0].text)
        if len(pieces) == 8:  # mid-answer: kill the node running layers [9, 18)
            index = int(nodes[victim]["endpoint"].rsplit(":", 1)[1]) - gemma_stages.port - 1
            os.killpg(gemma_stages.procs[f"node-{index}"].pid, signal.SIGKILL)
    assert "".join(pieces) == expected
    run = admin_get(gemma_stages, "/admin/pipelines").json()["runs"][-1]
    assert run["status"] == "ok" and [r["failed"] for r in run["replans"]] == [victim]
    assert run["replans"][0]["replayed_steps"] >= 8
