"""The gateway's fair queue (gateway/tenancy/queue.py) driven by asyncio.run and a capacity we set: room up to the
model's slots, classes in priority order, the batch share, deficit round robin among the keys of a class (and, as a
property, its fairness bound), deadlines, cancellation, a full queue, `poke`; `SlotCount` over fake node records;
the queue through `Tenancy` over a real SQLite store; and the shares and deadlines as the gateway's settings
(`--queue-share`, `--queue-deadline`)."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gridserve.gateway.api.errors import APIError
from gridserve.gateway.registry.record import TELEMETRY_FIELDS
from gridserve.gateway.tenancy import Tenancy
from gridserve.gateway.tenancy.queue import (
    DEADLINES_S,
    RETRY_AFTER_S,
    SHARES,
    UNLIMITED,
    FairQueue,
    SlotCount,
    parse_class_values,
)
from gridserve.store import Store
from gridserve.types import NodeState

M = "m"
FAST = {"interactive": 0.05, "standard": 0.05, "batch": 0.05}
"""Deadlines short enough for a test to see them pass."""
LONG = {"interactive": 30.0, "standard": 30.0, "batch": 30.0}


class Clock:
    def __init__(self, t: float = 100.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class Cap:
    """A capacity we set: `n` slots for every model."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __call__(self, model: str) -> int:
        return self.n


async def until(pred: Callable[[], bool], what: str, spins: int = 500) -> None:
    """Run the loop until `pred` holds (a woken waiter takes a few loop turns to resume)."""
    for _ in range(spins):
        if pred():
            return
        await asyncio.sleep(0)
    raise AssertionError(f"never: {what}")


async def settle(turns: int = 30) -> None:
    for _ in range(turns):
        await asyncio.sleep(0)


class Waiters:
    """Tasks that each `enter` the queue and record, in order, the name they were given once they got a slot."""

    def __init__(self, queue: FairQueue) -> None:
        self.queue = queue
        self.woken: list[str] = []
        self.waited: dict[str, float] = {}
        self.tasks: dict[str, asyncio.Task[None]] = {}

    async def add(self, name: str, key_id: str, priority: Any = "standard", model: str = M) -> None:
        """Start a waiter and let it reach its place in the queue."""

        async def go() -> None:
            self.waited[name] = await self.queue.enter(model, priority, key_id)
            self.woken.append(name)

        before = self.queue.waiting
        self.tasks[name] = asyncio.create_task(go())
        await until(lambda: self.queue.waiting == before + 1 or name in self.woken, f"{name} queued")

    async def free_one(self, model: str = M) -> str:
        """`leave` once and return who got the slot."""
        n = len(self.woken)
        self.queue.leave(model)
        await until(lambda: len(self.woken) == n + 1, "one waiter woken")
        await settle()
        assert len(self.woken) == n + 1, f"one leave woke several: {self.woken[n:]}"
        return self.woken[-1]


