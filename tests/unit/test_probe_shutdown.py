"""A gateway that stops mid probe round leaves no probe behind: on a large grid a round is paced over the period,
so probes already launched are still waiting when the prober is cancelled. One that finished later reported to a
closed store (a 'StoreWriter is closed' traceback per probe at every shutdown)."""

import asyncio
import dataclasses
from collections.abc import Iterator

import pytest
from tests.unit.dispatch_support import CONFIG, Grid, store_writer

from gridserve.gateway.config import GatewayConfig
from gridserve.gateway.registry.health import PACE_ABOVE, probe_forever
from gridserve.gateway.transport import Timeout
from gridserve.gateway.transport.fake import FakeTransport
from gridserve.store import StoreWriter
from gridserve.types import NodeId


class SlowHealth(FakeTransport):
    """Every probe waits until `answer` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.answer = asyncio.Event()

    async def probe(self, node_id: NodeId, endpoint: str, timeout_s: float, challenge: str) -> bytes:
        self.probes.append(node_id)
        await self.answer.wait()
        return b""


@pytest.fixture(scope="module")
def writer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StoreWriter]:
    yield from store_writer(tmp_path_factory.mktemp("store"))


async def _probe_for(grid: Grid, config: GatewayConfig, seconds: float) -> None:
    """Run the prober for `seconds`, then cancel it as a gateway that stops does."""
    prober = asyncio.create_task(probe_forever(grid.membership, grid.dispatcher, config))
    await asyncio.sleep(seconds)
    prober.cancel()
    with pytest.raises(asyncio.CancelledError):
        await prober


def test_cancelling_the_prober_mid_round_cancels_the_probes_it_launched(writer: StoreWriter) -> None:
    config = dataclasses.replace(CONFIG, probe_interval_s=1.0, probes_per_round=PACE_ABOVE * 2)
    grid = Grid(writer, nodes=PACE_ABOVE * 2, config=config)
    transport = SlowHealth()
    grid.dispatcher.transport = transport
    reported: list[NodeId] = []
    grid.membership.probe_result = lambda node_id, **_: reported.append(node_id)  # type: ignore[method-assign]

    async def go() -> None:
        await _probe_for(grid, config, 0.1)  # a few probes launched, the round still pacing (one every 15 ms)
        transport.answer.set()  # the nodes answer now: a probe still running would report
        await asyncio.sleep(0.05)

    asyncio.run(go())
    assert 2 <= len(transport.probes) < PACE_ABOVE * 2 and reported == []


class Hung(FakeTransport):
    """Every node hangs: its probe waits out the timeout."""

    async def probe(self, node_id: NodeId, endpoint: str, timeout_s: float, challenge: str) -> bytes:
        self.probes.append(node_id)
        await asyncio.sleep(timeout_s)
        raise Timeout(f"no answer in {timeout_s} s")


def test_a_hung_nodes_probe_does_not_hold_back_the_next_rounds(writer: StoreWriter) -> None:
    """Rounds start every period whatever a hung node's last probe is still waiting for, so its failures come every
    period once the first has timed out. (Rounds that waited for their slowest probe came every timeout + period:
    a SIGSTOPped node's down was seen 3.0 s after the stop in a fresh-clone run, against the 3 s bound.)"""
    config = dataclasses.replace(CONFIG, probe_interval_s=0.05, probe_timeout_s=0.2)
    grid = Grid(writer, nodes=2, config=config)
    transport = Hung()
    grid.dispatcher.transport = transport
    failed: list[NodeId] = []
    grid.membership.probe_result = lambda node_id, **kw: failed.append(node_id)  # type: ignore[method-assign]

    asyncio.run(_probe_for(grid, config, 0.6))
    per_node = len(transport.probes) / 2
    # Every 0.05 s for 0.6 s: ~12 probes of each node (waiting for the timeout: 0.6 / 0.25, ~2-3).
    assert per_node >= 7, transport.probes
    # Failures from the first timeout (0.2 s) on, every period: ~8 each (waiting: ~2).
    assert len(failed) / 2 >= 5, failed
