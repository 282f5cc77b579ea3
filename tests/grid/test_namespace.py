"""The model namespace is the grid operator's (issue 17): on a gateway started as a production one (no
--allow-emulated), hostile nodes written from the protocol docs (tests/hostile.py) cannot register a model the
grid does not list, nor an emulated one, nor list unlisted names as loadable; `/v1/models` shows only what the
operator listed and a real node serves."""

import itertools
import time
from collections.abc import Iterator

import httpx
import pytest
from tests.conftest import API_KEY, admin_get, make_grid
from tests.hostile import HostileNode, post

from gridserve.cli.grid import LocalGrid
from gridserve.engines.tiny import TINY_MODEL


@pytest.fixture(scope="module")
def production(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalGrid]:
    grid = make_grid(tmp_path_factory.mktemp("namespace"), ["tiny"], threads=1, allow_emulated=False)
    try:
        grid.start(timeout_s=120)
        yield grid
    finally:
        grid.stop()


def _models(grid: LocalGrid) -> list[dict[str, object]]:
    resp = httpx.get(grid.url + "/v1/models", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=10)
    return list(resp.json()["data"])


def test_a_model_the_grid_does_not_list_cannot_be_registered(production: LocalGrid) -> None:
    resp = HostileNode().register(production.url, ["gpt-4o"], digest="sha256:" + "0" * 64)
    assert resp.status_code == 401 and resp.json()["error"]["type"] == "unlisted_model", resp.text
    assert "gpt-4o" in resp.json()["error"]["message"] and "--allowed-digests" in resp.json()["error"]["message"]
    assert [m["id"] for m in _models(production)] == [TINY_MODEL]


def test_an_emulated_model_needs_a_gateway_started_for_tests(production: LocalGrid) -> None:
    resp = HostileNode().register(production.url, ["llama-3-8b"])  # digest emulated:llama-3-8b
    assert resp.status_code == 401 and resp.json()["error"]["type"] == "unattested_weights", resp.text
    assert "--allow-emulated" in resp.json()["error"]["message"]


def test_unlisted_names_as_loadable_or_stage_models_are_refused(production: LocalGrid) -> None:
    for field in ("loadable_models", "stage_models"):
        hostile = HostileNode()
        resp = hostile.register(production.url, [TINY_MODEL], digest="seed:20261123", **{field: ["gpt-4o"]})
        assert resp.status_code == 401 and resp.json()["error"]["type"] == "unlisted_model", (field, resp.text)
    assert [m["id"] for m in _models(production)] == [TINY_MODEL]
    assert all(m["emulated"] is False for m in _models(production))


def test_an_identity_claiming_another_nodes_endpoint_fails_its_probes_and_is_quarantined(production: LocalGrid) -> None:
    """One endpoint, one identity: the honest node signs each probe's challenge with its own key, so a fresh key
    registered with its address (and heartbeating, to look alive) is caught at the first probe."""
    honest = production.nodes()[0]
    hostile = HostileNode()
    resp = hostile.register(production.url, [TINY_MODEL], endpoint=honest["endpoint"], digest="seed:20261123")
    assert resp.status_code == 200, resp.text
    deadline = time.monotonic() + 20
    state = ""
    for seq in itertools.count(1):
        beat = {"node_id": hostile.node_id, "seq": seq, "telemetry": {}}
        post(production.url, "/nodes/heartbeat", hostile.envelope(beat, "heartbeat"))
        record = next(n for n in production.nodes() if n["node_id"] == hostile.node_id)
        state = record["reliability"]["state"]
        if state == "quarantined" or time.monotonic() > deadline:
            break
        time.sleep(0.25)
    assert state == "quarantined", record
    incidents = admin_get(production, f"/admin/incidents?node_id={hostile.node_id}").json()["incidents"]
    assert "answers health probes for another identity" in incidents[0]["detail"], incidents
    assert admin_get(production, f"/admin/incidents?node_id={honest['node_id']}").json()["incidents"] == []
    mine = next(n for n in production.nodes() if n["node_id"] == honest["node_id"])
    assert mine["state"] == "up" and mine["reliability"]["state"] == "healthy", mine
