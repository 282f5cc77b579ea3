"""Active health checks: every node's `/health` is probed on a short period; the round-trip time is recorded
and a failed probe (with a late heartbeat) marks a hung or dead node down quickly (Membership.probe_result)."""

import asyncio
import time

import aiohttp

from gridserve.gateway.config import GatewayConfig
from gridserve.gateway.dispatch import Dispatcher
from gridserve.gateway.membership import Membership
from gridserve.types import NodeId, NodeState


async def probe(session: aiohttp.ClientSession, url: str, timeout_s: float) -> tuple[bool, float, str]:
    started = time.monotonic()
    try:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
            await resp.read()
            ok = resp.status == 200
            return ok, time.monotonic() - started, "" if ok else f"HTTP {resp.status}"
    except TimeoutError:
        return False, time.monotonic() - started, f"no answer in {timeout_s:.1f} s"
    except (aiohttp.ClientError, OSError) as exc:
        return False, time.monotonic() - started, type(exc).__name__


async def _probe_node(
    membership: Membership, session: aiohttp.ClientSession, node_id: NodeId, url: str, timeout_s: float
) -> None:
    ok, rtt, error = await probe(session, url, timeout_s)
    membership.probe_result(node_id, ok=ok, rtt_s=rtt, error=error)


async def probe_forever(membership: Membership, dispatcher: Dispatcher, config: GatewayConfig) -> None:
    session = dispatcher.session
    if session is None:
        raise RuntimeError("start the dispatcher before the prober")
    while True:
        targets = [
            (node_id, record.capability.endpoint + "/health")
            for node_id, record in membership.nodes.items()
            if record.state != NodeState.BANNED
        ]
        await asyncio.gather(
            *(_probe_node(membership, session, node_id, url, config.probe_timeout_s) for node_id, url in targets)
        )
        await asyncio.sleep(config.probe_interval_s)