def run(main: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(main())  # type: ignore[arg-type]


# -- room -----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("slots", [1, 3])
def test_n_slots_n_enter_at_once_the_next_waits_for_a_leave_and_reports_its_wait(slots: int) -> None:
    async def main() -> None:
        clock = Clock()
        q = FairQueue(Cap(slots), deadlines_s=LONG, clock=clock)
        waits = [await q.enter(M, "standard", f"k{i}") for i in range(slots)]
        assert waits == [0.0] * slots
        assert q.inflight[M] == slots and q.waiting == 0
        w = Waiters(q)
        await w.add("late", "k9")
        await settle()
        assert w.woken == [] and q.waiting == 1 and q.inflight[M] == slots
        clock.t += 1.5
        assert await w.free_one() == "late"
        assert w.waited["late"] == pytest.approx(1.5)
        assert q.inflight[M] == slots and q.waiting == 0

    run(main)


def test_capacity_unlimited_never_waits() -> None:
    async def main() -> None:
        q = FairQueue(Cap(UNLIMITED), deadlines_s=FAST)
        waits = [await q.enter(M, p, "k") for p in ("batch", "standard", "interactive") * 50]
        assert waits == [0.0] * 150
        assert q.inflight[M] == 150 and q.waiting == 0

    run(main)


# -- priority and the batch share -----------------------------------------------------------------------------------


def test_leaves_wake_interactive_then_standard_then_batch_whatever_the_arrival_order() -> None:
    async def main() -> None:
        q = FairQueue(Cap(1), deadlines_s=LONG)
        assert await q.enter(M, "standard", "filler") == 0.0
        w = Waiters(q)
        await w.add("batch", "kb", "batch")
        await w.add("standard", "ks", "standard")
        await w.add("interactive", "ki", "interactive")
        assert q.waiting == 3
        assert [await w.free_one() for _ in range(3)] == ["interactive", "standard", "batch"]
        assert q.waiting == 0 and q.inflight[M] == 1

    run(main)


def test_batch_fills_three_of_four_slots_and_interactive_still_enters_at_once() -> None:
    async def main() -> None:
        q = FairQueue(Cap(4), deadlines_s=LONG)  # SHARES: batch 0.75
        assert [await q.enter(M, "batch", "kb") for _ in range(3)] == [0.0] * 3
        w = Waiters(q)
        await w.add("b4", "kb", "batch")
        await w.add("b5", "kb", "batch")
        await settle()
        assert w.woken == [] and q.inflight[M] == 3 and q.waiting == 2
        assert await q.enter(M, "interactive", "ki") == 0.0, "interactive found the fourth slot"
        assert q.inflight[M] == 4
        q.leave(M)  # the interactive request ends: batch is still at its share
        await settle()
        assert w.woken == [] and q.inflight[M] == 3 and q.waiting == 2
        assert await w.free_one() == "b4"  # a batch request ends: the next batch one takes its place
        assert q.inflight[M] == 3 and q.waiting == 1

    run(main)


def test_a_new_request_does_not_jump_ahead_of_those_waiting_in_its_class_or_above() -> None:
    async def main() -> None:
        cap = Cap(1)
        q = FairQueue(cap, deadlines_s=LONG)
        await q.enter(M, "standard", "filler")
        w = Waiters(q)
        await w.add("first", "k1", "standard")
        cap.n = 3  # room appeared; the sweep's poke has not come yet
        await w.add("second", "k2", "standard")
        await settle()
        assert w.woken == [] and q.waiting == 2, "the newcomer queued behind the standard request waiting"
        assert await q.enter(M, "interactive", "ki") == 0.0, "nothing waits at or above interactive"
        q.poke()
        await until(lambda: len(w.woken) == 1, "one woken")
        await settle()
        assert w.woken == ["first"] and q.inflight[M] == 3 and q.waiting == 1

    run(main)


# -- fairness among the keys of a class -----------------------------------------------------------------------------


def test_round_robin_b_is_not_stuck_behind_all_of_a() -> None:
    async def main() -> None:
        q = FairQueue(Cap(1), deadlines_s=LONG)
        await q.enter(M, "standard", "filler")
        w = Waiters(q)
        for i in range(6):
            await w.add(f"A{i}", "A")
        for i in range(2):
            await w.add(f"B{i}", "B")
        order = [await w.free_one() for _ in range(8)]
        assert [name[0] for name in order] == list("ABABAAAA")
        assert order == ["A0", "B0", "A1", "B1", "A2", "A3", "A4", "A5"], "each key's own requests in order"
        assert q.waiting == 0

    run(main)


OPS = st.lists(st.one_of(st.sampled_from(["A", "B", "C", "D"]), st.just("leave")), min_size=1, max_size=40)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=OPS)
def test_property_drr_keys_backlogged_together_are_served_within_one_of_each_other(ops: list[str]) -> None:
    """Arrivals (a key's waiting request) and leaves in any order, then leaves until the queue is empty: while two keys
    both have requests waiting, neither is served more than once more than the other; everyone is woken once."""

    async def main() -> None:
        q = FairQueue(Cap(1), deadlines_s=LONG)
        await q.enter(M, "standard", "filler")
        w = Waiters(q)
        pending: dict[str, int] = {}
        together: dict[tuple[str, str], int] = {}
        """For each pair of keys both waiting (continuously) since some moment: the first's serves less the
        second's since that moment."""
        n = 0

        def refresh() -> None:
            backlogged = {k for k, c in pending.items() if c > 0}
            for pair in list(together):
                if not set(pair) <= backlogged:
                    del together[pair]
            for a in backlogged:
                for b in backlogged:
                    if a != b:
                        together.setdefault((a, b), 0)

        async def leave() -> None:
            name = await w.free_one()
            key = name.split("#")[0]
            # the served key was waiting; its balance against every key waiting with it moves by one
            for (a, b), d in list(together.items()):
                together[(a, b)] = d + (a == key) - (b == key)
                assert together[(a, b)] <= 1, f"{a} served {together[(a, b)]} more than {b} since both waited: {ops}"
            pending[key] -= 1
            refresh()

        for op in [*ops, *["leave"] * len(ops)]:
            if op == "leave":
                if q.waiting:
                    await leave()
                continue
            await w.add(f"{op}#{n}", op)
            n += 1
            pending[op] = pending.get(op, 0) + 1
            refresh()
        assert q.waiting == 0 and q.inflight[M] == 1
        assert sorted(w.woken) == sorted(w.tasks), "every waiter woken exactly once"
        assert len(w.woken) == len(set(w.woken)) == n
        for key in pending:  # and each key's own requests in their order
            mine = [int(x.split("#")[1]) for x in w.woken if x.startswith(key + "#")]
            assert mine == sorted(mine)

    run(main)


