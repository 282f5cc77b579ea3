"""Issue 17's sampled-answer attack from the outside: an operator written from docs/protocol.md alone
(tests/hostile.py's `AlteringNode`: no gridserve code) claims gridserve-tiny with its attested digest and answers
every request with text of its own, in a well-formed stream with a receipt true to what it sent. Through the
official OpenAI SDK, clients send sampled requests without a seed, as most do. The gateway gives each one a seed of
its own (the node sees it; the client never does), so the audit re-executes the sampled answer token by token: the
first audited answer quarantines the operator with the evidence, and the next request goes to an honest node."""

import time
from collections.abc import Iterator
from typing import Any

import pytest
from openai import OpenAI
from tests.conftest import API_KEY, admin_get, make_grid
from tests.hostile import ALTERED, TINY_DIGEST, TINY_MODEL, AlteringNode

from gridserve.cli.grid import LocalGrid
from gridserve.trust import proofs

AUDIT_WAIT_S = 90.0
"""How long an answer's audit may take to show: the verifier's child process imports torch and loads the model for
the first one (tests/grid/test_sampled_audits.py)."""


@pytest.fixture(scope="module")
def altered(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalGrid, AlteringNode]]:
    gateway = ["--audit-rate", "1", "--canary-interval", "0"]  # every answer audited; no canaries: clients' traffic
    grid = make_grid(tmp_path_factory.mktemp("altered"), ["tiny"], threads=1, extra_gateway_args=gateway)
    node = AlteringNode()
    try:
        grid.start_gateway()
        node.join(grid.url, TINY_MODEL, TINY_DIGEST)
        grid.wait_nodes(1, 30)
        yield grid, node
    finally:
        node.close()
        grid.stop()


def _record(grid: LocalGrid, node_id: str) -> dict[str, Any]:
    return next(n for n in grid.nodes() if n["node_id"] == node_id)


def test_an_outside_operator_altering_sampled_answers_is_quarantined_by_their_audit(
    altered: tuple[LocalGrid, AlteringNode],
) -> None:
    grid, node = altered
    client = OpenAI(base_url=grid.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)
    ask = {"model": TINY_MODEL, "prompt": "Tell me about the grid", "max_tokens": 12, "temperature": 0.9}
    raw = client.completions.with_raw_response.create(**ask, top_p=0.95, extra_body={"gridserve": {"hedge": False}})
    assert raw.headers["x-gridserve-node"] == node.node_id
    assert raw.parse().choices[0].text == ALTERED[:12]  # delivered: audits run after the answer, off its path
    assert "seed" not in raw.text
    (sampling,) = node.served
    assert sampling["temperature"] == 0.9 and isinstance(sampling["seed"], int)  # the gateway's own draw

    deadline = time.monotonic() + AUDIT_WAIT_S
    incidents: list[dict[str, Any]] = []
    while time.monotonic() < deadline and not incidents:
        incidents = admin_get(grid, f"/admin/incidents?node_id={node.node_id}").json()["incidents"]
        time.sleep(0.2)
    assert incidents, "the altered sampled answer was not caught"
    (incident,) = incidents
    assert incident["severity"] == "severe", incident
    # (which token first misses the seed's draw varies: the node's first one is the draw in ~1% of seeds)
    assert "audit: sampled token " in incident["detail"] and "not the seed's draw" in incident["detail"], incident
    assert ("no activation proof" in incident["detail"]) == proofs.AVAILABLE, incident
    assert _record(grid, node.node_id)["reliability"]["state"] == "quarantined"
    audits = [a for a in admin_get(grid, "/admin/audits").json()["recent"] if a["node_id"] == node.node_id]
    assert [a["request_id"] for a in audits] == [raw.parse().id] and audits[0]["problems"], audits

    grid.start_node(0, "tiny")  # an honest node: the grid's traffic goes there now, none to the quarantined one
    grid.wait_nodes(2, 120)
    for i in range(3):
        again = client.completions.with_raw_response.create(**ask, seed=i)
        assert again.headers["x-gridserve-node"] != node.node_id
        assert again.parse().choices[0].text != ALTERED[:12]
    assert len(node.served) == 1
