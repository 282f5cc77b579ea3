"""Every answer verifiable (issue 17): the gateway gives every sampled request a seed of its own, so the verifier
re-executes sampled answers token by token like greedy ones. Through the official OpenAI SDK: a node that alters
sampled answers is caught by the audit of client traffic and quarantined, honest sampled answers pass, and a canary
to a node that accepts and goes silent returns a failed verdict within its bound."""

import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from openai import OpenAI
from tests.conftest import ADMIN, API_KEY, admin_get, make_grid

from gridserve.cli.grid import LocalGrid
from gridserve.engines.tiny import TINY_MODEL

CANARY_TIMEOUT_S = 3.0
AUDIT_WAIT_S = 90.0
"""How long an answer's audit may take to show: the verifier's child process imports torch and loads the model for
the first one, which took over 20 s on a fresh clone's loaded machine (a second altered answer was then sent and
audited, and two severe incidents banned the node where one quarantines it)."""
ALTERING, HONEST, STALLING = 0, 1, 2
"""The nodes by index: the altering node serves alone first (client traffic reaches no other), then two honest
nodes join, one of which is told to stall."""


@pytest.fixture(scope="module")
def grid(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalGrid]:
    gateway = ["--audit-rate", "1", "--canary-interval", "0", "--canary-timeout", str(CANARY_TIMEOUT_S)]
    grid = make_grid(tmp_path_factory.mktemp("sampled"), ["tiny"] * 3, threads=1, extra_gateway_args=gateway)
    try:
        grid.start_gateway()
        grid.start_node(ALTERING, "tiny", ["--allow-dishonest", "--dishonest", "alter_output"])
        grid.wait_nodes(1, 120)
        yield grid
    finally:
        grid.stop()


@pytest.fixture(scope="module")
def honest_nodes(grid: LocalGrid) -> LocalGrid:
    grid.start_node(HONEST, "tiny")
    grid.start_node(STALLING, "tiny", ["--allow-faults"])
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not all(_node(grid, i, up=True) for i in (HONEST, STALLING)):
        time.sleep(0.3)
    assert all(_node(grid, i, up=True) for i in (HONEST, STALLING)), grid.nodes()
    return grid


def _node(grid: LocalGrid, index: int, up: bool = False) -> dict[str, Any]:
    port = str(grid.node_port(index))
    found = [n for n in grid.nodes() if n["endpoint"].rsplit(":", 1)[1] == port]
    return found[0] if found and (not up or found[0]["state"] == "up") else {}


def _incidents(grid: LocalGrid, node_id: str) -> list[dict[str, Any]]:
    return list(admin_get(grid, f"/admin/incidents?node_id={node_id}").json()["incidents"])


