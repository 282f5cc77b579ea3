"""Shared by the dispatch unit tests: a real Membership and Dispatcher over the scripted FakeTransport, with
dispatch timings in milliseconds. No sockets, no processes: the store is a SQLite file written by its thread."""

import dataclasses
import time
from collections.abc import Iterator
from pathlib import Path

from gridserve.gateway.config import GatewayConfig
from gridserve.gateway.dispatch.dispatcher import Dispatcher
from gridserve.gateway.ops.metrics import GatewayMetrics
from gridserve.gateway.registry.events import Registered
from gridserve.gateway.registry.membership import Membership
from gridserve.gateway.transport.fake import FakeTransport
from gridserve.store import Store, StoreWriter
from gridserve.trust import EnvelopeVerifier, FreshnessPolicy, Identity
from gridserve.types import Capability, GenerateRequest, HardwareInfo, NodeId, NodeState, RuntimeInfo, SamplingParams
from gridserve.types.scheduling import Candidate, Decision, ScheduleRequest

CONFIG = GatewayConfig(
    hedge_min_s=0.03,
    first_token_timeout_s=0.1,
    stall_min_s=0.05,
    stall_unpredicted_s=0.05,
    stall_unresumable_s=0.2,
    stall_busy_max_s=0.4,
    max_failovers=3,
)
"""Every dispatch timing in tens of milliseconds; with PREDICTED_TTFT_S the hedge delay is hedge_min_s (30 ms),
with PREDICTED_ITL_S the stall timeout is stall_min_s (50 ms)."""
WATCH_S = 0.005
PREDICTED_TTFT_S = 0.01
PREDICTED_ITL_S = 0.001
IDENTITY = Identity.generate()


def store_writer(directory: Path) -> Iterator[StoreWriter]:
    """A migrated SQLite store's writer (shared by a module's tests: a store takes ~0.15 s to set up)."""
    store = Store(f"sqlite:///{directory / 'gs.db'}")
    store.migrate()
    writer = StoreWriter(store)
    try:
        yield writer
    finally:
        writer.close()


def registered(node_id: str) -> Registered:
    """The registry event of a node that registered (its signed registration checked) just now."""
    cap = Capability(
        node_id=NodeId(node_id),
        public_key="pk",
        endpoint=f"http://{node_id}.test",
        engine="tiny",
        models=(),
        hardware=HardwareInfo(accelerator="t4"),
        runtime=RuntimeInfo(gridserve="t", python="t", engine="t"),
    )
    now = time.time()
    return Registered(cap, at=now, registered_at=now, capability_at=now, last_seen=now)


class Grid:
    """Nodes n1, n2, ... known to a real Membership, reached through a FakeTransport."""

    def __init__(self, writer: StoreWriter, nodes: int = 3, config: GatewayConfig = CONFIG) -> None:
        verifier = EnvelopeVerifier(FreshnessPolicy(), time.time)
        self.membership = Membership(config, verifier, writer, GatewayMetrics())
        self.ids = [f"n{i + 1}" for i in range(nodes)]
        for node_id in self.ids:
            self.membership.apply(registered(node_id))
        self.fake = FakeTransport()
        self.dispatcher = Dispatcher(config, self.membership, IDENTITY, self.membership.metrics, self.fake)
        self.dispatcher.policy = dataclasses.replace(self.dispatcher.policy, watch_s=WATCH_S)

    def outstanding(self, node_id: str) -> int:
        return self.membership.nodes[NodeId(node_id)].outstanding

    def state(self, node_id: str) -> NodeState:
        return self.membership.nodes[NodeId(node_id)].state

    def count(self, metric: str) -> float:
        """A counter of the gateway's /metrics, e.g. "gridserve_hedges_total"."""
        return self.membership.metrics.registry.get_sample_value(metric) or 0.0

    def decision(self, *ranked: str, itl: float | None = PREDICTED_ITL_S, step_s: float | None = None) -> Decision:
        """The scheduler's ranking: `ranked` best first (default: every node in order); `step_s`: the nodes are
        interleaved, with this longest step between a stream's tokens (Candidate.step_s)."""
        names = ranked or tuple(self.ids)
        candidates = tuple(
            Candidate(
                node_id=NodeId(n),
                rank=i,
                score=1.0 - i / 10,
                details=(),
                predicted_ttft_s=PREDICTED_TTFT_S,
                predicted_itl_s=itl,
                step_s=step_s,
            )
            for i, n in enumerate(names)
        )
        request = ScheduleRequest(request_id="r1", model="m", prompt_tokens=3, max_tokens=16)
        return Decision(
            decision_id="d1",
            request=request,
            requirements={},
            profile="test",
            created=0.0,
            chosen=candidates[0].node_id,
            candidates=candidates,
            verdicts=(),
            explanation="test ranking",
        )


def job(max_tokens: int = 16) -> GenerateRequest:
    return GenerateRequest(request_id="r1", model="m", prompt="abc", sampling=SamplingParams(max_tokens=max_tokens))
