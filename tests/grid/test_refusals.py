"""A node that refuses requests as invalid with its own text (issue 17's hostile operator, written from the protocol
docs alone: tests/hostile.py): through the official OpenAI SDK, every request is still served by the honest node
and no client ever sees the node's text; the refusing node is charged a failed job for each refusal another node
proved wrong, and for each canary it refuses."""

from collections.abc import Iterator
from importlib import resources

import httpx
import pytest
from openai import OpenAI
from tests.conftest import ADMIN, API_KEY, admin_get, make_grid
from tests.hostile import REFUSAL, TINY_DIGEST, TINY_MODEL, RefusingNode

from gridserve.cli.grid import LocalGrid

REQUESTS = 6


@pytest.fixture(scope="module")
def refusals(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalGrid, RefusingNode]]:
    # round robin: of any two requests one goes to the refusing node first, whatever the scores say; no audits or
    # background canaries (they would take round-robin turns, and charge the refusing node before requests do)
    round_robin = resources.files("gridserve.scheduler").joinpath("profiles/round-robin.yaml")
    gateway = ["--profile", str(round_robin), "--audit-rate", "0", "--canary-interval", "0"]
    grid = make_grid(tmp_path_factory.mktemp("refusals"), ["tiny"], threads=1, extra_gateway_args=gateway)
    refusing = RefusingNode()
    try:
        grid.start_gateway()
        grid.start_node(0, "tiny")
        grid.wait_nodes(1, 120)
        refusing.join(grid.url, TINY_MODEL, TINY_DIGEST)
        grid.wait_nodes(2, 30)
        yield grid, refusing
    finally:
        refusing.close()
        grid.stop()


def _honest(grid: LocalGrid, refusing: RefusingNode) -> str:
    (honest,) = [str(n["node_id"]) for n in grid.nodes() if n["node_id"] != refusing.node_id]
    return honest


def _failed_jobs(grid: LocalGrid, node_id: str) -> list[str]:
    events = admin_get(grid, f"/admin/events?node_id={node_id}&kind=job_failed&limit=50").json()["events"]
    return [str(e["detail"]) for e in events]


def test_refusals_never_reach_the_client_and_cost_the_refusing_node(refusals: tuple[LocalGrid, RefusingNode]) -> None:
    grid, refusing = refusals
    client = OpenAI(base_url=grid.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)
    refuser, honest = refusing.node_id, _honest(grid, refusing)
    served_by, decisions = [], []
    for i in range(REQUESTS):
        raw = client.completions.with_raw_response.create(
            model=TINY_MODEL,
            prompt=f"refusal {i}",
            max_tokens=4,
            temperature=0,
            extra_body={"gridserve": {"hedge": False}},
        )
        assert REFUSAL not in raw.text and "evil" not in raw.text
        served_by.append(raw.headers["x-gridserve-node"])
        decisions.append(raw.headers["x-gridserve-decision"])
    assert set(served_by) == {honest}
    assert refusing.refused >= REQUESTS // 2  # round robin: every other request was tried on it first
    why = [admin_get(grid, f"/v1/decisions/{d}").json() for d in decisions]
    assert any("refused as invalid a request another node served" in d for d in _failed_jobs(grid, refuser)), [
        (w.get("attempts"), w.get("explanation")) for w in why
    ]


def test_a_refused_canary_is_a_failed_job(refusals: tuple[LocalGrid, RefusingNode]) -> None:
    grid, refusing = refusals
    refuser = refusing.node_id
    before = refusing.refused
    resp = httpx.post(
        grid.url + f"/admin/canary?node_id={refuser}", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=60
    )
    verdict = resp.json()
    assert resp.status_code == 200 and not verdict["ok"], verdict
    assert "refused a canary" in verdict["problems"][0], verdict
    assert refusing.refused == before + 1
    assert any("refused a canary (a valid request) as invalid" in d for d in _failed_jobs(grid, refuser))