def _client(grid: LocalGrid) -> OpenAI:
    return OpenAI(base_url=grid.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


def test_a_node_altering_sampled_answers_is_caught_by_the_audit_of_client_traffic(grid: LocalGrid) -> None:
    altering = _node(grid, ALTERING)["node_id"]
    client = _client(grid)
    incidents: list[dict[str, Any]] = []
    served = 0
    for i in range(8):  # temperature > 0 and no seed, as most clients send
        raw = client.completions.with_raw_response.create(
            model=TINY_MODEL,
            prompt=f"Tell me about the grid, part {i}",
            max_tokens=16,
            temperature=0.9,
            top_p=0.95,
            extra_body={"gridserve": {"hedge": False}},
        )
        assert raw.headers["x-gridserve-node"] == altering
        assert "seed" not in raw.text  # the gateway's seed stays between it and the node
        served += 1
        deadline = time.monotonic() + AUDIT_WAIT_S  # the audit runs off the request path
        while time.monotonic() < deadline and not incidents:
            audited = _audited(grid, raw.parse().id)  # (first: an audit that ends between the two reads is seen)
            incidents = _incidents(grid, altering)
            if audited:
                break
            time.sleep(0.2)
        if incidents:
            break
    assert incidents, f"{served} altered sampled answers, none caught"
    assert incidents[0]["severity"] == "severe" and "audit: sampled token" in incidents[0]["detail"], incidents
    assert _node(grid, ALTERING)["reliability"]["state"] == "quarantined"


def _all_pass_their_audits(grid: LocalGrid, ids: list[str], honest: set[str], within_s: float) -> None:
    """Every answer in `ids` is audited (the audits run off the request path) and passes; no incident at the
    honest nodes."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline and not all(_audited(grid, r) for r in ids):
        time.sleep(0.2)
    recent = {r["request_id"]: r for r in admin_get(grid, "/admin/audits").json()["recent"]}
    results = [recent[r] for r in ids if r in recent]
    assert len(results) == len(ids) and all(not r["problems"] for r in results), results
    assert all(_incidents(grid, node_id) == [] for node_id in honest)


def _audited(grid: LocalGrid, request_id: str) -> bool:
    return any(r["request_id"] == request_id for r in admin_get(grid, "/admin/audits").json()["recent"])


def test_honest_sampled_answers_pass_their_audits(honest_nodes: LocalGrid) -> None:
    grid = honest_nodes
    honest = {_node(grid, HONEST)["node_id"], _node(grid, STALLING)["node_id"]}  # (it stalls only when told)
    client = _client(grid)
    texts, ids = [], []
    for _ in range(6):
        raw = client.completions.with_raw_response.create(
            model=TINY_MODEL,
            prompt="The same prompt every time",
            max_tokens=12,
            temperature=1.0,
            extra_body={"gridserve": {"hedge": False}},
        )
        texts.append(raw.parse().choices[0].text)
        if raw.headers["x-gridserve-node"] in honest:  # (the altering node, if not yet quarantined, is not)
            ids.append(raw.parse().id)
    assert len(set(texts)) > 1  # still sampled: a fresh seed per request
    assert len(ids) >= 3
    _all_pass_their_audits(grid, ids, honest, within_s=30)


def test_answers_under_vllms_sampling_extensions_pass_their_audits(honest_nodes: LocalGrid) -> None:
    """top_k, repetition_penalty, min_tokens and ignore_eos reach the node and the verifier alike: every audited
    answer passes, and an ignore_eos answer runs to max_tokens (as benchmark clients expect)."""
    grid = honest_nodes
    honest = {_node(grid, HONEST)["node_id"], _node(grid, STALLING)["node_id"]}
    client = _client(grid)
    asks: list[dict[str, Any]] = [
        {"ignore_eos": True},
        {"min_tokens": 10, "top_k": 20},
        {"repetition_penalty": 1.3, "ignore_eos": True},
        {"top_k": 5, "min_tokens": 16},
    ]
    ids = []
    for i, extensions in enumerate(asks * 2):
        raw = client.completions.with_raw_response.create(
            model=TINY_MODEL,
            prompt=f"Extensions {i}",
            max_tokens=16,
            temperature=0.0 if i % 2 else 1.0,
            extra_body={**extensions, "gridserve": {"hedge": False}},
        )
        answer = raw.parse()
        assert answer.usage is not None
        if extensions.get("ignore_eos") or extensions.get("min_tokens") == 16:
            assert (answer.usage.completion_tokens, answer.choices[0].finish_reason) == (16, "length"), extensions
        else:
            assert answer.usage.completion_tokens >= extensions["min_tokens"], extensions
        if raw.headers["x-gridserve-node"] in honest:
            ids.append(answer.id)
    assert len(ids) >= len(asks), "most answers came from the honest nodes"
    _all_pass_their_audits(grid, ids, honest, within_s=60)


def test_a_canary_to_a_node_that_goes_silent_fails_within_its_bound(honest_nodes: LocalGrid) -> None:
    grid = honest_nodes
    stalling = _node(grid, STALLING)
    httpx.post(stalling["endpoint"] + "/faults", json={"stall_after_tokens": 0}, timeout=5).raise_for_status()
    try:
        started = time.monotonic()
        resp = httpx.post(
            grid.url + f"/admin/canary?node_id={stalling['node_id']}",
            headers={"Authorization": f"Bearer {ADMIN}"},
            timeout=60,
        )
        took = time.monotonic() - started
    finally:
        httpx.delete(stalling["endpoint"] + "/faults", timeout=5).raise_for_status()
    verdict = resp.json()
    assert resp.status_code == 200 and not verdict["ok"], verdict
    assert verdict["problems"][0].startswith("canary:"), verdict
    assert took < CANARY_TIMEOUT_S + 5, took
    events = admin_get(grid, f"/admin/events?node_id={stalling['node_id']}&kind=job_failed&limit=20").json()
    assert any("canary within" in str(e["detail"]) for e in events["events"]), (verdict, events)
