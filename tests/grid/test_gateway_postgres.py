"""The gateway on PostgreSQL: same behaviour as on the embedded SQLite store; decisions land in PostgreSQL."""

from pathlib import Path

from openai import OpenAI
from tests.conftest import API_KEY, PG, admin_get, make_grid, pg_url

from gridserve.cli.grid import LocalGrid
from gridserve.engines.tiny import TINY_MODEL
from gridserve.store import Store


def test_gateway_runs_on_postgres(tmp_path: Path, pg_schema: str) -> None:
    schema = pg_schema
    url = pg_url(schema)
    grid: LocalGrid = make_grid(tmp_path, ["tiny"], extra_gateway_args=["--db", url], threads=1)
    try:
        grid.start(timeout_s=120)
        client = OpenAI(base_url=grid.url + "/v1", api_key=API_KEY, max_retries=0)
        raw = client.completions.with_raw_response.create(model=TINY_MODEL, prompt="pg", max_tokens=3, temperature=0)
        decision_id = raw.headers["x-gridserve-decision"]
        assert admin_get(grid, f"/v1/decisions/{decision_id}").json()["status"] == "ok"
    finally:
        grid.stop()  # a clean stop flushes pending decision writes
    store = Store(PG, schema=schema)
    try:
        stored = store.get_decision(decision_id)
        assert stored is not None and stored["status"] == "ok" and stored["node_id"] == raw.headers["x-gridserve-node"]
        nodes = store.list_nodes()
        assert [n["node_id"] for n in nodes] == [raw.headers["x-gridserve-node"]]
        assert nodes[0]["capability"]["models"][0]["name"] == TINY_MODEL
    finally:
        store.close()
