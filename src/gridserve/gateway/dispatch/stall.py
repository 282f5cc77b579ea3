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
    stream: EventStream, timeout_s: float, patience: Callable[[float], float] | None = None
) -> StreamEvent | None:
    """The stream's next event (None: it ended); raises Stalled when none came within `timeout_s` of the
    gateway's running time, and the stream's own errors as they are. `patience(waited_s)`, called once when the
    wait ran out, may grant that many more seconds (0: the stream stalled).

    Per token this costs one timer, not a task: the read runs in the caller's task, and only a wait that ends in a
    stall cancels it (the stream is given up then anyway)."""
    task = asyncio.current_task()
    assert task is not None, "next_within runs in a task"
    watch = _Watch(asyncio.get_running_loop(), task, timeout_s, patience)
    try:
        return await stream.next()
    except asyncio.CancelledError:
        if watch.stalled and task.uncancel() == 0:  # our own cancellation, and nobody else's meanwhile
            raise Stalled(f"stalled: no token for {watch.timeout_s:.2f} s") from None
        raise
    finally:
        watch.handle.cancel()


class _Watch:
    """The stall timer of one read: on time with nothing read, it cancels the reading task; fired late (the loop
    was starved), it waits as long again as it was late, at most one more timeout in all."""

    __slots__ = ("deadline", "grace", "handle", "loop", "patience", "stalled", "task", "timeout_s")

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        task: "asyncio.Task[object]",
        timeout_s: float,
        patience: Callable[[float], float] | None,
    ) -> None:
        self.loop, self.task, self.timeout_s, self.patience = loop, task, timeout_s, patience
        self.grace = timeout_s
        self.stalled = False
        self.deadline = loop.time() + timeout_s
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
        more = self.patience(self.timeout_s) if self.patience is not None else 0.0
        if more > 0.0:
            self.patience, self.timeout_s = None, self.timeout_s + more
            self._arm(more)
            return
        self.stalled = True
        self.task.cancel()


__all__ = ["LATE_TOLERANCE_S", "Stalled", "next_within"]
