"""Tables and the synchronous :class:`Store` over SQLite or PostgreSQL (SQLAlchemy 2 Core)."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson
import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from sqlalchemy import event
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.pool import StaticPool

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
_SCHEMA_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
_WRITE_OPTION = "gridserve_write"

metadata = sa.MetaData()

nodes = sa.Table(
    "nodes",
    metadata,
    sa.Column("node_id", sa.String(), primary_key=True),
    sa.Column("public_key", sa.String(), nullable=False),
    sa.Column("capability", sa.JSON(), nullable=False),
    sa.Column("state", sa.String(), nullable=False),
    sa.Column("registered_at", sa.Float(), nullable=False),
    sa.Column("last_seen", sa.Float(), nullable=False),
    sa.Column("telemetry", sa.JSON(), nullable=True),
    # when the capability was last (re)registered: other gateways re-read it when this moves
    sa.Column("capability_at", sa.Float(), nullable=True),
    # the gateway the node registered with (the one taking its heartbeats)
    sa.Column("gateway", sa.String(), nullable=True),
    # the source address of its latest registration (a whitewashing signal: gateway/registry/whitewash.py)
    sa.Column("address", sa.String(), nullable=True),
    sa.Index("ix_nodes_last_seen", "last_seen"),
)

node_events = sa.Table(
    "node_events",
    metadata,
    sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
    sa.Column("kind", sa.String(), nullable=False),
    sa.Column("severity", sa.String(), nullable=False),
    sa.Column("node_id", sa.String(), nullable=True, index=True),
    sa.Column("detail", sa.JSON(), nullable=False),
    sa.Column("at", sa.Float(), nullable=False, index=True),
    # the gateway that wrote the event (several gateways on one database tail each other's)
    sa.Column("origin", sa.String(), nullable=True),
)

decisions = sa.Table(
    "decisions",
    metadata,
    sa.Column("decision_id", sa.String(), primary_key=True),
    sa.Column("request_id", sa.String(), nullable=False),
    sa.Column("model", sa.String(), nullable=False),
    sa.Column("node_id", sa.String(), nullable=True),
    sa.Column("status", sa.String(), nullable=False),
    sa.Column("data", sa.JSON(), nullable=False),
    sa.Column("created_at", sa.Float(), nullable=False),
    sa.Column("updated_at", sa.Float(), nullable=False),
)

settlements = sa.Table(
    "settlements",
    metadata,
    sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
    sa.Column("decision_id", sa.String(), nullable=False),
    sa.Column("request_id", sa.String(), nullable=False),
    sa.Column("node_id", sa.String(), nullable=False, index=True),
    sa.Column("model", sa.String(), nullable=False),
    sa.Column("tokens", sa.Integer(), nullable=False),
    sa.Column("claimed_tokens", sa.Integer(), nullable=True),
    sa.Column("price_per_mtok", sa.Float(), nullable=False),
    sa.Column("amount_usd", sa.Float(), nullable=False),
    sa.Column("status", sa.String(), nullable=False),
    sa.Column("detail", sa.String(), nullable=False),
    sa.Column("at", sa.Float(), nullable=False),
    # decision id and segment: an entry written twice (a retried commit) is counted once
    sa.Column("entry_key", sa.String(), nullable=True),
    sa.Index("ux_settlements_entry_key", "entry_key", unique=True),
)

join_tokens = sa.Table(
    "join_tokens",
    metadata,
    sa.Column("token_id", sa.String(), primary_key=True),
    sa.Column("label", sa.String(), nullable=False),
    # SHA-256 of the token, hex: the token itself is shown once, at creation, and never stored
    sa.Column("digest", sa.String(), nullable=False),
    sa.Column("created_at", sa.Float(), nullable=False),
    sa.Column("expires_at", sa.Float(), nullable=True),
    # how many distinct node identities the token may admit, and those it admitted (a JSON list of node ids)
    sa.Column("uses", sa.Integer(), nullable=False),
    sa.Column("node_ids", sa.JSON(), nullable=False),
    sa.Column("revoked_at", sa.Float(), nullable=True),
)

responses = sa.Table(
    "responses",
    metadata,
    # OpenAI's Responses API (gateway/api/responses_api.py): a stored response, read back by id
    # (`GET /v1/responses/{id}`, `previous_response_id`) through any gateway on the database
    sa.Column("response_id", sa.String(), primary_key=True),
    sa.Column("created_at", sa.Float(), nullable=False),
    # the Response object as the client got it
    sa.Column("response", sa.JSON(), nullable=False),
    # chat messages: this response's turn (its input, then its answer) after the conversation of `previous_id`; with
    # no previous_id, the whole conversation up to and including this answer (what a continuation starts from)
    sa.Column("conversation", sa.JSON(), nullable=False),
    # the id of the API key that made it: only that key reads, continues or deletes it (NULL: made before keys had
    # ids, readable by any key)
    sa.Column("owner", sa.String(), nullable=True),
    # the stored response this one continues (its conversation comes first); NULL: none, or whole (see above)
    sa.Column("previous_id", sa.String(), nullable=True),
    sa.Index("ix_responses_created_at", "created_at"),
    sa.Index("ix_responses_previous_id", "previous_id"),
)

MAX_CHAIN = 1_000_000
"""Most stored responses a conversation is read back through (a guard: a chain only ever points to older rows)."""
NOTIFY_CHANNEL = "gridserve_events"
"""PostgreSQL channel on which a commit of node events is announced (payload: the writing gateway's id)."""


def default_sqlite_url(data_dir: Path) -> str:
    """SQLite URL for ``data_dir/gridserve.db``; creates ``data_dir`` if needed."""
    data_dir.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(data_dir / 'gridserve.db').resolve().as_posix()}"