# -- deadlines, cancellation, a full queue, poke -------------------------------------------------------------------


def test_past_its_deadline_a_waiter_gets_503_queue_timeout_and_leaves_the_queue() -> None:
    async def main() -> None:
        deadlines = {**FAST, "standard": 30.0}
        q = FairQueue(Cap(1), deadlines_s=deadlines)
        await q.enter(M, "standard", "filler")
        w = Waiters(q)
        await w.add("standard", "ks", "standard")  # outlasts the test
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(APIError) as refused:
            await q.enter(M, "interactive", "ki")
        assert 0.04 <= loop.time() - started < 2.0
        exc = refused.value
        assert (exc.status, exc.code, exc.type) == (503, "queue_timeout", "service_unavailable")
        assert dict(exc.headers) == {b"retry-after": str(RETRY_AFTER_S).encode()}
        assert exc.response().headers["retry-after"] == str(RETRY_AFTER_S)
        assert q.timed_out == 1 and q.waiting == 1
        assert q.lanes[M].waiting("interactive") == 0, "the timed-out interactive request left the lane"
        # were it still there, interactive would go first; the slot goes to the standard request
        assert await w.free_one() == "standard"
        assert q.inflight[M] == 1 and q.waiting == 0 and q.timed_out == 1

    run(main)


def test_a_timed_out_waiter_is_not_handed_a_later_slot() -> None:
    async def main() -> None:
        q = FairQueue(Cap(1), deadlines_s=FAST)
        await q.enter(M, "batch", "filler")
        with pytest.raises(APIError):
            await q.enter(M, "batch", "k")
        assert (q.waiting, q.timed_out, q.inflight[M]) == (0, 1, 1)
        q.leave(M)
        assert q.inflight[M] == 0, "no slot went to the request that gave up"
        assert await q.enter(M, "batch", "k2") == 0.0

    run(main)


def test_cancelling_a_waiter_takes_it_out_and_leaks_no_slot() -> None:
    async def main() -> None:
        q = FairQueue(Cap(1), deadlines_s=LONG)
        await q.enter(M, "standard", "filler")
        w = Waiters(q)
        await w.add("gone", "k1", "interactive")
        await w.add("stays", "k2", "standard")
        assert q.waiting == 2
        w.tasks["gone"].cancel()
        with pytest.raises(asyncio.CancelledError):
            await w.tasks["gone"]
        assert q.waiting == 1 and q.inflight[M] == 1 and q.timed_out == 0
        assert await w.free_one() == "stays"
        assert q.inflight[M] == 1 and q.waiting == 0
        q.leave(M)
        assert q.inflight[M] == 0

    run(main)


def test_cancelled_then_granted_before_it_ran_gives_the_slot_back() -> None:
    """The client leaves (cancel), and a slot is handed to its request before its task runs again."""

    async def main() -> None:
        q = FairQueue(Cap(1), deadlines_s=LONG)
        await q.enter(M, "standard", "filler")
        w = Waiters(q)
        await w.add("gone", "k1")
        await w.add("next", "k2")
        w.tasks["gone"].cancel()
        q.leave(M)  # dispatch hands the slot to "gone", still in the lane
        with pytest.raises(asyncio.CancelledError):
            await w.tasks["gone"]
        await until(lambda: w.woken == ["next"], "the slot given back passed on to the next waiter")
        assert q.inflight[M] == 1 and q.waiting == 0

    run(main)


