"""Shared fixtures: real grids of processes on 127.0.0.1."""

__all__ = ["free_port_block"]

import contextlib
import os
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import httpx
import pytest
import sqlalchemy as sa

from gridserve.cli.grid import PORT_SHARE_ENV, LocalGrid, free_port_block
from gridserve.gateway.registry.membership import NodeRecord
from gridserve.types import Capability, HardwareInfo, NodeId, NodeState, RuntimeInfo

if TYPE_CHECKING:
    from gridserve.engines.torch_engine import TorchEngine

if os.environ.get("PYTEST_XDIST_WORKER", "").startswith("gw"):  # `make test` runs two workers: split the ports
    os.environ[PORT_SHARE_ENV] = f"{os.environ['PYTEST_XDIST_WORKER'][2:]}/{os.environ['PYTEST_XDIST_WORKER_COUNT']}"

API_KEY = "test-key"
ADMIN = "test-admin"
PG = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


@pytest.fixture
def pg_schema() -> Iterator[str]:
    """A fresh PostgreSQL schema in the local `test` database, dropped afterwards."""
    with fresh_pg_schema() as name:
        yield name


@contextlib.contextmanager
def fresh_pg_schema() -> Iterator[str]:
    name = "gs_test_" + uuid.uuid4().hex[:12]
    engine = sa.create_engine(PG, poolclass=sa.NullPool)
    with engine.begin() as conn:
        conn.exec_driver_sql(f'CREATE SCHEMA "{name}"')
    try:
        yield name
    finally:
        with engine.begin() as conn:
            conn.exec_driver_sql(f'DROP SCHEMA "{name}" CASCADE')
        engine.dispose()


def pg_url(schema: str) -> str:
    """The `--db` URL of the local PostgreSQL with `schema` first on the search path."""
    return f"{PG}?options=-csearch_path%3D{schema}"


@contextlib.contextmanager
def two_gateways_on_pg(
    tmp: Path, extra_args: tuple[str, ...] = (), engine: str = "tiny", node_args: tuple[str, ...] = ()
) -> Iterator[tuple[LocalGrid, LocalGrid]]:
    """Gateways A and B on one fresh PostgreSQL schema, with one node (`engine`, `node_args`) that registered with
    A (B adopts it) and heartbeats to both."""
    base = free_port_block(5)
    urls = f"http://127.0.0.1:{base},http://127.0.0.1:{base + 2}"
    with fresh_pg_schema() as schema:
        args = ["--db", pg_url(schema), "--key", str(tmp / "grid.key"), "--canary-interval", "0", *extra_args]
        a, b = (
            LocalGrid(
                data_dir=tmp / name,
                port=port,
                api_key=API_KEY,
                admin_token=ADMIN,
                engines=engines,
                threads=1,
                extra_gateway_args=[*args, "--gateway-id", name],
                node_gateways=urls,
                forked=True,
            )
            for name, port, engines in (("gw-a", base, [engine]), ("gw-b", base + 2, []))
        )
        try:
            a.start_gateway()  # creates the shared key; B starts with the same one
            b.start_gateway()
            a.start_node(0, engine, list(node_args))
            a.wait_nodes(1, 120)
            b.wait_nodes(1, 60)
            yield a, b
        finally:
            a.stop()
            b.stop()


def make_grid(tmp: Path, engines: list[str], **kwargs: object) -> LocalGrid:
    """A grid whose gateway and nodes fork from a preloaded server (cli/launch.py), unless `forked=False`."""
    return LocalGrid(
        data_dir=tmp,
        port=free_port_block(len(engines) + 4),
        api_key=API_KEY,
        admin_token=ADMIN,
        engines=engines,
        **{"forked": True, **kwargs},  # type: ignore[arg-type]
    )


@pytest.fixture(scope="module")
def tiny() -> Iterator["TorchEngine"]:
    """The tiny engine in this process, loaded, on one thread (one per test module)."""
    import asyncio

    from gridserve.engines.tiny import tiny_engine

    engine = tiny_engine(threads=1)
    engine.load_sync()
    yield engine
    asyncio.run(engine.aclose())


@pytest.fixture(scope="session")
def tiny_grid(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalGrid]:
    """A gateway with two tiny nodes and one emulated node, shared by the API tests."""
    grid = make_grid(
        tmp_path_factory.mktemp("tiny-grid"),
        ["tiny", "tiny", "emulated:rtx4090"],
        # nodes established from the start: these tests are about the API and routing among established nodes; with
        # vetting on, a node vetted by the audits of earlier tests holds the other back to the exploration share
        # (test_concurrent_load_spreads_over_nodes then saw every request on one node)
        extra_gateway_args=["--max-body-bytes", "20000", "--vetting-checks", "0"],
        threads=1,
    )
    try:
        grid.start(timeout_s=120)
        yield grid
    finally:
        grid.stop()


def until_one_at_work(read: Callable[[], dict[str, int]], within_s: float) -> dict[str, int]:
    """Each node's requests at work (`read`), read again until exactly one is at work or `within_s` passed: a stream
    that stalled and moved on a busy machine leaves its first node at work until that node takes its cancel (and a
    hedge's loser until it is cancelled at the first token). The last reading."""
    running, deadline = read(), time.monotonic() + within_s
    while sum(running.values()) != 1 and time.monotonic() < deadline:
        time.sleep(0.05)
        running = read()
    return running


def admin_get(grid: LocalGrid, path: str) -> httpx.Response:
    return httpx.get(grid.url + path, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=10)


def bare_record(i: int, state: NodeState, *, last_heartbeat: float = 0.0, outstanding: int = 0) -> NodeRecord:
    """A membership record of node `n{i}` with no models (unit tests of sweeps and probe rounds)."""
    cap = Capability(
        node_id=NodeId(f"n{i}"),
        public_key="pk",
        endpoint=f"http://n{i}",
        engine="emulated",
        models=(),
        hardware=HardwareInfo(accelerator="t4"),
        runtime=RuntimeInfo(gridserve="t", python="t", engine="t"),
    )
    return NodeRecord(
        capability=cap, state=state, registered_at=0.0, last_heartbeat=last_heartbeat, outstanding=outstanding
    )


def streamed_calls(chunks: list[Any]) -> list[Any]:
    """The tool calls an OpenAI chat stream's deltas add up to (by index), its shape checked on the way: a call's
    first delta carries its id, type and name (arguments ""), the ones after only more of its arguments, and calls
    start in index order."""
    calls: list[Any] = []
    for chunk in chunks:
        for delta in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            if delta.index == len(calls):
                assert delta.id and delta.type == "function" and delta.function.name, delta
                assert delta.function.arguments == "", delta
                calls.append(
                    SimpleNamespace(
                        id=delta.id, type=delta.type, function=SimpleNamespace(name=delta.function.name, arguments="")
                    )
                )
            else:
                assert delta.index == len(calls) - 1 and delta.id is None and delta.function.name is None, delta
                calls[-1].function.arguments += delta.function.arguments
    return calls
