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


async def next_within(
    stream: EventStream,
    timeout_s: float,
    patience: Callable[[float], float] | None = None,
    busy_max_s: float = 0.0,
) -> StreamEvent | None:
    """The stream's next event (None: it ended); raises Stalled when none came within `timeout_s` of the
    gateway's running time, and the stream's own errors as they are. `patience(waited_s)`, called once when the
    wait ran out, may grant that many more seconds (0: the stream stalled). While the node sends busy lines the
    wait lasts up to `busy_max_s`.

    Per token this costs one timer, not a task: the read runs in the caller's task, and only a wait that ends in a
    stall cancels it (the stream is given up then anyway)."""
    task = asyncio.current_task()
    assert task is not None, "next_within runs in a task"
    watch = _Watch(asyncio.get_running_loop(), task, timeout_s, patience, _Busy(stream, busy_max_s))
    try:
        return await stream.next()
    except asyncio.CancelledError:
        if watch.stalled and task.uncancel() == 0:  # our own cancellation, and nobody else's meanwhile
            raise Stalled(f"stalled: no token for {watch.timeout_s:.2f} s") from None
        raise
    finally:
        watch.handle.cancel()


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


class _Watch:
    """The stall timer of one read: on time with nothing read, it cancels the reading task; fired late (the loop
    was starved), it waits as long again as it was late, at most one more timeout in all; with busy lines from the
    node, it waits on (`_Busy`)."""

    __slots__ = ("began", "busy", "deadline", "grace", "handle", "loop", "patience", "stalled", "task", "timeout_s")

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        task: "asyncio.Task[object]",
        timeout_s: float,
        patience: Callable[[float], float] | None,
        busy: _Busy,
    ) -> None:
        self.loop, self.task, self.timeout_s, self.patience, self.busy = loop, task, timeout_s, patience, busy
        self.grace = timeout_s
        self.stalled = False
        self.began = loop.time()
        self.deadline = self.began + timeout_s
        self.handle = loop.call_at(self.deadline, self._due)

    def _arm(self, after_s: float) -> None:
        self.deadline = self.loop.time() + after_s
        self.handle = self.loop.call_at(self.deadline, self._due)

    def _due(self) -> None:
        late = self.loop.time() - self.deadline
        if late > LATE_TOLERANCE_S and self.grace > 0.0:
            extra = min(late, self.grace)
            self.grace -= extra
            self._arm(extra)
            return
        until = self.busy.until(self.began, self.timeout_s)
        if until > self.loop.time():
            self.deadline = until
            self.handle = self.loop.call_at(until, self._due)
            return
        more = self.patience(self.timeout_s) if self.patience is not None else 0.0
        if more > 0.0:
            self.patience, self.timeout_s = None, self.timeout_s + more
            self._arm(more)
            return
        self.stalled = True
        self.task.cancel()


__all__ = ["LATE_TOLERANCE_S", "Stalled", "next_within"]
