"""A pipeline request is accounted like a whole-model request: the reliability ledger of each stage node, the
settlement ledger (one entry per stage, at its share of the price), `/metrics` and the decision log; a stage that
dies mid-answer is recorded as a failed job and paid for the tokens it served."""

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai import OpenAI
from tests.conftest import ADMIN, API_KEY, admin_get, make_grid

from gridserve.catalog.models import TINY_MODEL
from gridserve.cli.grid import LocalGrid

THREADS = 1


def _client(grid: LocalGrid) -> OpenAI:
    return OpenAI(base_url=grid.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


@pytest.fixture
def stages(tmp_path: Path) -> Iterator[LocalGrid]:
    """A gateway and tiny stage nodes [0, 1), [1, 2), [1, 2) (a spare for re-planning)."""
    grid = make_grid(tmp_path, ["tiny"] * 3, threads=THREADS)
    try:
        grid.start_gateway()
        for index, layers in enumerate(("0:1", "1:2", "1:2")):
            grid.start_node(index, "tiny", ["--layers", layers])
        grid.wait_nodes(3, 120)
        yield grid
    finally:
        grid.stop()


def _events(grid: LocalGrid, kind: str, node_id: str) -> list[dict[str, Any]]:
    return list(admin_get(grid, f"/admin/events?kind={kind}&node_id={node_id}").json()["events"])


def _settlement(grid: LocalGrid) -> dict[str, dict[str, Any]]:
    return {t["node_id"]: t for t in admin_get(grid, "/admin/settlement").json()["totals"]}


def _metric(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        if not line.startswith((name + "{", name + " ")):
            continue
        head, value = line.rsplit(" ", 1)
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            return float(value)
    return 0.0


def test_a_pipeline_request_is_in_the_ledger_the_settlement_and_the_metrics(stages: LocalGrid) -> None:
    grid = stages
    raw = _client(grid).completions.with_raw_response.create(
        model=TINY_MODEL, prompt="accounted like any other", max_tokens=24, temperature=0
    )
    answer = raw.parse()
    assert answer.usage is not None and answer.usage.completion_tokens == 24
    chain = raw.headers["x-gridserve-node"].split(",")
    assert len(chain) == 2
    decision = httpx.get(
        grid.url + "/v1/decisions/" + raw.headers["x-gridserve-decision"],
        headers={"Authorization": f"Bearer {ADMIN}"},
        timeout=10,
    ).json()
    assert decision["status"] == "ok" and decision["usage"]["completion_tokens"] == 24
    assert decision["served_by"] == "pipeline:" + TINY_MODEL and decision["chain"] == ",".join(chain)
    assert sorted(s["node_id"] for s in decision["settled"]) == sorted(chain)

    for node in chain:  # the reliability ledger: a completed job per stage node
        completed = _events(grid, "job_completed", node)
        assert len(completed) == 1 and "pipeline stage" in completed[0]["detail"]["detail"], completed

    totals = _settlement(grid)  # the settlement ledger: each stage paid for the tokens it served
    price = next(c for c in decision["candidates"] if c["node_id"] == "pipeline:" + TINY_MODEL)["price_per_mtok"]
    for node in chain:
        assert totals[node]["tokens"] == 24 and totals[node]["model"] == TINY_MODEL
        assert totals[node]["disputed"] == 0
    paid = sum(totals[node]["amount_usd"] for node in chain)
    assert paid == pytest.approx(24 * price / 1e6)  # the stages' shares add up to the decided price

    metrics = httpx.get(grid.url + "/metrics", timeout=10).text
    assert _metric(metrics, "gridserve_requests_total", endpoint="text", status="ok") == 1
    for node in chain:
        assert _metric(metrics, "gridserve_completion_tokens_total", node=node) == 24
    assert _metric(metrics, "gridserve_ttft_seconds_count", node="pipeline:" + TINY_MODEL) == 1


def test_a_stage_that_dies_is_a_failed_job_and_both_stages_are_paid_their_part(stages: LocalGrid) -> None:
    grid = stages
    nodes = {n["node_id"]: n for n in admin_get(grid, "/admin/nodes").json()["nodes"]}
    chain: list[str] = []
    pieces: list[str] = []
    decision_id: list[str] = []

    def consume() -> None:
        raw = _client(grid).completions.with_raw_response.create(
            model=TINY_MODEL, prompt="a stage dies", max_tokens=200, temperature=0, stream=True
        )
        chain.extend(raw.headers["x-gridserve-node"].split(","))
        decision_id.append(raw.headers["x-gridserve-decision"])
        for chunk in raw.parse():
            if chunk.choices:
                pieces.append(chunk.choices[0].text)

    reader = threading.Thread(target=consume)
    reader.start()
    deadline = time.monotonic() + 60
    while len(pieces) <= 20 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(pieces) > 20
    victim = chain[1]
    index = int(nodes[victim]["endpoint"].rsplit(":", 1)[1]) - grid.port - 1
    os.killpg(grid.procs[f"node-{index}"].pid, signal.SIGKILL)
    reader.join(timeout=120)
    assert not reader.is_alive()

    failed = _events(grid, "job_failed", victim)
    assert len(failed) == 1 and "pipeline stage failed" in failed[0]["detail"]["detail"], failed
    assert _events(grid, "job_completed", victim) == []
    decision = httpx.get(
        grid.url + "/v1/decisions/" + decision_id[0], headers={"Authorization": f"Bearer {ADMIN}"}, timeout=10
    ).json()
    assert decision["status"] == "ok" and decision["failovers"] == 1
    (replan,) = decision["replans"]
    (spare,) = replan["replaced_by"]
    totals = _settlement(grid)
    served_by_victim, served_by_spare = totals[victim]["tokens"], totals[spare]["tokens"]
    assert served_by_victim > 0 and served_by_spare > 0
    assert served_by_victim + served_by_spare == 200  # every token paid once on the [1, 2) layers
    assert totals[chain[0]]["tokens"] == 200
    metrics = httpx.get(grid.url + "/metrics", timeout=10).text
    assert _metric(metrics, "gridserve_failovers_total") == 1