def test_granted_then_cancelled_in_the_same_turn_gives_the_slot_back() -> None:
    async def main() -> None:
        q = FairQueue(Cap(1), deadlines_s=LONG)
        await q.enter(M, "standard", "filler")
        w = Waiters(q)
        await w.add("gone", "k1")
        await w.add("next", "k2")
        q.leave(M)  # grants "gone" a slot...
        w.tasks["gone"].cancel()  # ...as its client leaves
        outcome = await asyncio.wait_for(asyncio.gather(w.tasks["gone"], return_exceptions=True), 5)
        assert isinstance(outcome[0], asyncio.CancelledError), f"the cancel was lost: {outcome}, woken {w.woken}"
        await until(lambda: w.woken == ["next"], "the slot given back passed on to the next waiter")
        assert q.inflight[M] == 1 and q.waiting == 0

    run(main)


def test_a_full_queue_answers_503_at_once() -> None:
    async def main() -> None:
        q = FairQueue(Cap(1), deadlines_s=LONG, max_waiting=2)
        await q.enter(M, "standard", "filler")
        await q.enter("other", "standard", "filler")
        w = Waiters(q)
        await w.add("one", "k1", model=M)
        await w.add("two", "k2", model="other")  # the bound is over all models
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(APIError) as refused:
            await asyncio.wait_for(q.enter(M, "interactive", "k3"), 1)
        assert loop.time() - started < 0.5, "refused at once, not after its 30 s deadline"
        exc = refused.value
        assert (exc.status, exc.code) == (503, "queue_timeout")
        assert "queue is full (2 requests waiting)" in exc.message
        assert dict(exc.headers)[b"retry-after"] == str(RETRY_AFTER_S).encode()
        assert q.waiting == 2 and q.inflight == {M: 1, "other": 1}
        assert await w.free_one(M) == "one"
        assert await w.free_one("other") == "two"

    run(main)


def test_poke_gives_new_capacity_to_waiters_without_a_leave() -> None:
    async def main() -> None:
        cap = Cap(1)
        q = FairQueue(cap, deadlines_s=LONG)
        await q.enter(M, "standard", "filler")
        w = Waiters(q)
        for name in ("w1", "w2", "w3"):
            await w.add(name, name)
        cap.n = 3  # a node joined
        await settle()
        assert w.woken == [], "nothing wakes them until poke"
        q.poke()
        await until(lambda: len(w.woken) == 2, "two woken")
        await settle()
        assert w.woken == ["w1", "w2"] and q.inflight[M] == 3 and q.waiting == 1

    run(main)


def test_other_gateways_requests_take_their_share_of_the_slots() -> None:
    """On a shared grid a batch flood through another gateway holds three of four slots: this gateway's batch
    requests wait, its interactive one starts at once, and the batch ones go when the others' requests end (the
    nodes report fewer: the sweep's poke)."""

    async def main() -> None:
        others = {M: 3}
        q = FairQueue(Cap(4), elsewhere=lambda model: others.get(model, 0), deadlines_s=LONG)
        w = Waiters(q)
        await w.add("b1", "kb", "batch")
        await settle()
        assert w.woken == [] and q.waiting == 1, "the other gateway's batch requests fill the batch share"
        assert await q.enter(M, "interactive", "ki") == 0.0, "interactive found the fourth slot"
        others[M] = 1
        q.poke()
        await until(lambda: w.woken == ["b1"], "b1 woken once the others' requests ended")
        assert q.inflight[M] == 2

    run(main)


# -- SlotCount ------------------------------------------------------------------------------------------------------


def node(
    state: NodeState,
    slots: int | None,
    models: tuple[str, ...],
    interleaved: bool = False,
    max_running: int | None = None,
) -> Any:
    hw = None if slots is None else SimpleNamespace(batch_slots=slots)
    offers = {name: object() for name in models}
    static = SimpleNamespace(hw=hw, offers=offers, interleaved=interleaved, max_running=max_running)
    return SimpleNamespace(state=state, static=static, telemetry_row=None, outstanding=0)


