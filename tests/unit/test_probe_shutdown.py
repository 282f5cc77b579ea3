"""A gateway that stops mid probe round leaves no probe behind: on a large grid a round is paced over the period,
so probes already launched are still waiting when the prober is cancelled. One that finished later reported to a
closed store (a 'StoreWriter is closed' traceback per probe at every shutdown)."""

import asyncio
import dataclasses
from collections.abc import Iterator

import pytest
from tests.unit.dispatch_support import CONFIG, Grid, store_writer

from gridserve.gateway.registry.health import PACE_ABOVE, probe_forever
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


def test_cancelling_the_prober_mid_round_cancels_the_probes_it_launched(writer: StoreWriter) -> None:
    config = dataclasses.replace(CONFIG, probe_interval_s=1.0, probes_per_round=PACE_ABOVE * 2)
    grid = Grid(writer, nodes=PACE_ABOVE * 2, config=config)
    transport = SlowHealth()
    grid.dispatcher.transport = transport
    reported: list[NodeId] = []
    grid.membership.probe_result = lambda node_id, **_: reported.append(node_id)  # type: ignore[method-assign]

    async def go() -> None:
        prober = asyncio.create_task(probe_forever(grid.membership, grid.dispatcher, config))
        await asyncio.sleep(0.1)  # a few probes launched, the round still pacing (one every 15 ms)
        prober.cancel()
        with pytest.raises(asyncio.CancelledError):
            await prober
        transport.answer.set()  # the nodes answer now: a probe still running would report
        await asyncio.sleep(0.05)

    asyncio.run(go())
    assert 2 <= len(transport.probes) < PACE_ABOVE * 2 and reported == []
