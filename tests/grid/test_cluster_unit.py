"""Unit tests of what several gateways on one database rely on: the event tail (ids committed out of order), the
shared store queries, settlement entries counted once, and the client that fails over between gateways."""

import random
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tests.conftest import pg_url

from gridserve.client import FailoverTransport, NoGateway, Rotation
from gridserve.gateway.registry.cluster import GAP_TIMEOUT_S, EventTail
from gridserve.store import Store, default_sqlite_url


@settings(max_examples=300, deadline=None)
@given(
    total=st.integers(1, 60),
    lost=st.sets(st.integers(1, 60)),
    seed=st.integers(0, 2**32 - 1),
    batches=st.integers(1, 8),
)
def test_the_tail_reads_every_committed_event_once_whatever_the_commit_order(
    total: int, lost: set[int], seed: int, batches: int
) -> None:
    """Ids 1..total commit in a random order (some never: rolled back), read in several polls; each poll returns
    every committed id above the tail's low-water mark. Every committed id is handed out exactly once."""
    rng = random.Random(seed)
    committed_order = [i for i in range(1, total + 1) if i not in lost]
    rng.shuffle(committed_order)
    cuts = sorted(rng.randint(0, len(committed_order)) for _ in range(batches - 1))
    tail = EventTail(low=0)
    visible: set[int] = set()
    handed: list[int] = []
    now = 0.0
    for end in [*cuts, len(committed_order)]:
        visible.update(committed_order[:end])
        handed += tail.fresh(sorted(i for i in visible if i > tail.low))
        tail.advance(now)
        now += 0.1  # polls well within the gap timeout: a late commit is still waited for
    now += GAP_TIMEOUT_S + 1
    handed += tail.fresh(sorted(i for i in visible if i > tail.low))
    tail.advance(now)
    assert sorted(handed) == sorted(committed_order)
    assert len(handed) == len(set(handed))
    assert tail.low == max(committed_order, default=0)
    assert not tail.seen


def test_the_tail_waits_for_a_late_commit_within_the_gap_timeout() -> None:
    tail = EventTail(low=10)
    assert tail.fresh([12, 13]) == [12, 13]
    tail.advance(now=100.0)
    assert tail.low == 10  # 11 is missing: not passed yet
    assert tail.fresh([11, 12, 13]) == [11]
    tail.advance(now=101.0)
    assert tail.low == 13 and not tail.gaps


def test_the_tail_gives_up_on_a_rolled_back_id() -> None:
    tail = EventTail(low=0)
    tail.fresh([2])
    tail.advance(now=0.0)
    tail.advance(now=GAP_TIMEOUT_S - 0.01)
    assert tail.low == 0
    tail.advance(now=GAP_TIMEOUT_S + 0.01)
    assert tail.low == 2


@pytest.fixture(params=["sqlite", "postgresql"])
def shared(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Store, Store]]:
    """Two stores on one database, as two gateways have them."""
    on_sqlite = request.param == "sqlite"
    url = default_sqlite_url(tmp_path) if on_sqlite else pg_url(request.getfixturevalue("pg_schema"))
    a, b = Store(url, origin="gw-a"), Store(url, origin="gw-b")
    a.migrate()
    b.migrate()
    try:
        yield a, b
    finally:
        a.close()
        b.close()


def test_events_carry_their_origin_and_the_tail_query_reads_them_in_id_order(shared: tuple[Store, Store]) -> None:
    a, b = shared
    start = b.last_event_id()
    a.record_event(kind="incident", severity="severe", node_id="n1", detail={"detail": "x"}, at=1.0)
    b.record_event(kind="job_completed", severity="minor", node_id="n1", detail={}, at=2.0)
    a.record_events([{"kind": "job_failed", "severity": "minor", "node_id": "n2", "detail": {}, "at": 3.0}])
    rows = b.events_after(start, exclude_origin=None)
    assert [(r["origin"], r["kind"]) for r in rows] == [
        ("gw-a", "incident"),
        ("gw-b", "job_completed"),
        ("gw-a", "job_failed"),
    ]
    assert [r["kind"] for r in b.events_after(start, exclude_origin="gw-b")] == ["incident", "job_failed"]
    assert b.events_after(rows[-1]["id"], exclude_origin=None) == []


