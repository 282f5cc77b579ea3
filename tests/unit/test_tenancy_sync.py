"""The key sync (gateway/tenancy/sync.py) over a fake KeyStore and a fake clock: this gateway's counts go out as
absolute rows (running totals in window 0, the current minute's in its own row) only when they moved or requests are
in flight; the other gateways' sums become `others`; changed keys reach the book; `load` restores this gateway's own
counts; a failing store leaves the limiter deciding from memory. And two syncs over one real SQLite file."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from gridserve.gateway.tenancy.book import KeyBook
from gridserve.gateway.tenancy.keys import ApiKey, KeyPolicy, digest
from gridserve.gateway.tenancy.limits import Counts, Limiter, OverLimit
from gridserve.gateway.tenancy.sync import KEEP_WINDOWS_S, KEY_SLACK_S, LIVE_S, PRUNE_EVERY_S, TenancySync
from gridserve.store import KeyStore, Store

W0 = 1_700_000_040.0
"""The start of a minute window."""


class Clock:
    def __init__(self, t: float = W0 + 10.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class FakeKeyStore:
    """The methods TenancySync calls, in memory, recording every call; `fail` makes the next calls raise."""

    def __init__(self) -> None:
        self.puts: list[list[dict[str, Any]]] = []
        self.keys: list[dict[str, Any]] = []
        self.sums: list[dict[str, Any]] = []
        self.own: list[dict[str, Any]] = []
        self.calls: list[tuple[str, Any]] = []
        self.fail: Exception | None = None
        self.fail_prune = False

    def _maybe_fail(self) -> None:
        if self.fail is not None:
            raise self.fail

    def put_usage(self, rows: Sequence[dict[str, Any]]) -> None:
        self._maybe_fail()
        self.puts.append([dict(r) for r in rows])

    def keys_changed_since(self, since: float) -> list[dict[str, Any]]:
        self._maybe_fail()
        self.calls.append(("keys_changed_since", since))
        return [r for r in self.keys if r["updated_at"] >= since]

    def usage_sums(self, windows: Sequence[float], *, exclude_gateway: str, live_since: float) -> list[dict[str, Any]]:
        self._maybe_fail()
        self.calls.append(("usage_sums", (list(windows), exclude_gateway, live_since)))
        return [dict(r) for r in self.sums]

    def own_usage(self, gateway_id: str, windows: Sequence[float]) -> list[dict[str, Any]]:
        self.calls.append(("own_usage", (gateway_id, list(windows))))
        return [r for r in self.own if r["gateway_id"] == gateway_id and r["window_start"] in windows]

    def prune_usage(self, before: float) -> int:
        self.calls.append(("prune_usage", before))
        if self.fail_prune:
            raise OSError("prune failed")
        return 0


def a_key(key_id: str = "k1", **policy: Any) -> ApiKey:
    return ApiKey(key_id=key_id, name=key_id, digest=digest(key_id), policy=KeyPolicy(**policy))


def setup(clock: Clock | None = None) -> tuple[FakeKeyStore, KeyBook, Limiter, TenancySync, Clock]:
    clock = clock or Clock()
    store, book, limiter = FakeKeyStore(), KeyBook(), Limiter(clock)
    sync = TenancySync(store, book, limiter, gateway_id="gw-a", interval_s=0.5, clock=clock)  # type: ignore[arg-type]
    return store, book, limiter, sync, clock


def sync_once(sync: TenancySync) -> None:
    asyncio.run(sync.sync_once())


def by_window(rows: list[dict[str, Any]]) -> dict[tuple[str, float], dict[str, Any]]:
    return {(r["key_id"], r["window_start"]): r for r in rows}


# -- writing this gateway's counts ---------------------------------------------------------------------------------


def test_dirty_counts_are_written_as_absolute_rows_totals_and_the_current_minute() -> None:
    store, _, limiter, sync, clock = setup()
    key = a_key()
    a = limiter.admit(key, 100)
    a.charge(40, 0.25, failed=True)
    a.close()
    held = limiter.admit(key, 30)
    sync_once(sync)
    assert len(store.puts) == 1
    rows = by_window(store.puts[0])
    assert set(rows) == {("k1", 0.0), ("k1", W0)}
    base = {"key_id": "k1", "gateway_id": "gw-a", "updated_at": clock.t}
    assert rows["k1", 0.0] == {
        **base,
        "window_start": 0.0,
        "requests": 0,
        "tokens": 0,
        "spent_usd": 0.25,
        "errors": 1,
        "inflight": 1,
    }
    assert rows["k1", W0] == {
        **base,
        "window_start": W0,
        "requests": 2,
        "tokens": 70,
        "spent_usd": 0.0,
        "errors": 0,
        "inflight": 0,
    }
    held.close()
    limiter.admit(key, 5).close()
    clock.t += 1
    sync_once(sync)
    rows = by_window(store.puts[1])
    assert rows["k1", W0]["requests"] == 3 and rows["k1", W0]["tokens"] == 40, "absolute, not the change"
    assert rows["k1", 0.0]["inflight"] == 0 and rows["k1", 0.0]["spent_usd"] == 0.25


def test_unchanged_counts_are_not_rewritten_unless_requests_are_in_flight() -> None:
    store, _, limiter, sync, clock = setup()
    limiter.admit(a_key("idle"), 1).close()
    held = limiter.admit(a_key("busy"), 1)
    sync_once(sync)
    assert {r["key_id"] for r in store.puts[0]} == {"idle", "busy"}
    clock.t += 1
    sync_once(sync)
    assert {(r["key_id"], r["window_start"]) for r in store.puts[1]} == {("busy", 0.0), ("busy", W0)}
    assert {r["updated_at"] for r in store.puts[1]} == {clock.t}, "a live row: the others keep counting it"
    held.close()
    clock.t += 1
    sync_once(sync)
    assert by_window(store.puts[2])["busy", 0.0]["inflight"] == 0, "the close itself is written"
    clock.t += 1
    sync_once(sync)
    assert store.puts[3] == []


def test_a_key_idle_into_a_new_minute_writes_a_zero_row_for_it() -> None:
    store, _, limiter, sync, clock = setup()
    held = limiter.admit(a_key(), 9)
    clock.t = W0 + 65.0
    sync_once(sync)
    rows = by_window(store.puts[0])
    assert set(rows) == {("k1", 0.0), ("k1", W0 + 60.0)}
    assert (rows["k1", W0 + 60.0]["requests"], rows["k1", W0 + 60.0]["tokens"]) == (0, 0)
    assert rows["k1", 0.0]["inflight"] == 1
    held.close()


def test_static_keys_are_never_written() -> None:
    store, _, limiter, sync, _ = setup()
    static = ApiKey(key_id="static-1", name="s", digest=digest("s"), policy=KeyPolicy(), static=True)
    limiter.admit(static, 5)
    sync_once(sync)
    assert store.puts == [[]]


# -- reading the others' counts and the keys -----------------------------------------------------------------------


def test_others_sums_land_in_others_and_vanished_ones_reset() -> None:
    store, _, limiter, sync, clock = setup()
    limiter.admit(a_key("mine", rpm=10), 1).close()
    limiter.admit(a_key("quiet"), 1).close()
    limiter.counts("quiet").others = Counts(window=W0, requests=4, spent_usd=9.0)
    store.sums = [
        {
            "key_id": "mine",
            "window_start": 0.0,
            "requests": 0,
            "tokens": 0,
            "spent_usd": 1.5,
            "errors": 2,
            "inflight": 3,
        },
        {
            "key_id": "mine",
            "window_start": W0,
            "requests": 7,
            "tokens": 70,
            "spent_usd": 0.0,
            "errors": 0,
            "inflight": 0,
        },
        {
            "key_id": "mine",
            "window_start": W0 - 60.0,
            "requests": 99,
            "tokens": 990,
            "spent_usd": 0.0,
            "errors": 0,
            "inflight": 0,
        },
        {
            "key_id": "theirs",
            "window_start": W0,
            "requests": 5,
            "tokens": None,
            "spent_usd": None,
            "errors": None,
            "inflight": None,
        },
    ]
    sync_once(sync)
    assert limiter.counts("mine").others == Counts(
        window=W0, requests=7, tokens=70, spent_usd=1.5, errors=2, inflight=3
    )
    assert limiter.counts("theirs").others == Counts(window=W0, requests=5)
    assert limiter.counts("quiet").others == Counts(window=W0), "no rows: nothing of the others any more"
    assert ("usage_sums", ([0.0, W0], "gw-a", clock.t - LIVE_S)) in store.calls
    assert sync.last_sync_at == clock.t
    limiter.admit(a_key("mine", rpm=10), 1)
    limiter.admit(a_key("mine", rpm=10), 1)  # 3 own + 7 others = 10
    with pytest.raises(OverLimit):
        limiter.admit(a_key("mine", rpm=10), 1)


def test_changed_keys_are_applied_to_the_book_reread_behind_the_cursor() -> None:
    store, book, _, sync, clock = setup()
    key = "gsk_abc.secret"
    store.keys = [
        {
            "key_id": "abc",
            "name": "n",
            "digest": digest(key),
            "created_at": W0,
            "updated_at": W0 + 1.0,
            "revoked_at": None,
            "policy": {"rpm": 3},
        },
    ]
    sync_once(sync)
    assert ("keys_changed_since", 0.0) in store.calls
    found = book.authenticate(key)
    assert found is not None and found.policy.rpm == 3
    assert book.cursor == W0 + 1.0
    store.keys = [{**store.keys[0], "updated_at": W0 + 8.0, "revoked_at": W0 + 8.0}]
    clock.t += 1
    sync_once(sync)
    assert ("keys_changed_since", W0 + 1.0 - KEY_SLACK_S) in store.calls
    assert book.authenticate(key) is None
    assert book.cursor == W0 + 8.0


def test_prune_runs_at_most_every_prune_interval_and_its_failure_is_ignored() -> None:
    store, _, _, sync, clock = setup()
    store.fail_prune = True
    sync_once(sync)
    first = clock.t
    clock.t += PRUNE_EVERY_S - 1
    sync_once(sync)
    clock.t = first + PRUNE_EVERY_S
    sync_once(sync)
    prunes = [arg for name, arg in store.calls if name == "prune_usage"]
    assert prunes == [first - KEEP_WINDOWS_S, first + PRUNE_EVERY_S - KEEP_WINDOWS_S]
    assert sync.last_sync_at == clock.t


# -- load at start -------------------------------------------------------------------------------------------------


def test_load_restores_this_gateways_own_counts_and_every_key() -> None:
    store, book, limiter, sync, _ = setup()
    store.keys = [
        {
            "key_id": "k1",
            "name": "n",
            "digest": digest("gsk_k1.s"),
            "created_at": W0,
            "updated_at": W0,
            "revoked_at": None,
            "policy": {"rpm": 5, "budget_usd": 10.0},
        },
    ]

    def usage(gateway: str, window: float, **counts: Any) -> dict[str, Any]:
        zero = {"requests": 0, "tokens": 0, "spent_usd": 0.0, "errors": 0, "inflight": 0}
        return {"key_id": "k1", "gateway_id": gateway, "window_start": window, "updated_at": W0, **zero, **counts}

    store.own = [
        usage("gw-a", W0, requests=4, tokens=40),
        usage("gw-a", 0.0, spent_usd=2.5, errors=3, inflight=6),
        usage("gw-a", W0 - 60.0, requests=50),  # an older minute: not asked for
        usage("gw-b", W0, requests=1),  # another gateway's
    ]
    sync.load()
    assert ("own_usage", ("gw-a", [0.0, W0])) in store.calls
    own = limiter.counts("k1").own
    assert own == Counts(window=W0, requests=4, tokens=40, spent_usd=2.5, errors=3, inflight=0)
    key = book.authenticate("gsk_k1.s")
    assert key is not None
    limiter.admit(key, 0)
    with pytest.raises(OverLimit):  # rpm 5: 4 restored + 1
        limiter.admit(key, 0)


# -- a failing store -----------------------------------------------------------------------------------------------


def test_a_failing_store_leaves_the_limiter_deciding_from_memory_and_records_the_error() -> None:
    store, _, limiter, sync, clock = setup()
    key = a_key(rpm=3)
    limiter.counts("k1").others = Counts(window=W0, requests=1)
    store.fail = OSError("database is restarting")

    async def main() -> None:
        task = asyncio.create_task(sync.run_forever())
        sync.interval_s = 0.0
        for _ in range(500):
            if sync.last_error:
                break
            await asyncio.sleep(0.002)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    limiter.admit(key, 0).close()
    asyncio.run(main())
    assert sync.last_error == "OSError: database is restarting"
    assert sync.last_sync_at == 0.0
    assert limiter.counts("k1").others == Counts(window=W0, requests=1), "the last known others stay"
    limiter.admit(key, 0)
    with pytest.raises(OverLimit):  # 2 own + 1 others
        limiter.admit(key, 0)
    store.fail = None
    clock.t += 1
    sync_once(sync)
    assert sync.last_sync_at == clock.t


def test_sync_once_raises_when_the_store_fails() -> None:
    store, _, limiter, sync, _ = setup()
    limiter.admit(a_key(), 0)
    store.fail = OSError("down")
    with pytest.raises(OSError, match="down"):
        sync_once(sync)


def test_counts_from_before_a_failed_write_are_written_by_the_next_sync() -> None:
    store, _, limiter, sync, clock = setup()
    a = limiter.admit(a_key(budget_usd=1.0), 0)
    a.charge(10, 1.0, failed=False)  # the key's budget is spent: no more requests will move its counts
    a.close()
    store.fail = OSError("down")
    with pytest.raises(OSError):
        sync_once(sync)
    store.fail = None
    clock.t += 1
    sync_once(sync)
    written = by_window(store.puts[-1])
    assert written.get(("k1", 0.0), {}).get("spent_usd") == 1.0, "the other gateways never learn the spend"


# -- the real KeyStore on SQLite -----------------------------------------------------------------------------------


def test_two_gateways_on_one_sqlite_file_see_each_others_counts(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/db.sqlite"
    store_a, store_b = Store(url), Store(url)
    store_a.migrate()
    clock = Clock()
    key_row = {
        "key_id": "k1",
        "name": "n",
        "digest": digest("gsk_k1.s"),
        "created_at": W0,
        "updated_at": W0,
        "revoked_at": None,
        "policy": {"rpm": 5, "max_concurrency": 3, "budget_usd": 2.0},
    }
    KeyStore(store_a).insert_key(key_row)
    gateways = []
    for gateway_id, store in [("gw-a", store_a), ("gw-b", store_b)]:
        book, limiter = KeyBook(), Limiter(clock)
        sync = TenancySync(KeyStore(store), book, limiter, gateway_id=gateway_id, interval_s=1.0, clock=clock)
        sync.load()
        gateways.append((book, limiter, sync))
    try:
        (book_a, lim_a, sync_a), (book_b, lim_b, sync_b) = gateways
        key_a, key_b = book_a.authenticate("gsk_k1.s"), book_b.authenticate("gsk_k1.s")
        assert key_a is not None and key_b is not None
        done = lim_a.admit(key_a, 10)
        done.charge(7, 0.5, failed=True)
        done.close()
        held = lim_a.admit(key_a, 20)
        lim_a.admit(key_a, 0).close()
        used = lim_b.admit(key_b, 4)
        used.charge(4, 0.0, failed=False)
        used.close()
        sync_once(sync_a)
        sync_once(sync_b)
        assert lim_b.counts("k1").others == Counts(
            window=W0, requests=3, tokens=27, spent_usd=0.5, errors=1, inflight=1
        )
        sync_once(sync_a)
        assert lim_a.counts("k1").others == Counts(window=W0, requests=1, tokens=4)
        lim_b.admit(key_b, 0)  # 3 + 2 = 5
        with pytest.raises(OverLimit):
            lim_b.admit(key_b, 0)
        lim_a.admit(key_a, 0).close()  # a knows b's first request, not its second: the one-sync overshoot (6)
        with pytest.raises(OverLimit):
            lim_a.admit(key_a, 0)
        # a stopped (silent) gateway's requests in flight age out of the others' sums
        clock.t += LIVE_S + 1
        sync_once(sync_a)  # a live gateway rewrites the rows of keys with requests in flight
        sync_once(sync_b)
        assert lim_b.counts("k1").others.inflight == 1
        clock.t += LIVE_S + 1
        sync_once(sync_b)
        assert lim_b.counts("k1").others.inflight == 0
        assert lim_b.counts("k1").others.requests == 4, "its counts as last written stay"
        held.close()
    finally:
        store_a.engine.dispose()
        store_b.engine.dispose()


def test_a_restarted_gateway_continues_its_counts_from_sqlite(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path}/db.sqlite")
    store.migrate()
    clock = Clock()
    try:
        limiter = Limiter(clock)
        sync = TenancySync(KeyStore(store), KeyBook(), limiter, gateway_id="gw-a", interval_s=1.0, clock=clock)
        a = limiter.admit(a_key(rpm=3), 11)
        a.charge(11, 0.75, failed=False)
        a.close()
        limiter.admit(a_key(rpm=3), 2).close()  # reserved 2, used none
        sync_once(sync)
        again = Limiter(clock)
        TenancySync(KeyStore(store), KeyBook(), again, gateway_id="gw-a", interval_s=1.0, clock=clock).load()
        assert again.counts("k1").own == Counts(window=W0, requests=2, tokens=11, spent_usd=0.75)
        other = Limiter(clock)
        TenancySync(KeyStore(store), KeyBook(), other, gateway_id="gw-b", interval_s=1.0, clock=clock).load()
        assert "k1" not in other.keys, "another id starts from nothing of its own"
    finally:
        store.engine.dispose()
