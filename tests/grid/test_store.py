"""Tests for gridserve.store on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import logging
import os
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gridserve.store import Store, StoreWriter, default_sqlite_url
from gridserve.store.db import metadata

PG_URL = os.environ.get("GRIDSERVE_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
SKIP_PG = os.environ.get("GRIDSERVE_SKIP_PG") == "1"

BACKENDS = [
    pytest.param("sqlite", id="sqlite"),
    pytest.param("postgresql", id="postgresql", marks=pytest.mark.skipif(SKIP_PG, reason="GRIDSERVE_SKIP_PG=1")),
]


def _drop_pg_schema(schema: str) -> None:
    engine = sa.create_engine(PG_URL, poolclass=sa.NullPool)
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        engine.dispose()


@pytest.fixture(params=BACKENDS)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    # A PostgreSQL connection failure raises here, so the test errors out instead of being skipped.
    if request.param == "sqlite":
        s = Store(default_sqlite_url(tmp_path / "data"))
        s.migrate()
        yield s
        s.close()
        return
    schema = f"gs_test_{uuid.uuid4().hex}"
    s = Store(PG_URL, schema=schema)
    try:
        s.migrate()
        yield s
    finally:
        s.close()
        _drop_pg_schema(schema)


def _scalar(s: Store, sql: str) -> Any:
    with s.engine.connect() as conn:
        return conn.exec_driver_sql(sql).scalar()


# -- schema / migrations ---------------------------------------------------------------------------------


def test_migrate_twice_is_fine(store: Store) -> None:
    store.upsert_node("n1", public_key="k", capability={}, state="up", at=1.0)
    store.migrate()
    store.migrate()
    assert _scalar(store, "SELECT version_num FROM alembic_version") == "0009"
    tables = set(sa.inspect(store.engine).get_table_names())
    assert {"nodes", "node_events", "decisions", "settlements", "join_tokens", "responses", "alembic_version"} <= tables
    assert [n["node_id"] for n in store.list_nodes()] == ["n1"]


def test_migrations_match_table_metadata(store: Store) -> None:
    with store.engine.connect() as conn:
        diffs = compare_metadata(MigrationContext.configure(conn), metadata)
    assert diffs == []


@pytest.mark.skipif(SKIP_PG, reason="GRIDSERVE_SKIP_PG=1")
def test_postgres_schema_isolates_tables() -> None:
    schema = f"gs_test_{uuid.uuid4().hex}"
    s = Store(PG_URL, schema=schema)
    try:
        s.migrate()
        sql = f"SELECT count(*) FROM information_schema.tables WHERE table_schema = '{schema}'"
        # nodes, node_events, decisions, settlements, join_tokens, responses, api_keys, key_usage, key_leases,
        # alembic_version
        assert _scalar(s, sql) == 10
    finally:
        s.close()
        _drop_pg_schema(schema)


def test_postgres_rejects_bad_schema_name() -> None:
    with pytest.raises(ValueError, match="invalid schema"):
        Store(PG_URL, schema='x"; DROP TABLE y; --')


def test_default_sqlite_url_creates_dir(tmp_path: Path) -> None:
    data_dir = tmp_path / "a" / "b"
    url = default_sqlite_url(data_dir)
    assert data_dir.is_dir()
    assert sa.make_url(url).database == str((data_dir / "gridserve.db").resolve())
    s = Store(url)
    s.migrate()
    s.close()
    assert (data_dir / "gridserve.db").is_file()


def test_sqlite_pragmas(tmp_path: Path) -> None:
    s = Store(default_sqlite_url(tmp_path))
    try:
        assert _scalar(s, "PRAGMA journal_mode") == "wal"
        assert _scalar(s, "PRAGMA foreign_keys") == 1
        assert _scalar(s, "PRAGMA busy_timeout") == 5000
        assert _scalar(s, "PRAGMA synchronous") == 1  # NORMAL
    finally:
        s.close()


def test_unsupported_backend_rejected() -> None:
    with pytest.raises(ValueError, match="unsupported"):
        Store("mysql://u@localhost/db")


# -- nodes -----------------------------------------------------------------------------------------------


def test_node_round_trip(store: Store) -> None:
    cap = {"gpus": [{"name": "H100", "vram_gb": 80}], "engines": ["llama.cpp"], "cuda": True}
    store.upsert_node("n2", public_key="pk2", capability={"gpus": []}, state="joining", at=10.0)
    store.upsert_node("n1", public_key="pk1", capability=cap, state="joining", at=11.0, address="198.51.100.7")
    assert store.get_node("missing") is None
    assert store.node_origins(limit=5) == [  # newest registration first
        {"node_id": "n1", "capability": cap, "address": "198.51.100.7"},
        {"node_id": "n2", "capability": {"gpus": []}, "address": None},
    ]
    assert [n["node_id"] for n in store.node_origins(limit=1)] == ["n1"]

    store.set_node_state("n1", "ready", at=12.0)
    store.touch_node("n1", telemetry={"util": 3, "temps": [40, 41]}, at=13.5)
    n1 = store.get_node("n1")
    assert n1 == {
        "node_id": "n1",
        "public_key": "pk1",
        "capability": cap,
        "state": "ready",
        "registered_at": 11.0,
        "last_seen": 13.5,
        "telemetry": {"util": 3, "temps": [40, 41]},
        "capability_at": 11.0,
        "gateway": None,
        "address": "198.51.100.7",
    }
    listed = store.list_nodes()
    assert [n["node_id"] for n in listed] == ["n1", "n2"]
    assert listed[0] == n1
    assert listed[1]["telemetry"] is None and listed[1]["state"] == "joining"


def test_node_reregister_keeps_registered_at(store: Store) -> None:
    store.upsert_node("n1", public_key="old", capability={"v": 1}, state="ready", at=5.0)
    store.touch_node("n1", telemetry={"t": 1}, at=6.0)
    store.upsert_node("n1", public_key="new", capability={"v": 2}, state="joining", at=20.0)
    node = store.get_node("n1")
    assert node is not None
    assert (node["public_key"], node["capability"], node["state"]) == ("new", {"v": 2}, "joining")
    assert node["registered_at"] == 5.0
    assert node["last_seen"] == 20.0
    assert len(store.list_nodes()) == 1


def test_updates_to_unknown_node_are_noops(store: Store) -> None:
    store.set_node_state("ghost", "dead", at=1.0)
    store.touch_node("ghost", telemetry={}, at=1.0)
    assert store.get_node("ghost") is None
    assert store.list_nodes() == []


# -- events ----------------------------------------------------------------------------------------------


def test_events_filtered_ordered_and_limited(store: Store) -> None:
    rows = [
        ("join", "a", 1.0),
        ("fault", "a", 2.0),
        ("join", "b", 3.0),
        ("fault", None, 4.0),
        ("fault", "a", 5.0),
    ]
    for kind, node, at in rows:
        store.record_event(kind=kind, severity="info", node_id=node, detail={"at": at, "n": node}, at=at)

    assert [e["at"] for e in store.list_events()] == [5.0, 4.0, 3.0, 2.0, 1.0]
    assert [e["at"] for e in store.list_events(limit=2)] == [5.0, 4.0]
    assert [e["at"] for e in store.list_events(kind="fault")] == [5.0, 4.0, 2.0]
    assert [e["at"] for e in store.list_events(node_id="a")] == [5.0, 2.0, 1.0]
    assert [e["at"] for e in store.list_events(kind="fault", node_id="a", limit=1)] == [5.0]
    assert store.list_events(kind="nope") == []

    newest = store.list_events(limit=1)[0]
    assert set(newest) == {"id", "kind", "severity", "node_id", "detail", "at", "origin"}
    assert newest["detail"] == {"at": 5.0, "n": "a"}
    assert newest["kind"] == "fault" and newest["node_id"] == "a" and newest["severity"] == "info"


def test_events_same_time_newest_insert_first(store: Store) -> None:
    for i in range(3):
        store.record_event(kind="k", severity="warn", node_id=None, detail={"i": i}, at=7.0)
    assert [e["detail"]["i"] for e in store.list_events()] == [2, 1, 0]


def test_concurrent_direct_writers(store: Store) -> None:
    errors: list[BaseException] = []

    def work(t: int) -> None:
        try:
            for i in range(40):
                store.record_event(kind="conc", severity="info", node_id=f"t{t}", detail={"i": i}, at=float(i))
                store.list_events(node_id=f"t{t}", limit=1)
        except BaseException as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == []
    assert len(store.list_events(kind="conc", limit=1000)) == 160


# -- decisions -------------------------------------------------------------------------------------------


def test_decision_upsert_keeps_created_at(store: Store) -> None:
    assert store.get_decision("d1") is None
    store.record_decision(
        "d1", request_id="r1", model="gemma", node_id="n1", status="scheduled", data={"score": 1}, at=100.0
    )
    first = store.get_decision("d1")
    assert first is not None
    assert first["status"] == "scheduled" and first["created_at"] == first["updated_at"] == 100.0

    store.record_decision(
        "d1", request_id="r1", model="gemma", node_id="n2", status="done", data={"tokens": 42}, at=103.25
    )
    assert store.get_decision("d1") == {
        "decision_id": "d1",
        "request_id": "r1",
        "model": "gemma",
        "node_id": "n2",
        "status": "done",
        "data": {"tokens": 42},
        "created_at": 100.0,
        "updated_at": 103.25,
    }


# -- writer ----------------------------------------------------------------------------------------------


def test_writer_flush_makes_writes_visible(store: Store) -> None:
    writer = StoreWriter(store)
    try:
        writer.submit(store.upsert_node, "n1", public_key="k", capability={}, state="up", at=1.0)
        writer.submit(store.record_event, kind="join", severity="info", node_id="n1", detail={}, at=1.0)
        assert writer.flush(timeout=10.0)
        assert store.get_node("n1") is not None
        assert len(store.list_events(node_id="n1")) == 1
    finally:
        writer.close()


def test_writer_close_drains_queue(store: Store) -> None:
    writer = StoreWriter(store)
    for i in range(500):
        writer.submit(store.record_event, kind="bulk", severity="info", node_id=None, detail={"i": i}, at=i)
    writer.close()
    events = store.list_events(kind="bulk", limit=1000)
    assert len(events) == 500
    assert [e["detail"]["i"] for e in events] == list(range(499, -1, -1))
    with pytest.raises(RuntimeError):
        writer.submit(store.record_event, kind="late", severity="info", node_id=None, detail={}, at=0.0)
    writer.close()  # idempotent


def test_writer_flush_times_out_while_blocked(store: Store) -> None:
    writer = StoreWriter(store)
    gate = threading.Event()

    def blocked() -> None:
        gate.wait(10)

    writer.submit(blocked)
    try:
        assert writer.flush(timeout=0.05) is False
    finally:
        gate.set()
        writer.close()
    assert writer.flush(timeout=1.0)


def test_writer_logs_errors_and_continues(store: Store, caplog: pytest.LogCaptureFixture) -> None:
    def boom() -> None:
        raise RuntimeError("kaboom")

    writer = StoreWriter(store)
    with caplog.at_level(logging.ERROR, logger="gridserve.store"):
        writer.submit(boom)
        writer.submit(store.record_event, kind="after", severity="info", node_id=None, detail={}, at=1.0)
        assert writer.flush()
    writer.close()
    assert len(store.list_events(kind="after")) == 1
    failures = [r for r in caplog.records if r.name == "gridserve.store" and r.levelno == logging.ERROR]
    assert len(failures) == 1
    assert "boom" in failures[0].getMessage() and "kaboom" in (failures[0].exc_text or "")


# -- property: JSON details round-trip -------------------------------------------------------------------

_json_leaf = st.none() | st.booleans() | st.integers() | st.text()
_json = st.recursive(
    _json_leaf,
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(), kids, max_size=4),
    max_leaves=12,
)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(detail=st.dictionaries(st.text(), _json, max_size=5))
def test_event_detail_round_trips(store: Store, detail: dict[str, Any]) -> None:
    kind = f"prop-{uuid.uuid4().hex}"
    store.record_event(kind=kind, severity="info", node_id="n", detail=detail, at=1.0)
    [event] = store.list_events(kind=kind)
    assert event["detail"] == detail


def test_settlement_ledger_totals_and_disputes(store: Store) -> None:
    row = {
        "decision_id": "d1",
        "request_id": "r1",
        "node_id": "n1",
        "model": "m",
        "tokens": 10,
        "claimed_tokens": 10,
        "price_per_mtok": 2.0,
        "amount_usd": 2e-5,
        "status": "ok",
        "detail": "",
        "at": 1.0,
    }
    disputed = {**row, "decision_id": "d2", "claimed_tokens": 20, "status": "disputed", "detail": "claims 20"}
    store.record_settlements([row, disputed, {**row, "node_id": "n2", "tokens": 5, "amount_usd": 1e-5}])
    report = store.settlement_report()
    by_node = {t["node_id"]: t for t in report["totals"]}
    assert by_node["n1"]["requests"] == 2 and by_node["n1"]["tokens"] == 20 and by_node["n1"]["disputed"] == 1
    assert by_node["n2"]["tokens"] == 5 and by_node["n2"]["disputed"] == 0
    assert [d["decision_id"] for d in report["disputed"]] == ["d2"]


def test_heartbeats_are_written_as_one_batch(store: Store) -> None:
    for name in ("n1", "n2"):
        store.upsert_node(name, public_key="pk-" + name, capability={}, state="ready", at=1.0)
    store.touch_nodes(
        [
            {"node_id": "n1", "telemetry": {"util": 1}, "at": 5.0},
            {"node_id": "n2", "telemetry": {"util": 2}, "at": 6.0},
            {"node_id": "ghost", "telemetry": {}, "at": 7.0},
        ]
    )
    n1, n2 = store.get_node("n1"), store.get_node("n2")
    assert n1 is not None and n1["last_seen"] == 5.0 and n1["telemetry"] == {"util": 1}
    assert n2 is not None and n2["last_seen"] == 6.0 and n2["telemetry"] == {"util": 2}
    assert store.get_node("ghost") is None


# -- responses (gateway/api/responses_api.py) -----------------------------------------------------------------


def _say(text: str, role: str = "user") -> dict[str, Any]:
    return {"role": role, "content": text}


def test_a_response_chain_stores_each_turn_once_and_reads_back_whole_conversations(store: Store) -> None:
    """Turn k of a chain stores its own two messages (O(turns), not O(turns^2)); each response reads back its whole
    conversation; deleting or pruning responses that a later one continues leaves that one whole."""
    rows: list[dict[str, Any]] = []
    previous = None
    for k in range(6):
        turn = [_say(f"q{k}"), _say(f"a{k}", "assistant")]
        row = {"response_id": f"r{k}", "created_at": float(k), "response": {"id": f"r{k}"}, "conversation": turn}
        rows.append(row | {"owner": "key-a", "previous_id": previous})
        previous = f"r{k}"
    store.put_responses(rows)
    whole = [m for k in range(6) for m in (_say(f"q{k}"), _say(f"a{k}", "assistant"))]
    for k in range(6):
        found = store.get_response(f"r{k}")
        assert found is not None and found["conversation"] == whole[: 2 * k + 2]
        assert found["turn"] == whole[2 * k : 2 * k + 2]
    with store.engine.connect() as conn:
        stored = conn.execute(sa.text("SELECT conversation FROM responses")).scalars().all()
    assert sum(len(c if isinstance(c, list) else json.loads(c)) for c in stored) == len(whole), "each turn once"

    assert store.delete_response("r2", "key-a")  # in the middle: r3 takes its turn over and continues r1
    assert store.get_response("r2") is None
    for k in (3, 4, 5):
        found = store.get_response(f"r{k}")
        assert found is not None and found["conversation"] == whole[: 2 * k + 2]
    assert store.prune_responses(3.5) == 3  # r0, r1 and r3: r4 (now continuing nothing) and r5 stay whole
    for k, previous_id in ((4, None), (5, "r4")):
        found = store.get_response(f"r{k}")
        assert found is not None and found["conversation"] == whole[: 2 * k + 2]
        assert found["previous_id"] == previous_id
