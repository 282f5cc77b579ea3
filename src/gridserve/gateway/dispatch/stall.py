"""Waiting for a node's next event without blaming the node for the gateway's own pauses.

A stream has stalled when no event came for the stall timeout. If the gateway's event loop itself did not run
for a while (a long synchronous step, a garbage collection, the process not scheduled on a busy machine), the
timer fires late, and uvloop runs due timers *before* it polls the sockets: the node's next line may be
sitting in the socket buffer unread. So a timer that fired late by more than `LATE_TOLERANCE_S` does not end
the wait: the read gets as long again as the loop was late (at most one more stall timeout in all), and only a
wait that ends on time with nothing read is a stall. The read is never cancelled while the wait goes on, so no
partly read line is lost; a stall cancels it, and the stream is given up.

A wait that ran out on time may still be granted `patience`: more time, asked for once. The generation uses it
for a stream no other node could take over, where declaring a stall early would only end the client's answer.

A node whose engine runs other streams' steps while this one waits (a long prefill of another prompt on a CPU
node) says so with busy lines (docs/protocol.md). A wait that ran out with a busy line in it goes on until the
timeout has passed since the last one, up to `busy_max_s` in all: a busy node is not a dead one, and a node that
claims to be busy forever is still stalled in the end.
"""

import asyncio
from collections.abc import Callable

from gridserve.gateway.dispatch.dispatcher import NodeFailed
from gridserve.gateway.transport import EventStream
from gridserve.types import StreamEvent

LATE_TOLERANCE_S = 0.01
"""A stall timer that fires later than this after its deadline means the loop was starved meanwhile."""


class Stalled(NodeFailed):
    """No event from the node within the stall timeout while the gateway was running."""


class StallWatch:
    """The stall timer of one stream's reads. The stream has one timer, moved lazily: a read that ends in time
    leaves it where it is, and when it fires during a later read it moves to that read's deadline. So a token
    costs no timer (at 64 streams a timer per token, set and cancelled, was ~2% of the gateway's CPU), and a
    read's outcome is exactly as if it had a timer of its own.

    `next(timeout_s)`: the stream's next event (None: it ended); raises Stalled when none came within `timeout_s`
    of the gateway's running time, and the stream's own errors as they are. `patience(waited_s)`, called once per
    read when its wait ran out, may grant that many more seconds (0: the stream stalled). While the node sends busy
    lines a read lasts up to `busy_max_s`. The read runs in the caller's task, and only a read that ends in a stall
    cancels it (the stream is given up then anyway). `close()` when the stream is done with."""

    __slots__ = (
        "armed_at",
        "began",
        "busy",
        "deadline",
        "grace",
        "handle",
        "loop",
        "patience",
        "patience_of",
        "stalled",
        "stream",
        "task",
        "timeout_s",
    )

    def __init__(
        self, stream: EventStream, patience: Callable[[float], float] | None = None, busy_max_s: float = 0.0
    ) -> None:
        self.stream, self.patience_of, self.busy = stream, patience, _Busy(stream, busy_max_s)
        self.loop = asyncio.get_running_loop()
        self.handle: asyncio.TimerHandle | None = None
        self.armed_at = 0.0
        self.task: asyncio.Task[object] | None = None
        """The task reading now (None: no read under way)."""
        self.began = self.deadline = self.timeout_s = self.grace = 0.0
        self.patience: Callable[[float], float] | None = None
        self.stalled = False

    async def next(self, timeout_s: float) -> StreamEvent | None:
        if self.stream.ready():  # a token already here: nothing to wait for
            return await self.stream.next()
        task = asyncio.current_task()
        assert task is not None, "a stream is read in a task"
        self.task, self.stalled, self.patience = task, False, self.patience_of
        self.timeout_s = self.grace = timeout_s
        self.began = self.loop.time()
        self._arm(self.began + timeout_s)
        try:
            return await self.stream.next()
        except asyncio.CancelledError:
            if self.stalled and task.uncancel() == 0:  # our own cancellation, and nobody else's meanwhile
                raise Stalled(f"stalled: no token for {self.timeout_s:.2f} s") from None
            raise
        finally:
            self.task = None

    def close(self) -> None:
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None

    def _arm(self, deadline: float) -> None:
        """The read ends at `deadline`: the timer fires then, or earlier (it then moves on to the deadline)."""
        self.deadline = deadline
        if self.handle is not None and self.armed_at <= deadline:
            return
        if self.handle is not None:
            self.handle.cancel()
        self.armed_at = deadline
        self.handle = self.loop.call_at(deadline, self._due)

    def _due(self) -> None:
        self.handle = None
        if self.task is None:  # no read under way: the next one arms again
            return
        now = self.loop.time()
        if now < self.deadline:  # set for an earlier read's deadline
            self._arm(self.deadline)
            return
        late = now - self.deadline
        if late > LATE_TOLERANCE_S and self.grace > 0.0:  # the loop was starved: as long again as it was late
            extra = min(late, self.grace)
            self.grace -= extra
            self._arm(now + extra)
            return
        until = self.busy.until(self.began, self.timeout_s)
        if until > now:
            self._arm(until)
            return
        more = self.patience(self.timeout_s) if self.patience is not None else 0.0
        if more > 0.0:
            self.patience, self.timeout_s = None, self.timeout_s + more
            self._arm(now + more)
            return
        self.stalled = True
        self.task.cancel()


class _Busy:
    """How long a wait may go on because the node says it is busy: until `timeout` after its last busy line,
    never past `max_s` after the wait began."""

    __slots__ = ("max_s", "stream")

    def __init__(self, stream: EventStream, max_s: float) -> None:
        self.stream, self.max_s = stream, max_s

    def until(self, began: float, timeout_s: float) -> float:
        """The new deadline (loop time) for a wait that began at `began`; 0.0 when no busy line came in it."""
        busy_at = self.stream.busy_at
        if busy_at <= began or self.max_s <= 0.0:
            return 0.0
        return min(busy_at + timeout_s, began + self.max_s)


__all__ = ["LATE_TOLERANCE_S", "StallWatch", "Stalled"]