def test_slot_count_sums_live_nodes_per_model_and_ignores_down_ones() -> None:
    nodes = [
        node(NodeState.UP, 4, ("a", "b")),
        node(NodeState.SUSPECT, 2, ("a",)),
        node(NodeState.PROBATION, 0, ("b",)),  # a node with no slot figure counts one
        node(NodeState.DOWN, 8, ("a", "c")),
        node(NodeState.EJECTED, 8, ("a",)),
        node(NodeState.UP, None, ("d",)),  # unknown hardware: one
    ]
    count = SlotCount(lambda: nodes)
    assert (count("a"), count("b"), count("c"), count("d")) == (6, 5, UNLIMITED, 1)
    assert count("nobody-serves-it") == UNLIMITED


def test_slot_count_a_model_on_any_live_interleaved_node_is_unlimited() -> None:
    nodes = [
        node(NodeState.UP, 4, ("a", "b")),
        node(NodeState.UP, 1, ("a",), interleaved=True),
        node(NodeState.DOWN, 1, ("b",), interleaved=True),  # down: it does not count
    ]
    count = SlotCount(lambda: nodes)
    assert (count("a"), count("b")) == (UNLIMITED, 4)


def test_slot_count_takes_what_a_node_said_it_runs_at_once_over_its_cards_batch_slots() -> None:
    nodes = [
        node(NodeState.UP, 8, ("a",), max_running=64),  # an upstream server's --max-running
        node(NodeState.UP, 8, ("a", "b"), max_running=3),
        node(NodeState.UP, 8, ("c",), max_running=0),  # runs every request at once
        node(NodeState.UP, 8, ("c", "d")),  # not said: the catalogue's 8
    ]
    count = SlotCount(lambda: nodes)
    assert (count("a"), count("b"), count("c"), count("d")) == (67, 3, UNLIMITED, 8)


def test_slot_count_recounts_only_after_its_ttl() -> None:
    clock = Clock(0.0)
    nodes = [node(NodeState.UP, 4, ("a",))]
    calls = []

    def records() -> list[Any]:
        calls.append(clock.t)
        return list(nodes)

    count = SlotCount(records, ttl_s=1.0, clock=clock)
    assert count("a") == 4
    nodes.append(node(NodeState.UP, 2, ("a",)))
    clock.t = 0.5
    assert count("a") == 4, "within its ttl: the old count"
    clock.t = 1.0
    assert count("a") == 4
    clock.t = 1.01
    assert count("a") == 6
    assert calls == [0.0, 1.01]


def busy(state: NodeState, slots: int, models: tuple[str, ...], *, active: int, queued: int, ours: int) -> Any:
    """A node that last reported `active` and `queued` requests, `ours` of them this gateway's."""
    made = node(state, slots, models)
    reported = {"active_requests": active, "queue_depth": queued}
    made.telemetry_row = tuple(reported.get(name, 0) for name in TELEMETRY_FIELDS)
    made.outstanding = ours
    return made


def test_slot_count_on_a_shared_grid_counts_the_other_gateways_requests() -> None:
    nodes = [
        busy(NodeState.UP, 8, ("a", "b"), active=6, queued=1, ours=2),  # 5 of another gateway's
        busy(NodeState.UP, 8, ("a",), active=3, queued=0, ours=4),  # ours started since its heartbeat: none
        busy(NodeState.DOWN, 8, ("a",), active=8, queued=0, ours=0),  # down: not counted
    ]
    nodes.append(node(NodeState.UP, 4, ("b",)))  # no telemetry yet: none
    shared = SlotCount(lambda: nodes, shared=True)
    assert (shared("a"), shared.elsewhere("a"), shared("b"), shared.elsewhere("b")) == (16, 5, 12, 5)
    alone = SlotCount(lambda: nodes)
    assert (alone("a"), alone.elsewhere("a")) == (16, 0), "a gateway alone on its grid counts only its own"


def test_slot_count_with_real_records() -> None:
    from tests.conftest import bare_record

    records = [bare_record(1, NodeState.UP), bare_record(2, NodeState.DOWN)]
    count = SlotCount(lambda: records)
    assert count("anything") == UNLIMITED  # bare records offer no models


# -- through Tenancy ------------------------------------------------------------------------------------------------


def tenancy(tmp_path: Path) -> Tenancy:
    store = Store(f"sqlite:///{tmp_path}/db.sqlite")
    store.migrate()
    return Tenancy(store, ["static-key"], gateway_id="g", sync_interval_s=1.0, capacity=lambda m: 1)


