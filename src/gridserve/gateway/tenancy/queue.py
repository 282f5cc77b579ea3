"""Priorities and fair queueing at the gateway, for when every node serving a model is saturated.

A model's capacity is the batch slots of the live nodes serving it whole (`capacity(model)`); this gateway's
requests in flight for it are counted here, and on a grid shared with other gateways the requests they have on those
nodes count too (`elsewhere(model)`: what the nodes last reported busy, less this gateway's own there), so that a
batch flood through one gateway leaves the interactive share free for requests through another.
A node's slots are what its engine says it runs at once (`Capability.max_running`: an emulated card with
`--fifo-slots`, an upstream server's `--max-running`), else its card's batch slots in the catalogue. A node whose
engine runs every request at once (`Capability.interleaved`, gridserve's CPU torch engine, or `max_running` 0: an
emulated card without `--fifo-slots`) has no slot limit, and a model it serves never waits here.
A priority class may fill only its share of the slots (by default batch 75%, the others all of them), so a batch
flood leaves room for interactive requests to start at once.
A request that finds no room waits in a bounded queue: the highest class first and, within a class, the keys in turn
(deficit round robin with a quantum of one request, each request costing one: every key with requests waiting gets
the next free slot in turn, however many it sent). Past its class's deadline a waiting request gets 503 with
`Retry-After`; a full queue answers 503 at once. The wait is recorded in the request's decision (`queue_wait_s`).
The shares and deadlines are the gateway's settings (`--queue-share`, `--queue-deadline`: `parse_class_values`).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from gridserve.gateway.api.errors import APIError
from gridserve.gateway.registry.record import LIVE, T_ACTIVE, T_QUEUED, NodeRecord
from gridserve.gateway.tenancy.keys import PRIORITIES, Priority

SHARES: dict[str, float] = {"interactive": 1.0, "standard": 1.0, "batch": 0.75}
"""The share of a model's slots each class may fill (interactive and standard requests then find room in a batch
flood)."""
UNLIMITED = 0
"""A model's capacity when no node serving it has a slot limit (or none serves it): requests never wait here."""
DEADLINES_S: dict[str, float] = {"interactive": 10.0, "standard": 30.0, "batch": 120.0}
"""How long a request of each class waits for room before a 503."""
MAX_WAITING = 2000
"""Requests waiting at once, all models and classes; more get 503 at once."""
RETRY_AFTER_S = 2


@dataclass
class _Waiter:
    future: asyncio.Future[None]
    key_id: str


@dataclass
class _Lane:
    """One model's waiting requests: per class, per key, in arrival order; the keys in turn."""

    classes: dict[str, OrderedDict[str, deque[_Waiter]]] = field(
        default_factory=lambda: {p: OrderedDict() for p in PRIORITIES}
    )

    def push(self, priority: str, waiter: _Waiter) -> None:
        self.classes[priority].setdefault(waiter.key_id, deque()).append(waiter)

    def head(self) -> tuple[str, str] | None:
        """(class, key) of the next request to go: the highest class with a request waiting, its next key."""
        for priority in PRIORITIES:
            keys = self.classes[priority]
            if keys:
                return priority, next(iter(keys))
        return None

    def pop(self, priority: str, key_id: str) -> _Waiter:
        """The key's oldest request; the key moves to the back of its class's turn."""
        keys = self.classes[priority]
        waiters = keys.pop(key_id)
        waiter = waiters.popleft()
        if waiters:
            keys[key_id] = waiters  # re-inserted: to the back of the turn
        return waiter

    def remove(self, priority: str, waiter: _Waiter) -> bool:
        """Take `waiter` out of the lane; False if it was not in it (dispatch had taken it)."""
        waiters = self.classes[priority].get(waiter.key_id)
        if waiters is None or waiter not in waiters:
            return False
        waiters.remove(waiter)
        if not waiters:
            del self.classes[priority][waiter.key_id]
        return True

    def waiting(self, at_or_above: str | None = None) -> int:
        ranks = PRIORITIES if at_or_above is None else PRIORITIES[: PRIORITIES.index(at_or_above) + 1]
        return sum(len(w) for p in ranks for w in self.classes[p].values())