def _sqlite_on_connect(dbapi_conn: Any, _record: Any) -> None:
    # Let SQLAlchemy's "begin" hook issue BEGIN itself (pysqlite's implicit transactions are unreliable).
    dbapi_conn.isolation_level = None
    cur = dbapi_conn.cursor()
    try:
        for pragma in ("journal_mode=WAL", "foreign_keys=ON", "busy_timeout=5000", "synchronous=NORMAL"):
            cur.execute(f"PRAGMA {pragma}")
    finally:
        cur.close()


def _sqlite_on_begin(conn: Connection) -> None:
    # Writers take the write lock up front so busy_timeout applies instead of a failed lock upgrade.
    immediate = conn.get_execution_options().get(_WRITE_OPTION, False)
    conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def _json(value: Any) -> str:
    try:
        return orjson.dumps(value).decode()
    except TypeError:  # integers beyond 64 bits: the standard library handles them
        return json.dumps(value)


_JSON = {"json_serializer": _json}  # reads keep the standard decoder (exact big integers)


def _sqlite_engine(url: sa.URL) -> Engine:
    if url.database in (None, "", ":memory:"):
        engine = sa.create_engine(url, poolclass=StaticPool, connect_args={"check_same_thread": False}, **_JSON)
    else:
        engine = sa.create_engine(url, **_JSON)
    event.listen(engine, "connect", _sqlite_on_connect)
    event.listen(engine, "begin", _sqlite_on_begin)
    return engine