def test_tenancy_wait_for_room_records_the_wait_and_close_frees_the_slot(tmp_path: Path) -> None:
    t = tenancy(tmp_path)
    key = t.authenticate("static-key")
    assert key is not None

    async def main() -> None:
        first = t.admit(key, model=M, tier=None, tokens=10)
        await t.wait_for_room(first, M)
        assert first.queue_wait_s == 0.0 and t.queue.inflight[M] == 1
        second = t.admit(key, model=M, tier=None, tokens=10)
        task = asyncio.create_task(t.wait_for_room(second, M))
        await until(lambda: t.queue.waiting == 1, "second queued")
        await asyncio.sleep(0.02)
        assert not task.done()
        first.close()
        await asyncio.wait_for(task, 5)
        assert second.queue_wait_s >= 0.015
        assert t.queue.inflight[M] == 1 and t.queue.waiting == 0
        first.close()  # closing twice frees nothing more
        assert t.queue.inflight[M] == 1
        second.close()
        assert t.queue.inflight[M] == 0

    run(main)


def test_tenancy_a_queue_timeout_is_counted_as_a_refusal(tmp_path: Path) -> None:
    t = tenancy(tmp_path)
    t.queue.deadlines_s = FAST
    key = t.authenticate("static-key")
    assert key is not None

    async def main() -> None:
        holder = t.admit(key, model=M, tier=None, tokens=0)
        await t.wait_for_room(holder, M)
        late = t.admit(key, model=M, tier=None, tokens=0)
        with pytest.raises(APIError) as refused:
            await t.wait_for_room(late, M)
        assert (refused.value.status, refused.value.code) == (503, "queue_timeout")
        assert t.usage.keys[key.key_id].refused == {"queue_timeout": 1}
        late.close()  # it never got a slot: closing it frees none
        assert t.queue.inflight[M] == 1
        holder.close()
        assert t.queue.inflight[M] == 0

    run(main)


# -- the shares and deadlines are the gateway's settings -------------------------------------------------------------


def test_parse_class_values_takes_class_equals_number_the_last_of_a_class_winning() -> None:
    assert parse_class_values("--queue-deadline", []) == {}
    found = parse_class_values("--queue-deadline", ["interactive=5", " batch = 600 ", "batch=300", "standard=0.5"])
    assert found == {"interactive": 5.0, "batch": 300.0, "standard": 0.5}
    assert parse_class_values("--queue-share", ["batch=1", "standard=0.25"], at_most=1.0) == {
        "batch": 1.0,
        "standard": 0.25,
    }


@pytest.mark.parametrize(
    ("flag", "item", "at_most", "says"),
    [
        ("--queue-share", "gold=0.5", 1.0, "--queue-share 'gold=0.5': unknown class 'gold' (expected one of "),
        ("--queue-deadline", "Batch=10", math.inf, "unknown class 'Batch'"),
        ("--queue-share", "batch", 1.0, "--queue-share 'batch': expected CLASS=VALUE, CLASS one of interactive,"),
        ("--queue-share", "=0.5", 1.0, "unknown class ''"),
        ("--queue-share", "batch=0", 1.0, "--queue-share 'batch=0': expected a number above 0 and at most 1"),
        ("--queue-share", "batch=1.5", 1.0, "expected a number above 0 and at most 1"),
        ("--queue-deadline", "batch=-3", math.inf, "--queue-deadline 'batch=-3': expected a number above 0"),
        ("--queue-deadline", "batch=", math.inf, "expected a number above 0"),
        ("--queue-deadline", "batch=soon", math.inf, "expected a number above 0"),
        ("--queue-deadline", "batch=nan", math.inf, "expected a number above 0"),
        ("--queue-deadline", "batch=inf", math.inf, "expected a number above 0"),
    ],
)
def test_parse_class_values_refuses_unknown_classes_and_values_out_of_range(
    flag: str, item: str, at_most: float, says: str
) -> None:
    with pytest.raises(ValueError) as refused:
        parse_class_values(flag, ["standard=1", item], at_most=at_most)
    message = str(refused.value)
    assert says in message and "\n" not in message
    assert message.startswith(f"{flag} {item!r}: ")


