"""The tunnel heartbeat intake: signatures checked on a worker thread, heartbeats applied and answered on the loop,
in arrival order (gateway/transport/heartbeats.py)."""

import asyncio
import threading
from typing import Any

import orjson
import pytest

from gridserve.gateway.registry.membership import UnknownNode
from gridserve.gateway.transport.heartbeats import HeartbeatIntake
from gridserve.trust import Replayed, TrustError

GUARD_S = 10.0


class Members:
    """Membership as the intake sees it: records which thread verified and the order heartbeats were applied."""

    def __init__(self) -> None:
        self.verified_on: set[str] = set()
        self.applied: list[bytes] = []
        self.rejected: list[tuple[str, str]] = []
        self.gate: threading.Event | None = None
        """Verification waits for it (at most GUARD_S) where set."""

    def verify_heartbeat(self, body: bytes) -> Any:
        self.verified_on.add(threading.current_thread().name)
        if self.gate is not None and not self.gate.wait(GUARD_S):
            raise AssertionError("the gate was never opened: verification held the loop")
        if body.startswith(b"replayed"):
            raise Replayed("nonce already used: replayed message")
        return body

    def take_heartbeat(self, envelope: Any) -> None:
        if envelope.startswith(b"stranger"):
            raise UnknownNode("heartbeat from unregistered node n9")
        self.applied.append(envelope)

    def reject(self, exc: TrustError, *, path: str, remote: str, node_id: str | None = None) -> None:
        self.rejected.append((exc.kind, remote))


def _run(intake: HeartbeatIntake, bodies: list[bytes], turns_between: int = 0) -> list[dict[str, Any]]:
    """Each body taken (with `turns_between` loop turns after each), then the replies once all are settled."""
    replies: list[dict[str, Any]] = []

    async def go() -> None:
        for body in bodies:
            intake.take(body, "10.0.0.7", lambda answer: replies.append(orjson.loads(answer)))
            for _ in range(turns_between):
                await asyncio.sleep(0)
        await asyncio.wait_for(intake.settled(), GUARD_S)

    try:
        asyncio.run(go())
    finally:
        intake.close()
    return replies


@pytest.mark.parametrize("turns_between", [0, 1, 3])
def test_heartbeats_are_applied_and_answered_in_arrival_order_across_batches(turns_between: int) -> None:
    members = Members()
    bodies = [b"beat %d" % i for i in range(40)]
    replies = _run(HeartbeatIntake(members), bodies, turns_between)
    assert members.applied == bodies
    assert replies == [{"status": 200, "body": '{"ok":true}'}] * 40
    assert members.verified_on and all(name.startswith("heartbeat-verify") for name in members.verified_on)


def test_refusals_are_answered_as_the_http_endpoint_would_and_recorded() -> None:
    members = Members()
    replies = _run(HeartbeatIntake(members), [b"beat 1", b"replayed", b"stranger", b"beat 2"])
    assert members.applied == [b"beat 1", b"beat 2"]
    assert [r["status"] for r in replies] == [200, 401, 404, 200]
    assert orjson.loads(replies[1]["body"])["error"]["type"] == "replayed"
    assert orjson.loads(replies[2]["body"])["error"]["type"] == UnknownNode.kind
    assert members.rejected == [("replayed", "10.0.0.7"), (UnknownNode.kind, "10.0.0.7")]


def test_the_loop_goes_on_while_the_worker_checks_signatures() -> None:
    """The worker's check waits for the loop to open a gate: it only finishes if the loop ran meanwhile."""
    members = Members()
    members.gate = threading.Event()
    intake = HeartbeatIntake(members)
    replies: list[bytes] = []

    async def go() -> None:
        intake.take(b"beat", "10.0.0.7", replies.append)
        await asyncio.sleep(0)  # the batch goes to the worker
        await asyncio.sleep(0.01)
        assert replies == []  # not answered before it was checked
        assert members.gate is not None
        members.gate.set()
        await asyncio.wait_for(intake.settled(), GUARD_S)

    try:
        asyncio.run(go())
    finally:
        intake.close()
    assert members.applied == [b"beat"] and len(replies) == 1


def test_unthreaded_intake_applies_at_once_on_the_callers_thread() -> None:
    members = Members()
    replies: list[bytes] = []
    intake = HeartbeatIntake(members, threaded=False)
    intake.take(b"beat", "10.0.0.7", replies.append)  # (no loop needed)
    assert members.applied == [b"beat"] and len(replies) == 1
    assert members.verified_on == {threading.current_thread().name}