def _postgres_engine(url: sa.URL, schema: str | None) -> Engine:
    if schema is None:
        return sa.create_engine(url, pool_pre_ping=True, **_JSON)
    if not _SCHEMA_RE.match(schema):
        raise ValueError(f"invalid schema name: {schema!r}")
    bootstrap = sa.create_engine(url, poolclass=sa.NullPool)
    try:
        with bootstrap.begin() as conn:
            conn.exec_driver_sql(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
    finally:
        bootstrap.dispose()
    return sa.create_engine(url, pool_pre_ping=True, connect_args={"options": f"-csearch_path={schema}"}, **_JSON)


def _upsert(
    dialect: str, table: sa.Table, values: dict[str, Any] | list[dict[str, Any]], update: list[str]
) -> sa.Insert:
    keys = [c.name for c in table.primary_key.columns]
    if dialect == "postgresql":
        pg = pg_insert(table).values(values)
        return pg.on_conflict_do_update(index_elements=keys, set_={c: pg.excluded[c] for c in update})
    lite = sqlite_insert(table).values(values)
    return lite.on_conflict_do_update(index_elements=keys, set_={c: lite.excluded[c] for c in update})


_DECISION_UPDATE = ["request_id", "model", "node_id", "status", "data", "updated_at"]


def upsert_template(dialect: str, table: sa.Table, update: list[str]) -> sa.Insert:
    """INSERT ... ON CONFLICT (the primary key) DO UPDATE SET `update` to the new row's values."""
    keys = [c.name for c in table.primary_key.columns]
    if dialect == "postgresql":
        pg = pg_insert(table)
        return pg.on_conflict_do_update(index_elements=keys, set_={c: pg.excluded[c] for c in update})
    lite = sqlite_insert(table)
    return lite.on_conflict_do_update(index_elements=keys, set_={c: lite.excluded[c] for c in update})


class Store:
    """Synchronous persistence for nodes, node events and scheduling decisions.

    Safe to share between threads (one engine, pooled connections); call it off the event loop,
    e.g. through :class:`gridserve.store.StoreWriter`.
    """

    def __init__(self, url: str, *, schema: str | None = None, origin: str | None = None) -> None:
        """`origin`: this gateway's id, written with every event it records (several gateways on one database
        read each other's events by it)."""
        self.origin = origin
        parsed = sa.make_url(url)
        backend = parsed.get_backend_name()
        if backend == "sqlite":
            self._engine = _sqlite_engine(parsed)
        elif backend == "postgresql":
            self._engine = _postgres_engine(parsed, schema)
        else:
            raise ValueError(f"unsupported database backend: {backend!r}")
        self._dialect = backend
        # One statement, executed with many parameter sets (compiled once, cached by SQLAlchemy).
        self._decision_upsert = upsert_template(backend, decisions, _DECISION_UPDATE)

    @property
    def engine(self) -> Engine:
        return self._engine

    @property
    def dialect(self) -> str:
        return self._dialect

    def _announce(self, conn: Connection) -> None:
        """PostgreSQL: tell the other gateways (LISTEN) that events were committed; sent at commit."""
        if self._dialect == "postgresql":
            conn.execute(sa.select(sa.func.pg_notify(NOTIFY_CHANNEL, self.origin or "")))

    def transaction(self) -> Any:
        """A connection in a write transaction (a context manager), committed when the block ends."""
        return self._write()

    @contextmanager
    def _write(self) -> Iterator[Connection]:
        with self._engine.connect() as conn:
            conn.execution_options(**{_WRITE_OPTION: True})
            with conn.begin():
                yield conn

    def migrate(self) -> None:
        """Bring the schema to the latest Alembic revision (idempotent)."""
        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS_DIR).replace("%", "%%"))
        with self._write() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")

    # -- nodes -----------------------------------------------------------------------------------------

    def upsert_node(
        self,
        node_id: str,
        *,
        public_key: str,
        capability: dict[str, Any],
        state: str,
        at: float,
        address: str | None = None,
    ) -> None:
        """Register a node (or re-register it: registered_at is kept, everything else is replaced)."""
        values = {
            "address": address,
            "node_id": node_id,
            "public_key": public_key,
            "capability": capability,
            "state": state,
            "registered_at": at,
            "last_seen": at,
            "capability_at": at,
            "gateway": self.origin,
        }
        update = ["public_key", "capability", "state", "last_seen", "capability_at", "gateway", "address"]
        stmt = _upsert(self._dialect, nodes, values, update)
        with self._write() as conn:
            conn.execute(stmt)

    def set_node_state(self, node_id: str, state: str, at: float) -> None:
        """Change a node's state; a no-op for unknown nodes.

        ``at`` is accepted for symmetry but does not move ``last_seen``: a state change (e.g. to
        "dead" after missed heartbeats) is not evidence that the node was seen.
        """
        del at
        with self._write() as conn:
            conn.execute(nodes.update().where(nodes.c.node_id == node_id).values(state=state))

    def touch_node(self, node_id: str, *, telemetry: dict[str, Any], at: float) -> None:
        """Record a heartbeat: ``last_seen`` and the latest telemetry; a no-op for unknown nodes."""
        stmt = nodes.update().where(nodes.c.node_id == node_id).values(last_seen=at, telemetry=telemetry)
        with self._write() as conn:
            conn.execute(stmt)

    def touch_nodes(self, beats: list[dict[str, Any]]) -> None:
        """Record many heartbeats in one transaction: each `{"node_id", "telemetry", "at"}` (the latest per node;
        unknown nodes are skipped)."""
        if not beats:
            return
        if self._dialect == "sqlite":  # the driver's executemany: a third of SQLAlchemy's CPU (46 -> 16 ms / 5,000)
            params = [(b["at"], _json(b["telemetry"]), b["node_id"]) for b in beats]
            with self._write() as conn:
                conn.exec_driver_sql("UPDATE nodes SET last_seen = ?, telemetry = ? WHERE node_id = ?", params)
            return
        stmt = (
            nodes.update()
            .where(nodes.c.node_id == sa.bindparam("b_node_id"))
            .values(last_seen=sa.bindparam("b_at"), telemetry=sa.bindparam("b_telemetry"))
        )
        rows = [{"b_node_id": b["node_id"], "b_at": b["at"], "b_telemetry": b["telemetry"]} for b in beats]
        with self._write() as conn:
            conn.execute(stmt, rows)

    def nodes_seen_since(self, since: float) -> list[dict[str, Any]]:
        """Nodes heard from (registered or heartbeating, through any gateway) after `since`: id, key, state,
        last_seen, telemetry, capability_at, gateway; without the capability document (see `capabilities`)."""
        n = nodes.c
        cols = [n.node_id, n.public_key, n.state, n.last_seen, n.telemetry, n.capability_at, n.gateway]
        with self._engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(sa.select(*cols).where(n.last_seen > since))]

    def capabilities(self, node_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        """The stored capability documents of these nodes, with `capability_at` and `registered_at`."""
        if not node_ids:
            return {}
        n = nodes.c
        stmt = sa.select(n.node_id, n.capability, n.capability_at, n.registered_at).where(n.node_id.in_(node_ids))
        with self._engine.connect() as conn:
            return {r.node_id: dict(r._mapping) for r in conn.execute(stmt)}

    def list_nodes(self) -> list[dict[str, Any]]:
        with self._engine.connect() as conn:
            rows = conn.execute(sa.select(nodes).order_by(nodes.c.node_id))
            return [dict(r._mapping) for r in rows]

    def node_origins(self, limit: int) -> list[dict[str, Any]]:
        """node_id, capability and address of the `limit` nodes registered last (where each came from)."""
        n = nodes.c
        stmt = sa.select(n.node_id, n.capability, n.address).order_by(n.capability_at.desc()).limit(limit)
        with self._engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(stmt)]

    def get_node(self, node_id: str) -> dict[str, Any] | None:
        with self._engine.connect() as conn:
            row = conn.execute(sa.select(nodes).where(nodes.c.node_id == node_id)).first()
            return None if row is None else dict(row._mapping)

    # -- events ----------------------------------------------------------------------------------------

    def record_event(self, *, kind: str, severity: str, node_id: str | None, detail: dict[str, Any], at: float) -> None:
        self.record_events([{"kind": kind, "severity": severity, "node_id": node_id, "detail": detail, "at": at}])

    def record_events(self, rows: Sequence[dict[str, Any]]) -> None:
        """Insert many events in one transaction (rows: the keyword arguments of :meth:`record_event`)."""
        if not rows:
            return
        keys = ("kind", "severity", "node_id", "detail", "at")
        values = [{**{k: r[k] for k in keys}, "origin": self.origin} for r in rows]
        with self._write() as conn:
            conn.execute(node_events.insert(), values)
            self._announce(conn)

    def events_after(self, after_id: int, *, exclude_origin: str | None, limit: int = 5000) -> list[dict[str, Any]]:
        """Events with id > `after_id` written by other gateways than `exclude_origin`, in id order."""
        e = node_events.c
        stmt = sa.select(node_events).where(e.id > after_id).order_by(e.id).limit(limit)
        if exclude_origin is not None:
            stmt = stmt.where(sa.or_(e.origin.is_(None), e.origin != exclude_origin))
        with self._engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(stmt)]

    def last_event_id(self) -> int:
        with self._engine.connect() as conn:
            return int(conn.execute(sa.select(sa.func.coalesce(sa.func.max(node_events.c.id), 0))).scalar_one())

    def list_events(
        self, *, kind: str | None = None, node_id: str | None = None, limit: int = 100
    ) -> list[dict[str, Any]]:
        """Events newest first (by ``at``, then insertion order), optionally filtered."""
        stmt = sa.select(node_events).order_by(node_events.c.at.desc(), node_events.c.id.desc()).limit(limit)
        if kind is not None:
            stmt = stmt.where(node_events.c.kind == kind)
        if node_id is not None:
            stmt = stmt.where(node_events.c.node_id == node_id)
        with self._engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(stmt)]

    def events_in_order(self, kinds: Sequence[str], *, limit: int = 200_000) -> list[dict[str, Any]]:
        """The most recent `limit` events of these kinds, oldest first (for replaying a ledger at start)."""
        stmt = (
            sa.select(node_events)
            .where(node_events.c.kind.in_(list(kinds)))
            .order_by(node_events.c.at.desc(), node_events.c.id.desc())
            .limit(limit)
        )
        with self._engine.connect() as conn:
            rows = [dict(r._mapping) for r in conn.execute(stmt)]
        rows.reverse()
        return rows

    # -- decisions -------------------------------------------------------------------------------------

    def record_decision(
        self,
        decision_id: str,
        *,
        request_id: str,
        model: str,
        node_id: str | None,
        status: str,
        data: dict[str, Any],
        at: float,
    ) -> None:
        """Insert or update a decision by id; ``created_at`` is kept from the first write."""
        self.record_decisions(
            [
                {
                    "decision_id": decision_id,
                    "request_id": request_id,
                    "model": model,
                    "node_id": node_id,
                    "status": status,
                    "data": data,
                    "at": at,
                }
            ]
        )

    def record_decisions(self, rows: Sequence[dict[str, Any]]) -> None:
        """Upsert many decisions in one statement and transaction (rows: the keyword arguments of
        :meth:`record_decision` plus ``decision_id``). The last row wins for a repeated id."""
        if not rows:
            return
        latest = {row["decision_id"]: row for row in rows}
        values = [
            {
                "decision_id": r["decision_id"],
                "request_id": r["request_id"],
                "model": r["model"],
                "node_id": r["node_id"],
                "status": r["status"],
                "data": r["data"],
                "created_at": r["at"],
                "updated_at": r["at"],
            }
            for r in latest.values()
        ]
        with self._write() as conn:
            conn.execute(self._decision_upsert, values)

    def get_decision(self, decision_id: str) -> dict[str, Any] | None:
        with self._engine.connect() as conn:
            row = conn.execute(sa.select(decisions).where(decisions.c.decision_id == decision_id)).first()
            return None if row is None else dict(row._mapping)

    # -- settlement (append-only) ------------------------------------------------------------------------

    def record_settlements(self, rows: Sequence[dict[str, Any]]) -> None:
        """Append entries; one whose `entry_key` is already stored is skipped (a retried write counts once)."""
        if not rows:
            return
        values = [{"entry_key": None, **r} for r in rows]
        insert = pg_insert(settlements) if self._dialect == "postgresql" else sqlite_insert(settlements)
        with self._write() as conn:
            conn.execute(insert.on_conflict_do_nothing(index_elements=["entry_key"]), values)

    def settlement_report(self, *, disputed_limit: int = 100) -> dict[str, Any]:
        """Per node and model: requests, tokens, amount, disputed entries; and the latest disputed entries."""
        s = settlements.c
        totals = (
            sa.select(
                s.node_id,
                s.model,
                sa.func.count().label("requests"),
                sa.func.sum(s.tokens).label("tokens"),
                sa.func.sum(s.amount_usd).label("amount_usd"),
                sa.func.sum(sa.case((s.status == "disputed", 1), else_=0)).label("disputed"),
            )
            .group_by(s.node_id, s.model)
            .order_by(s.node_id, s.model)
        )
        disputed = sa.select(settlements).where(s.status == "disputed").order_by(s.id.desc()).limit(disputed_limit)
        with self._engine.connect() as conn:
            return {
                "totals": [dict(r._mapping) for r in conn.execute(totals)],
                "disputed": [dict(r._mapping) for r in conn.execute(disputed)],
            }

    # -- join tokens (gateway/registry/tokens.py) ------------------------------------------------------------

    def insert_join_token(self, row: dict[str, Any]) -> None:
        """Store a new join token (the columns of `join_tokens`)."""
        with self._write() as conn:
            conn.execute(join_tokens.insert().values(row))

    def list_join_tokens(self) -> list[dict[str, Any]]:
        """Every join token, oldest first."""
        stmt = sa.select(join_tokens).order_by(join_tokens.c.created_at, join_tokens.c.token_id)
        with self._engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(stmt)]

    def change_join_token(
        self, token_id: str, change: Callable[[dict[str, Any]], dict[str, Any]]
    ) -> dict[str, Any] | None:
        """Read the token's row, locked against other writers, and set the values `change(row)` returns (none: an
        empty dict), in one transaction: an exception from `change` leaves the row as it was. Returns the row after
        the change, or None if there is no such token."""
        stmt = sa.select(join_tokens).where(join_tokens.c.token_id == token_id).with_for_update()
        with self._write() as conn:
            found = conn.execute(stmt).first()
            if found is None:
                return None
            row = dict(found._mapping)
            values = change(row)
            if values:
                conn.execute(join_tokens.update().where(join_tokens.c.token_id == token_id).values(values))
            return {**row, **values}

    # -- responses (gateway/api/responses_api.py) -------------------------------------------------------------

    def put_responses(self, rows: Sequence[dict[str, Any]]) -> None:
        """Store new responses in one transaction (rows: the columns of `responses`)."""
        if not rows:
            return
        with self._write() as conn:
            conn.execute(responses.insert(), list(rows))

    def advance_response(
        self, response: dict[str, Any], turn: list[dict[str, Any]], *, from_status: Sequence[str]
    ) -> bool:
        """Replace a stored response (a background one moving on) and its turn if its stored status is one of
        `from_status`, in one transaction: a response cancelled or deleted meanwhile stays so. Whether it was
        replaced."""
        r = responses.c
        with self._write() as conn:
            query = sa.select(r.response).where(r.response_id == response["id"])
            if self._dialect == "postgresql":
                query = query.with_for_update()
            stored = conn.execute(query).scalar_one_or_none()
            if stored is None or stored.get("status") not in from_status:
                return False
            update = responses.update().where(r.response_id == response["id"])
            conn.execute(update.values(response=response, conversation=turn))
            return True

    def get_response(self, response_id: str) -> dict[str, Any] | None:
        """A stored response's row (`response`, `owner`, `created_at`, `previous_id`, its own `turn`) and its
        `conversation`: the turns of its chain of previous responses, oldest first, then its own; or None."""
        r = responses.c
        first = sa.select(r.response_id, r.previous_id, r.conversation, sa.literal(0).label("depth"))
        chain = first.where(r.response_id == response_id).cte("chain", recursive=True)
        earlier = sa.select(r.response_id, r.previous_id, r.conversation, (chain.c.depth + 1).label("depth"))
        chain = chain.union_all(
            earlier.join(chain, sa.and_(r.response_id == chain.c.previous_id, chain.c.depth < MAX_CHAIN))
        )
        with self._engine.connect() as conn:
            row = conn.execute(sa.select(responses).where(r.response_id == response_id)).first()
            if row is None:
                return None
            turns = conn.execute(sa.select(chain.c.conversation).order_by(chain.c.depth.desc())).scalars().all()
        found = dict(row._mapping)
        found["turn"] = found["conversation"]
        found["conversation"] = [message for turn in turns for message in turn]
        return found

    def delete_response(self, response_id: str, owner: str | None) -> bool:
        """Delete a stored response of `owner` (or of no one); False if there was none. Responses that continue it
        keep its turn (`_fold`)."""
        r = responses.c
        mine = sa.or_(r.owner.is_(None), r.owner == owner)
        with self._write() as conn:
            row = conn.execute(sa.select(r.response_id).where(r.response_id == response_id, mine)).first()
            if row is None:
                return False
            self._fold(conn, response_id)
            return conn.execute(responses.delete().where(r.response_id == response_id)).rowcount > 0

    def prune_responses(self, before: float) -> int:
        """Delete responses stored before `before` (unix seconds), oldest first, each one's turn kept by the
        responses that continue it; how many went."""
        r = responses.c
        with self._write() as conn:
            continued = sa.select(r.previous_id).where(r.previous_id.is_not(None))
            folded = sa.select(r.response_id).where(r.created_at < before, r.response_id.in_(continued))
            for response_id in conn.execute(folded.order_by(r.created_at)).scalars().all():
                self._fold(conn, response_id)
            return int(conn.execute(responses.delete().where(r.created_at < before)).rowcount)

    @staticmethod
    def _fold(conn: Connection, response_id: str) -> None:
        """The responses that continue `response_id` take its turn before their own, and continue what it
        continued: their conversations stay whole when it goes."""
        r = responses.c
        row = conn.execute(sa.select(r.conversation, r.previous_id).where(r.response_id == response_id)).one()
        children = conn.execute(sa.select(r.response_id, r.conversation).where(r.previous_id == response_id)).all()
        for child_id, turn in children:
            update = responses.update().where(r.response_id == child_id)
            conn.execute(update.values(conversation=[*row.conversation, *turn], previous_id=row.previous_id))

    def close(self) -> None:
        self._engine.dispose()
