"""Structured JSON logs carry request and decision ids; metrics count decisions and filter rejections."""

import json
from pathlib import Path

import httpx
import pytest
from openai import OpenAI
from tests.conftest import API_KEY, admin_get, make_grid

from gridserve.engines.tiny import TINY_MODEL


def test_json_logs_and_metrics(tmp_path: Path) -> None:
    grid = make_grid(
        tmp_path, ["tiny", "emulated:t4"], threads=1, extra_gateway_args=["--log-format", "json", "--log-level", "info"]
    )
    try:
        grid.start(timeout_s=120)
        client = OpenAI(base_url=grid.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)
        raw = client.completions.with_raw_response.create(model=TINY_MODEL, prompt="log me", max_tokens=3)
        request_id, decision_id = raw.parse().id, raw.headers["x-gridserve-decision"]
        with pytest.raises(Exception, match="price"):  # every node is above this ceiling
            client.completions.create(
                model=TINY_MODEL, prompt="x", max_tokens=2, extra_body={"gridserve": {"max_price_per_mtok": 1e-9}}
            )
    finally:
        grid.stop()
    lines = (tmp_path / "logs" / "gateway.log").read_text().splitlines()
    records = [json.loads(line) for line in lines if line.startswith("{")]
    assert records and all({"time", "level", "logger", "message"} <= r.keys() for r in records)
    mine = [r for r in records if r.get("request_id") == request_id]
    assert {r["message"].split()[0] for r in mine} == {"dispatched", "finished"}
    assert all(r["decision_id"] == decision_id and r["node_id"].startswith("n") for r in mine)
    assert any(r["logger"].startswith("uvicorn") for r in records)  # the server's own records are JSON too


def test_metrics_count_decisions_and_rejections_per_filter(tiny_grid) -> None:  # type: ignore[no-untyped-def]
    client = OpenAI(base_url=tiny_grid.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)
    # greedy, 8 tokens: an answer of one token has no inter-token latency to count (a sampled answer, with the seed
    # the gateway draws, ended at its first token now and then, and the ITL assertion below failed)
    raw = client.completions.with_raw_response.create(model=TINY_MODEL, prompt="count me", max_tokens=8, temperature=0)
    decision = admin_get(tiny_grid, "/v1/decisions/" + raw.headers["x-gridserve-decision"]).json()
    text = httpx.get(tiny_grid.url + "/metrics", timeout=10).text
    values = {line.split(" ")[0]: float(line.split()[-1]) for line in text.splitlines() if not line.startswith("#")}
    assert values['gridserve_decisions_total{outcome="placed"}'] >= 1
    # the emulated node of the shared grid does not serve the tiny model: the model filter removes it, unless the
    # node-state filter (which comes first) already had (a node slow to answer its probes on a busy machine)
    (emulated_id,) = [n["node_id"] for n in tiny_grid.nodes() if n["emulated"]]
    emulated = [r for r in decision["rejections"] if r["node_id"] == emulated_id]
    assert [r["filter"] for r in emulated] in (["model-served"], ["node-state"]), decision["rejections"]
    for rejection in decision["rejections"]:  # every filter that rejected a node in this decision is counted
        assert values[f'gridserve_filter_rejections_total{{filter="{rejection["filter"]}"}}'] >= 1
    assert any(k.startswith("gridserve_ttft_seconds_bucket{") and 'model="gridserve-tiny"' in k for k in values)
    assert raw.parse().usage.completion_tokens >= 2  # (else no ITL: the test would prove nothing about it)
    assert any(k.startswith("gridserve_itl_seconds_count{") for k in values)
    assert 'gridserve_nodes{state="up"}' in values
