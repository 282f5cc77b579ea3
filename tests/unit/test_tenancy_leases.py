"""Budgets across gateways (gateway/tenancy/leases.py): each gateway spends a key's budget from a lease the store
grants, so the gateways together never spend more than the budget and what was in flight when it ran out, whatever
order their requests come in and however stale their view of each other's spend; an idle gateway gives its unspent
lease back (once the store can take it), and one whose store is gone spends what it holds and no more."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gridserve.gateway.tenancy import Tenancy
from gridserve.gateway.tenancy.keys import KeyPolicy
from gridserve.gateway.tenancy.leases import IDLE_S, LEASE_SHARE
from gridserve.gateway.tenancy.limits import OverLimit
from gridserve.store import Store

T = TypeVar("T")
T0 = 1_800_000_000.0
BUDGET = 1.0


class Clock:
    def __init__(self) -> None:
        self.t = T0

    def __call__(self) -> float:
        return self.t


class Grid:
    """Gateways on one store, their clocks shared, none syncing unless told: the worst case for stale views."""

    def __init__(self, path: Path, gateways: int) -> None:
        self.loop = asyncio.Runner()  # one loop for all (a loop per call starts fresh worker threads each time)
        self.store = Store(f"sqlite:///{path}/db.sqlite")
        self.store.migrate()
        self.clock = Clock()
        self.gateways = [
            Tenancy(self.store, [], gateway_id=f"gw-{i}", sync_interval_s=0.1, clock=self.clock)
            for i in range(gateways)
        ]
        made = self.run(self.gateways[0].create("budgeted", KeyPolicy(budget_usd=BUDGET)))
        self.token = made["key"]
        for g in self.gateways:
            g.sync.load()

    def run(self, work: Coroutine[Any, Any, T]) -> T:
        return self.loop.run(work)

    def close(self) -> None:
        self.loop.close()
        self.store.engine.dispose()

    def key(self, g: Tenancy) -> object:
        found = g.authenticate(self.token)
        assert found is not None
        return found

    def request(self, i: int, cost: float) -> bool:
        """One request on gateway `i` that costs `cost` when it ends; whether it was admitted."""
        g = self.gateways[i]
        key = self.key(g)
        try:
            self.run(g.reserve(key))  # type: ignore[arg-type]
            admission = g.admit(key, model="m", tier=None, tokens=1)  # type: ignore[arg-type]
        except OverLimit:
            return False
        admission.charge(1, cost, failed=False)
        admission.close()
        return True

    def sync(self, i: int) -> None:
        self.run(self.gateways[i].sync.sync_once())

    def spent(self) -> float:
        return sum(c.own.spent_usd for g in self.gateways for c in g.limiter.keys.values())


@pytest.fixture
def grid(tmp_path: Path) -> Iterator[Grid]:
    made = Grid(tmp_path, 3)
    try:
        yield made
    finally:
        made.close()


def test_a_lease_is_a_slice_of_the_budget_and_grows_as_it_is_spent(grid: Grid) -> None:
    assert grid.request(0, 0.04)
    counts = next(iter(grid.gateways[0].limiter.keys.values()))
    assert counts.lease_usd == pytest.approx(LEASE_SHARE * BUDGET)
    for _ in range(10):
        assert grid.request(0, 0.04)
    assert counts.lease_usd is not None and counts.own.spent_usd < counts.lease_usd <= BUDGET


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    steps=st.lists(
        st.tuples(st.integers(0, 2), st.floats(0.02, 0.2), st.booleans(), st.floats(0.0, 3.0)),
        min_size=30,
        max_size=80,
    )
)
def test_three_gateways_never_spend_beyond_the_budget_and_their_last_requests(tmp_path_factory, steps) -> None:  # type: ignore[no-untyped-def]
    """Requests in any order on any gateway, each at any cost, syncs now and then, time passing: the total spend
    never passes the budget by more than one request per gateway (the one each had in flight when it ran out)."""
    grid = Grid(tmp_path_factory.mktemp("leases"), 3)
    try:
        largest = 0.0
        for gateway, cost, sync, wait in steps:
            if grid.request(gateway, cost):
                largest = max(largest, cost)
            if sync:
                grid.sync(gateway)
            grid.clock.t += wait
        assert grid.spent() <= BUDGET + 3 * largest + 1e-9
    finally:
        grid.close()


def test_the_budget_is_all_usable_once_the_others_are_idle(grid: Grid) -> None:
    """A gateway that leased a slice and went quiet gives back what it did not spend: another spends the budget to
    its end."""
    assert grid.request(0, 0.01)
    assert grid.request(1, 0.01)
    grid.clock.t += IDLE_S + 1
    grid.sync(0)
    grid.sync(1)
    served = 0
    while grid.request(2, 0.05) and served < 100:
        served += 1
    assert grid.spent() >= BUDGET - 0.05 and grid.spent() <= BUDGET + 0.05
    assert served >= int((BUDGET - 0.02) / 0.05) - 1


def test_a_crashed_gateway_holds_its_lease_and_one_that_stops_gives_it_back(grid: Grid) -> None:
    """What a crashed gateway spent after it last wrote is unknown: its lease stays held (the budget is never
    overspent); a gateway that stops gives back what it did not spend, and the others spend it."""
    for _ in range(3):
        assert grid.request(0, 0.02)  # gateway 0 holds a lease, then crashes (never writes again)
    held = next(iter(grid.gateways[0].limiter.keys.values())).lease_usd
    assert held is not None and held > 0.06
    grid.clock.t += 60
    while grid.request(1, 0.05):
        pass
    assert grid.spent() <= BUDGET + 0.05
    assert grid.spent() >= BUDGET - held - 0.05  # all but gateway 0's lease
    grid.run(grid.gateways[0].leases.give_back())  # it ran again and stopped cleanly
    while grid.request(1, 0.05):
        pass
    assert BUDGET - 0.05 <= grid.spent() <= BUDGET + 0.05


def _store_down(monkeypatch: pytest.MonkeyPatch, g: Tenancy) -> None:
    def down(*args: object, **kwargs: object) -> float:
        raise ConnectionError("the database is restarting")

    monkeypatch.setattr(g.leases.keystore, "lease", down)
    monkeypatch.setattr(g.leases.keystore, "put_leases", down)


def test_a_gateway_that_cannot_reach_the_store_spends_its_lease_and_no_more(
    grid: Grid, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert grid.request(0, 0.01)
    g = grid.gateways[0]
    counts = next(iter(g.limiter.keys.values()))
    held = counts.lease_usd
    assert held == pytest.approx(LEASE_SHARE * BUDGET)
    _store_down(monkeypatch, g)
    cost = 1 / 64  # (exact in binary: the spend's sum has no rounding)
    served = 1
    while grid.request(0, cost) and served < 100:
        served += 1
    # the whole lease, however long the outage: requests go on while the spend is below it
    assert served == 1 + math.ceil((held - 0.01) / cost)
    assert held <= counts.own.spent_usd < held + cost
    with pytest.raises(OverLimit) as refused:
        grid.run(g.reserve(grid.key(g)))  # type: ignore[arg-type]
        g.admit(grid.key(g), model="m", tier=None, tokens=1)  # type: ignore[arg-type]
    assert refused.value.status == 429 and "committed its budget" in str(refused.value)
    assert (b"retry-after", b"1") in refused.value.headers
    monkeypatch.undo()  # the store is back: the next request takes a new slice past the spend
    spent = counts.own.spent_usd
    assert grid.request(0, 0.01)
    assert counts.lease_usd == pytest.approx(spent + LEASE_SHARE * BUDGET)


def test_a_give_back_the_store_missed_is_written_with_a_later_sync(grid: Grid, monkeypatch: pytest.MonkeyPatch) -> None:
    """An idle gateway's give-back that failed to reach the store is written once the store is back: the budget
    it did not spend becomes the others' again."""
    assert grid.request(0, 0.01)
    g = grid.gateways[0]
    grid.clock.t += IDLE_S + 1
    _store_down(monkeypatch, g)  # the lease writes fail; the key counters still get through
    with pytest.raises(ConnectionError):
        grid.sync(0)
    assert g.leases.unwritten
    monkeypatch.undo()
    grid.sync(0)
    assert not g.leases.unwritten
    while grid.request(1, 0.05):
        pass
    assert BUDGET - 0.05 <= grid.spent() <= BUDGET + 0.05
