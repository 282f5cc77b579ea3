"""Heartbeats that come over tunnels: their signatures checked off the event loop, a batch at a time.

At 10,000 outbound nodes the gateway's loop takes some 2,000 heartbeats a second and is near one core busy; an
Ed25519 verification is about a sixth of a heartbeat's cost there (py-spy, issue 18). libsodium releases the GIL
while it checks a signature, so a worker thread checks them beside the loop: each loop turn hands what arrived in it
to the worker as one batch, and the worker hands the results back in one callback. The loop then applies each
heartbeat (registry state has one owner: the loop) and answers the node, in arrival order: one worker, batches in
order, so a node's heartbeats are applied in the order it sent them.
"""

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

import orjson

from gridserve.gateway.registry.membership import UnknownNode
from gridserve.trust import Envelope, TrustError
from gridserve.tunnel.wire import json_payload

log = logging.getLogger("gridserve.gateway")
PATH = "/nodes/tunnel"

Reply = Callable[[bytes], None]
"""Sends the node the answer to its heartbeat (a HEARTBEAT_REPLY frame's payload)."""


class HeartbeatMembership(Protocol):
    def verify_heartbeat(self, body: bytes) -> Envelope: ...

    def take_heartbeat(self, envelope: Envelope) -> object: ...

    def reject(self, exc: TrustError, *, path: str, remote: str, node_id: str | None = None) -> None: ...


OK_REPLY = json_payload({"status": 200, "body": '{"ok":true}'})


def _refusal(exc: TrustError) -> bytes:
    status = 404 if isinstance(exc, UnknownNode) else 401
    answer = orjson.dumps({"error": {"type": exc.kind, "message": exc.detail}}).decode()
    return json_payload({"status": status, "body": answer})


class HeartbeatIntake:
    """Verifies tunnel heartbeats on one worker thread and applies them on the loop (`threaded=False`: all on the
    loop, at once, as `POST /nodes/heartbeat` does)."""

    def __init__(self, membership: HeartbeatMembership, *, threaded: bool = True) -> None:
        self.membership = membership
        self._pending: list[tuple[bytes, str, Reply]] = []
        self._checking: set[asyncio.Future[list[Envelope | TrustError]]] = set()
        """Batches in the worker's hands."""
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="heartbeat-verify") if threaded else None

    def take(self, body: bytes, remote: str, reply: Reply) -> None:
        """A heartbeat's signed body, where it came from, and how to answer it."""
        if self._worker is None:
            self._apply(self._verify(body), remote, reply)
            return
        self._pending.append((body, remote, reply))
        if len(self._pending) == 1:
            asyncio.get_running_loop().call_soon(self._hand_over)

    async def settled(self) -> None:
        """Once every heartbeat taken so far has been applied and answered."""
        while self._pending or self._checking:
            await asyncio.gather(*self._checking, asyncio.sleep(0), return_exceptions=True)

    def close(self) -> None:
        """Stops the worker (heartbeats in its hands are dropped: their nodes send again)."""
        if self._worker is not None:
            self._worker.shutdown(wait=False, cancel_futures=True)

    def _hand_over(self) -> None:
        batch, self._pending = self._pending, []
        assert self._worker is not None
        bodies = [body for body, _, _ in batch]
        checked = asyncio.get_running_loop().run_in_executor(self._worker, self._verify_all, bodies)
        self._checking.add(checked)
        checked.add_done_callback(lambda done: self._apply_all(batch, done))

    def _verify(self, body: bytes) -> Envelope | TrustError:
        try:
            return self.membership.verify_heartbeat(body)
        except TrustError as exc:
            return exc

    def _verify_all(self, bodies: list[bytes]) -> list[Envelope | TrustError]:
        return [self._verify(body) for body in bodies]

    def _apply_all(
        self, batch: list[tuple[bytes, str, Reply]], done: "asyncio.Future[list[Envelope | TrustError]]"
    ) -> None:
        self._checking.discard(done)
        if done.cancelled():
            return
        error = done.exception()
        if error is not None:  # (a defect: verification returns refusals, it does not raise them)
            log.error("heartbeat verification failed", exc_info=error)
            return
        for (_, remote, reply), checked in zip(batch, done.result(), strict=True):
            self._apply(checked, remote, reply)

    def _apply(self, checked: Envelope | TrustError, remote: str, reply: Reply) -> None:
        try:
            if isinstance(checked, TrustError):
                raise checked
            self.membership.take_heartbeat(checked)
        except TrustError as exc:
            self.membership.reject(exc, path=PATH, remote=remote)
            reply(_refusal(exc))
            return
        reply(OK_REPLY)