class FairQueue:
    """The one owner of this gateway's requests in flight per model and of those waiting for room."""

    def __init__(
        self,
        capacity: Callable[[str], int],
        *,
        elsewhere: Callable[[str], int] = lambda model: 0,
        shares: Mapping[str, float] | None = None,
        deadlines_s: Mapping[str, float] | None = None,
        max_waiting: int = MAX_WAITING,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.capacity = capacity
        self.elsewhere = elsewhere
        """Requests for a model that other gateways have on its nodes (0 when this gateway is the grid's only one)."""
        self.shares = {**SHARES, **(shares or {})}
        """Each class's share of a model's slots: `shares` over the defaults (SHARES) for the classes it names."""
        self.deadlines_s = {**DEADLINES_S, **(deadlines_s or {})}
        """Each class's deadline: `deadlines_s` over the defaults (DEADLINES_S) for the classes it names."""
        self.max_waiting = max_waiting
        self.clock = clock
        self.inflight: dict[str, int] = {}
        self.lanes: dict[str, _Lane] = {}
        self.waiting = 0
        self.timed_out = 0

    def _room(self, model: str, priority: str) -> bool:
        slots = self.capacity(model)
        if slots == UNLIMITED:
            return True  # nothing limits it (or nothing serves it: the scheduler says so, 404 or a node loads it)
        allowed = max(1, math.floor(slots * self.shares[priority]))
        return self.inflight.get(model, 0) + self.elsewhere(model) < allowed

    async def enter(self, model: str, priority: Priority, key_id: str) -> float:
        """Wait for room for a request of `key_id` in `priority` (none waiting ahead of it and a slot within its
        class's share); returns the seconds waited. Raises APIError 503 past the deadline or when the queue is
        full. Every `enter` that returns must be followed by one `leave(model)`."""
        lane = self.lanes.get(model)
        if (lane is None or lane.waiting(priority) == 0) and self._room(model, priority):
            self.inflight[model] = self.inflight.get(model, 0) + 1
            return 0.0
        if self.waiting >= self.max_waiting:
            raise _busy(f"The gateway's queue is full ({self.max_waiting} requests waiting).")
        lane = self.lanes.setdefault(model, _Lane())
        waiter = _Waiter(asyncio.get_running_loop().create_future(), key_id)
        lane.push(priority, waiter)
        self.waiting += 1
        started = self.clock()
        deadline = self.deadlines_s[priority]
        try:  # (not wait_for: on 3.11 it swallows a cancellation that comes as the slot is given)
            async with asyncio.timeout(deadline):
                await waiter.future
        except TimeoutError:
            if not self._abandon(model, lane, priority, waiter):
                self.timed_out += 1
                raise _busy(
                    f"No room for a {priority} request for {model} within {deadline:g} s: every node serving it"
                    " is busy."
                ) from None
        except BaseException:  # the client left: out of the queue, and a slot given meanwhile is freed
            if self._abandon(model, lane, priority, waiter):
                self.leave(model)
            raise
        return self.clock() - started

    def _abandon(self, model: str, lane: _Lane, priority: str, waiter: _Waiter) -> bool:
        """A waiter stops waiting: out of the queue. True if it was given a slot just as it gave up."""
        if waiter.future.done() and not waiter.future.cancelled():
            return True
        waiter.future.cancel()
        if lane.remove(priority, waiter):  # (dispatch counts out a cancelled waiter it comes upon itself)
            self.waiting -= 1
        return False

    def leave(self, model: str) -> None:
        self.inflight[model] = max(0, self.inflight.get(model, 0) - 1)
        self._dispatch(model)

    def poke(self) -> None:
        """Give waiting requests the room that appeared without a request leaving (a node joined)."""
        for model in list(self.lanes):
            self._dispatch(model)

    def _dispatch(self, model: str) -> None:
        lane = self.lanes.get(model)
        while lane is not None:
            head = lane.head()
            if head is None or not self._room(model, head[0]):
                return
            waiter = lane.pop(*head)
            self.waiting -= 1
            if waiter.future.done():  # its wait ended meanwhile
                continue
            self.inflight[model] = self.inflight.get(model, 0) + 1
            waiter.future.set_result(None)


def parse_class_values(flag: str, items: Iterable[str], *, at_most: float = math.inf) -> dict[str, float]:
    """{class: value} from `CLASS=VALUE` texts, as `--queue-deadline batch=300` gives them (a class given twice: the
    last). Raises ValueError, one line naming `flag`, for an unknown class or a value not above 0 and at most
    `at_most` (nor infinite)."""
    out: dict[str, float] = {}
    for item in items:
        name, eq, text = item.partition("=")
        name = name.strip()
        if not eq:
            raise ValueError(f"{flag} {item!r}: expected CLASS=VALUE, CLASS one of {', '.join(PRIORITIES)}")
        if name not in PRIORITIES:
            raise ValueError(f"{flag} {item!r}: unknown class {name!r} (expected one of {', '.join(PRIORITIES)})")
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not (0 < value <= at_most and math.isfinite(value)):
            limit = "" if math.isinf(at_most) else f" and at most {at_most:g}"
            raise ValueError(f"{flag} {item!r}: expected a number above 0{limit}")
        out[name] = value
    return out


def _busy(message: str) -> APIError:
    error = APIError(503, f"{message} Retry later.", type_="service_unavailable", code="queue_timeout")
    error.headers = [(b"retry-after", str(RETRY_AFTER_S).encode())]
    return error


class SlotCount:
    """The batch slots of the live nodes serving each model whole and, on a grid shared with other gateways
    (`shared`), the requests those gateways have on them; recounted at most every `ttl_s` (a decision must not walk
    every node twice)."""

    def __init__(
        self,
        records: Callable[[], Iterable[NodeRecord]],
        ttl_s: float = 0.25,
        clock: Callable[[], float] = time.monotonic,
        *,
        shared: bool = False,
    ) -> None:
        self.records, self.ttl_s, self.clock, self.shared = records, ttl_s, clock, shared
        self._counted_at = -math.inf
        self._slots: dict[str, int] = {}
        self._elsewhere: dict[str, int] = {}

    def __call__(self, model: str) -> int:
        self._recount()
        return self._slots.get(model, UNLIMITED)

    def elsewhere(self, model: str) -> int:
        """Requests for `model`'s nodes that this gateway did not send: each node's active and queued requests as
        its last heartbeat reported them (less those seen ending here since), less this gateway's own on it. A node
        serving several models counts its foreign requests against each. 0 unless `shared`."""
        self._recount()
        return self._elsewhere.get(model, 0)

    def _recount(self) -> None:
        now = self.clock()
        if now - self._counted_at <= self.ttl_s:
            return
        self._counted_at = now
        slots: dict[str, int] = {}
        elsewhere: dict[str, int] = {}
        unlimited: set[str] = set()
        for record in self.records():
            if record.state not in LIVE:
                continue
            per_node = _slots(record)
            if per_node == UNLIMITED:
                unlimited.update(record.static.offers)
                continue
            foreign = _foreign(record) if self.shared else 0
            for name in record.static.offers:
                slots[name] = slots.get(name, 0) + per_node
                elsewhere[name] = elsewhere.get(name, 0) + foreign
        self._slots = {name: (UNLIMITED if name in unlimited else n) for name, n in slots.items()}
        self._elsewhere = {name: n for name, n in elsewhere.items() if name not in unlimited}


def _slots(record: NodeRecord) -> int:
    """The requests a node runs at once: what its engine said (`Capability.max_running`), else the catalogue's batch
    slots for its card; UNLIMITED for an engine that runs every request at once (interleaved, or said 0)."""
    static = record.static
    if static.interleaved or static.max_running == 0:
        return UNLIMITED
    if static.max_running is not None:
        return static.max_running
    return max(1, static.hw.batch_slots) if static.hw is not None else 1


def _foreign(record: NodeRecord) -> int:
    """The node's busy requests (active and queued, as it last reported) that are not this gateway's (read from the
    packed telemetry: a recount walks every node)."""
    row = record.telemetry_row
    if row is None:
        return 0
    return max(0, int(row[T_ACTIVE]) + int(row[T_QUEUED]) - record.outstanding)
