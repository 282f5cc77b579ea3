"""Waiting for a node's next event without blaming the node for the gateway's own pauses.

A stream has stalled when no event came for the stall timeout. If the gateway's event loop itself did not run
for a while (a long synchronous step, a garbage collection, the process not scheduled on a busy machine), the
timer fires late, and uvloop runs due timers *before* it polls the sockets: the node's next line may be
sitting in the socket buffer unread. So a timer that fired late by more than `LATE_TOLERANCE_S` does not end
the wait: the read gets as long again as the loop was late (at most one more stall timeout in all), and only a
wait that ends on time with nothing read is a stall. The read itself is never cancelled while the wait goes
on, so no partly read line is lost.

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
    wait ran out, may grant that many more seconds (0: the stream stalled)."""
    loop = asyncio.get_running_loop()
    read = loop.create_task(stream.next())
    deadline = loop.time() + timeout_s
    grace = timeout_s
    try:
        while True:
            await _done_or_due(loop, read, deadline)
            if read.done():
                return read.result()
            late = loop.time() - deadline
            if late <= LATE_TOLERANCE_S or grace <= 0.0:
                more = patience(timeout_s) if patience is not None else 0.0
                if more <= 0.0:
                    raise Stalled(f"stalled: no token for {timeout_s:.2f} s")
                patience, timeout_s, deadline = None, timeout_s + more, loop.time() + more
                continue
            extra = min(late, grace)
            grace -= extra
            deadline = loop.time() + extra
    finally:
        if not read.done():
            read.cancel()


async def _done_or_due(
    loop: asyncio.AbstractEventLoop, read: "asyncio.Task[StreamEvent | None]", deadline: float
) -> None:
    """Wait until the read is done or the deadline passed, without cancelling the read (asyncio.wait_for would)."""
    waiter: asyncio.Future[None] = loop.create_future()

    def wake(_: object = None) -> None:
        if not waiter.done():
            waiter.set_result(None)

    read.add_done_callback(wake)
    timer = loop.call_at(deadline, wake)
    try:
        await waiter
    finally:
        timer.cancel()
        read.remove_done_callback(wake)


__all__ = ["LATE_TOLERANCE_S", "Stalled", "next_within"]
