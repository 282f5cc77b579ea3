"""Active health checks: every node's `/health` is probed on a short period; the round-trip time is recorded
and a failed probe (with a late heartbeat) marks a hung or dead node down quickly (Membership.probe_result).
Every probe carries a fresh challenge the node signs (trust/challenge.py): an endpoint that answers for another
key is an identity incident for the node that claimed it, which is quarantined.
On a grid larger than `probes_per_round`, busy and unsettled nodes are probed every period and idle ones in
turn."""

import asyncio
import logging
import math
import time
from collections.abc import Callable, Mapping

from gridserve.gateway.config import GatewayConfig
from gridserve.gateway.dispatch.dispatcher import Dispatcher
from gridserve.gateway.registry.membership import Membership, NodeRecord
from gridserve.gateway.transport import NodeTransport, Refused, Timeout, TransportError
from gridserve.trust.challenge import check as check_challenge
from gridserve.trust.challenge import fresh_challenge
from gridserve.types import NodeId, NodeState

log = logging.getLogger("gridserve.gateway")


async def probe(
    transport: NodeTransport, node_id: NodeId, endpoint: str, timeout_s: float, public_key: str
) -> tuple[bool, float, str, str]:
    """One /health round trip with a fresh challenge: (answered healthy, seconds it took, why not, why the answer
    is not this node's: "" when it is)."""
    challenge = fresh_challenge()
    started = time.monotonic()
    try:
        body = await transport.probe(node_id, endpoint, timeout_s, challenge)
    except Refused as exc:
        return False, time.monotonic() - started, f"HTTP {exc.status}", ""
    except Timeout:
        return False, time.monotonic() - started, f"no answer in {timeout_s:.1f} s", ""
    except TransportError as exc:
        return False, time.monotonic() - started, exc.why, ""
    return True, time.monotonic() - started, "", check_challenge(public_key, node_id, challenge, body)


async def _probe_node(membership: Membership, transport: NodeTransport, record: NodeRecord, timeout_s: float) -> None:
    capability = record.capability
    node_id = capability.node_id
    ok, rtt, error, foreign = await probe(transport, node_id, capability.endpoint, timeout_s, capability.public_key)
    if foreign:
        membership.answered_for_another(node_id, foreign)
        ok, error = False, f"not this node's answer: {foreign}"
    membership.probe_result(node_id, ok=ok, rtt_s=rtt, error=error)


def probe_targets(
    records: Mapping[NodeId, NodeRecord],
    budget: int,
    turn: int,
    now: float = 0.0,
    retire_silent_s: float = math.inf,
) -> tuple[list[NodeId], int]:
    """The nodes to probe this period and the next turn: every node when the grid fits the budget; else the
    nodes that matter now (requests in flight, not UP) and idle UP nodes in rotation from `turn`. Never banned
    nodes, nor retired ones: down with no heartbeat for `retire_silent_s` (gone; probing them for ever costs a
    connection each, twice a second: a node that comes back heartbeats, and is probed again from then)."""
    urgent: list[NodeId] = []
    idle: list[NodeId] = []
    up, banned, down = NodeState.UP, NodeState.BANNED, NodeState.DOWN
    silent_since = now - retire_silent_s
    for node_id, r in records.items():  # one pass: every 0.5 s over the whole grid, on the event loop
        state = r.state
        if state is up and r.outstanding <= 0:
            idle.append(node_id)
        elif state is not banned and not (state is down and r.last_heartbeat < silent_since):
            urgent.append(node_id)
    if len(urgent) + len(idle) <= budget:
        return [*urgent, *idle], 0
    take = min(len(idle), max(0, budget - len(urgent)))
    start = turn % len(idle) if idle else 0
    rotated = (idle[start:] + idle[:start])[:take]
    return urgent + rotated, start + take


PACE_ABOVE = 32
"""Rounds with more probes than this are spread over the period (a burst of hundreds of requests at once
stalls the gateway's event loop, and with it every heartbeat and token it handles meanwhile)."""


async def probe_forever(membership: Membership, dispatcher: Dispatcher, config: GatewayConfig) -> None:
    """Probe rounds until cancelled, through the dispatcher's transport (start the dispatcher first).

    A round starts every `probe_interval_s` whatever the last one's probes are still doing: a hung node's probe
    waits out its timeout (1 s) on its own, and the next round probes it again meanwhile, so its failures come in
    every period from its first timeout on. (Rounds that waited for their slowest probe ran every timeout + interval,
    1.5 s, with a hung node on the grid: its second failure, the one that finds its heartbeat late, came up to 3.0 s
    after it hung, against the 3 s bound.) At most timeout / interval + 1 probes of one node are in flight."""
    transport = dispatcher.transport
    turn = 0
    in_flight: set[asyncio.Task[None]] = set()
    try:
        while True:
            chosen, turn = probe_targets(
                membership.nodes, config.probes_per_round, turn, time.time(), config.retire_silent_s
            )
            gap = config.probe_interval_s / len(chosen) if len(chosen) > PACE_ABOVE else 0.0
            for node_id in chosen:
                record = membership.nodes.get(node_id)
                if record is None:  # left meanwhile
                    continue
                task = asyncio.create_task(_probe_node(membership, transport, record, config.probe_timeout_s))
                in_flight.add(task)
                task.add_done_callback(_finished(in_flight))
                if gap:
                    await asyncio.sleep(gap)
            if not gap:
                await asyncio.sleep(config.probe_interval_s)
    finally:  # stopped (the gateway shuts down): no probe may outlive the transport and the store
        for task in in_flight:
            task.cancel()


def _finished(in_flight: set["asyncio.Task[None]"]) -> "Callable[[asyncio.Task[None]], None]":
    def done(task: "asyncio.Task[None]") -> None:
        in_flight.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("health probe failed unexpectedly", exc_info=task.exception())

    return done