def test_nodes_name_the_gateway_they_registered_with(shared: tuple[Store, Store]) -> None:
    a, b = shared
    a.upsert_node("n1", public_key="k1", capability={"v": 1}, state="up", at=10.0)
    b.upsert_node("n2", public_key="k2", capability={"v": 2}, state="up", at=11.0)
    b.touch_nodes([{"node_id": "n1", "telemetry": {"t": 1}, "at": 12.0}])
    seen = {r["node_id"]: r for r in a.nodes_seen_since(10.5)}
    assert set(seen) == {"n1", "n2"}
    assert seen["n1"]["gateway"] == "gw-a" and seen["n1"]["last_seen"] == 12.0 and seen["n1"]["telemetry"] == {"t": 1}
    assert seen["n2"]["gateway"] == "gw-b" and seen["n2"]["capability_at"] == 11.0
    b.upsert_node("n1", public_key="k1", capability={"v": 3}, state="up", at=20.0)  # n1 moved to gateway B
    caps = a.capabilities(["n1", "n2", "ghost"])
    assert caps["n1"]["capability"] == {"v": 3} and caps["n1"]["capability_at"] == 20.0
    assert caps["n1"]["registered_at"] == 10.0 and set(caps) == {"n1", "n2"}
    assert a.nodes_seen_since(15.0)[0]["gateway"] == "gw-b"


def test_a_settlement_entry_written_twice_counts_once(shared: tuple[Store, Store]) -> None:
    a, b = shared
    entry = {
        "decision_id": "dec_1",
        "request_id": "r1",
        "node_id": "n1",
        "model": "m",
        "tokens": 7,
        "claimed_tokens": 7,
        "price_per_mtok": 2.0,
        "amount_usd": 7 * 2.0 / 1e6,
        "status": "ok",
        "detail": "",
        "at": 1.0,
        "entry_key": "dec_1/0",
    }
    a.record_settlements([entry])
    b.record_settlements([entry, {**entry, "entry_key": "dec_1/1", "tokens": 3}])
    totals = a.settlement_report()["totals"]
    assert [(t["node_id"], t["requests"], t["tokens"]) for t in totals] == [("n1", 2, 10)]


# -- the client --------------------------------------------------------------------------------------------------


class Gateways(httpx.BaseTransport):
    """The network edge: `down` hosts refuse connections, `dropping` ones close the connection mid-request."""

    def __init__(self, down: set[int], dropping: set[int] | None = None) -> None:
        self.down, self.dropping = down, dropping or set()
        self.calls: list[tuple[int, bytes, str]] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        port = request.url.port or 80
        self.calls.append((port, request.content, request.headers["host"]))
        if port in self.down:
            raise httpx.ConnectError("refused", request=request)
        if port in self.dropping:
            raise httpx.RemoteProtocolError("server disconnected", request=request)
        return httpx.Response(200, json={"port": port, "path": request.url.path})


def client_over(gateways: Gateways, ports: list[int], clock: list[float]) -> httpx.Client:
    transport = FailoverTransport([f"http://127.0.0.1:{p}" for p in ports], cooldown_s=5.0, inner=gateways)
    transport.rotation.clock = lambda: clock[0]
    return httpx.Client(transport=transport, base_url=f"http://127.0.0.1:{ports[0]}")


def test_the_client_moves_to_the_next_gateway_and_sends_the_same_request() -> None:
    net, clock = Gateways(down={8001}), [0.0]
    client = client_over(net, [8001, 8002], clock)
    resp = client.post("/v1/completions", content=b'{"prompt": "x"}')
    assert resp.json() == {"port": 8002, "path": "/v1/completions"}
    assert net.calls == [(8001, b'{"prompt": "x"}', "127.0.0.1:8001"), (8002, b'{"prompt": "x"}', "127.0.0.1:8002")]
    client.get("/v1/models")  # the failed gateway sits out its cooldown: not tried again
    assert [c[0] for c in net.calls[2:]] == [8002]
    net.down.clear()
    clock[0] = 6.0
    client.get("/v1/models")  # the client stays with the gateway that works
    assert [c[0] for c in net.calls[3:]] == [8002]


def test_a_connection_dropped_before_the_answer_is_retried_elsewhere() -> None:
    net = Gateways(down=set(), dropping={8001})
    assert client_over(net, [8001, 8002], [0.0]).get("/health").json()["port"] == 8002


def test_when_every_gateway_fails_the_error_names_them_all() -> None:
    net = Gateways(down={8001, 8002})
    with pytest.raises(NoGateway, match=r"8001.*ConnectError.*8002.*ConnectError"):
        client_over(net, [8001, 8002], [0.0]).get("/health")


@given(failed=st.lists(st.integers(0, 3), max_size=12), now=st.floats(0, 20))
def test_rotation_tries_every_gateway_once_healthy_ones_first(failed: list[int], now: float) -> None:
    clock = [0.0]
    rotation = Rotation([f"http://h{i}:1" for i in range(4)], cooldown_s=5.0, clock=lambda: clock[0])
    for k, index in enumerate(failed):
        clock[0] = k * 0.5
        rotation.failed(index)
    clock[0] = now
    order = rotation.order()
    assert sorted(order) == [0, 1, 2, 3]
    cooling = {i for k, i in enumerate(failed) if k * 0.5 + 5.0 > now}
    assert set(order[: 4 - len(cooling)]).isdisjoint(cooling)