def test_the_queue_takes_the_classes_it_is_given_and_the_defaults_for_the_others() -> None:
    q = FairQueue(Cap(4), shares={"batch": 0.5}, deadlines_s={"interactive": 2.0})
    assert q.shares == {**SHARES, "batch": 0.5}
    assert q.deadlines_s == {**DEADLINES_S, "interactive": 2.0}
    assert FairQueue(Cap(4)).shares == SHARES and FairQueue(Cap(4)).deadlines_s == DEADLINES_S
    assert SHARES["batch"] == 0.75 and DEADLINES_S["interactive"] == 10.0, "the defaults are left as they were"


def test_a_batch_share_of_a_half_fills_two_of_four_slots() -> None:
    async def main() -> None:
        q = FairQueue(Cap(4), shares={"batch": 0.5}, deadlines_s=LONG)
        assert [await q.enter(M, "batch", "kb") for _ in range(2)] == [0.0] * 2
        w = Waiters(q)
        await w.add("b3", "kb", "batch")
        await settle()
        assert w.woken == [] and q.inflight[M] == 2 and q.waiting == 1
        assert [await q.enter(M, "standard", "ks") for _ in range(2)] == [0.0] * 2, "standard has the rest"
        assert q.inflight[M] == 4
        q.leave(M)
        q.leave(M)
        await settle()
        assert w.woken == [] and q.inflight[M] == 2, "batch stays at its share"
        assert await w.free_one() == "b3"
        assert q.inflight[M] == 2

    run(main)


def test_a_class_waits_its_own_deadline() -> None:
    async def main() -> None:
        q = FairQueue(Cap(1), deadlines_s={"batch": 0.05})  # interactive keeps its 10 s
        await q.enter(M, "standard", "filler")
        w = Waiters(q)
        await w.add("interactive", "ki", "interactive")
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(APIError) as refused:
            await q.enter(M, "batch", "kb")
        assert 0.04 <= loop.time() - started < 2.0
        assert "No room for a batch request for m within 0.05 s" in refused.value.message
        assert w.woken == [] and q.timed_out == 1, "the interactive request still waits"
        assert await w.free_one() == "interactive"

    run(main)


def test_the_gateway_gives_its_settings_to_the_queue(tmp_path: Path) -> None:
    from gridserve.gateway.app import Gateway
    from gridserve.gateway.config import GatewayConfig
    from gridserve.trust import Identity

    store = Store(f"sqlite:///{tmp_path}/db.sqlite")
    store.migrate()
    config = GatewayConfig(queue_shares={"batch": 0.5}, queue_deadlines_s={"interactive": 3.0, "batch": 600.0})
    gw = Gateway(config, store, Identity.generate())
    try:
        assert gw.tenancy.queue.shares == {"interactive": 1.0, "standard": 1.0, "batch": 0.5}
        assert gw.tenancy.queue.deadlines_s == {"interactive": 3.0, "standard": 30.0, "batch": 600.0}
    finally:
        gw.writer.close()
        store.close()
    assert GatewayConfig().queue_shares == {} and GatewayConfig().queue_deadlines_s == {}


def test_the_gateway_command_takes_queue_flags_and_refuses_bad_ones_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    import gridserve.gateway.main as gateway_main
    from gridserve.cli.main import app

    started: list[Any] = []
    monkeypatch.setattr(gateway_main, "run_gateway", lambda config, **kw: started.append(config))
    runner = CliRunner()
    base = ["gateway", "--data-dir", str(tmp_path / "d"), "--api-key", "k", "--admin-token", "a"]
    flags = ["--queue-share", "batch=0.5", "--queue-deadline", "interactive=5", "--queue-deadline", "batch=600"]
    done = runner.invoke(app, [*base, *flags])
    assert done.exit_code == 0, done.output
    (config,) = started
    assert config.queue_shares == {"batch": 0.5}
    assert config.queue_deadlines_s == {"interactive": 5.0, "batch": 600.0}
    for bad, says in (
        (["--queue-share", "gold=0.5"], "error: --queue-share 'gold=0.5': unknown class 'gold'"),
        (["--queue-share", "batch=2"], "error: --queue-share 'batch=2': expected a number above 0 and at most 1"),
        (["--queue-deadline", "batch=0"], "error: --queue-deadline 'batch=0': expected a number above 0"),
    ):
        refused = runner.invoke(app, [*base, *bad])
        assert refused.exit_code == 2, refused.output
        assert refused.output.startswith(says) and refused.output.count("\n") == 1, refused.output
    assert len(started) == 1, "no gateway started on a bad flag"
