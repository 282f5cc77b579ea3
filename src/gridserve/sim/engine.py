"""The discrete-event simulation. Production code decides: `scheduler.schedule` (with the policy's profile),
`reliability.ReliabilityBook` (job outcomes, SLO), `perfmodel.predict` (service times, batching: ITL grows
with concurrent requests) and `perfmodel.Calibration` (what the gateway learns of each node). The simulator
only supplies the clock, the randomness, the grid and the load.

Per node: a card from the mix, the model at the widest precision that fits (as emulated nodes place it), a
region whose round-trip time is added to TTFT, log-normal noise on TTFT and ITL, and a share of stragglers
that run `straggler_slowdown` times slower than their spec says (only observation reveals it).
"""

import heapq
import math
import random
from dataclasses import dataclass, field

from gridserve.catalog import hardware_spec, model_spec
from gridserve.catalog.hardware import HardwareSpec
from gridserve.catalog.models import ModelSpec
from gridserve.engines.emulated import placement_for
from gridserve.perfmodel import Calibration, Load, predict
from gridserve.reliability import EventKind, NodeEvent, ReliabilityBook
from gridserve.reliability.book import ReliabilitySummary
from gridserve.scheduler import NodeSnapshot, Profile, schedule
from gridserve.scheduler.baselines import ewma
from gridserve.sim.trace import TraceRequest
from gridserve.types import Capability, HardwareInfo, ModelOffer, NodeId, NodeState, RuntimeInfo, Telemetry
from gridserve.types.scheduling import ScheduleRequest

DECENTRALIZED_MIX = {
    "rtx4090": 0.30,
    "rtx3090": 0.20,
    "a10g": 0.10,
    "l40s": 0.10,
    "a100-80g": 0.12,
    "h100-sxm": 0.06,
    "t4": 0.12,
}
"""Default hardware mix: mostly consumer cards, some data-centre GPUs (a decentralized network)."""
REGION_RTT_S = {"same-region": 0.005, "near": 0.030, "far": 0.090, "intercontinental": 0.160}
REGION_SHARE = {"same-region": 0.35, "near": 0.35, "far": 0.2, "intercontinental": 0.1}
EPOCH = 1_700_000_000.0
"""Simulated time 0 as a unix time (the scheduler and ledger read absolute times)."""


@dataclass(frozen=True)
class SimConfig:
    nodes: int = 100
    model: str = "llama-3-8b"
    seed: int = 0
    mix: dict[str, float] = field(default_factory=lambda: dict(DECENTRALIZED_MIX))
    noise_sigma: float = 0.10
    straggler_share: float = 0.05
    straggler_slowdown: float = 3.0
    ttft_slo_s: float = 2.0
    tpot_slo_s: float = 0.100
    summary_refresh_s: float = 10.0


@dataclass
class SimNode:
    node_id: str
    hw: HardwareSpec
    dtype: str
    quant: str
    capability: Capability
    rtt_s: float
    slowdown: float
    active: int = 0
    calibration: Calibration = field(default_factory=Calibration)
    summary: ReliabilitySummary | None = None
    summary_at: float = -math.inf
    telemetry: Telemetry | None = None
    latency_ewma_s: float | None = None

    def snapshot(self, now: float) -> NodeSnapshot:
        if self.telemetry is None or self.telemetry.active_requests != self.active:
            total = int(self.hw.memory_gib * 2**30)
            self.telemetry = Telemetry(
                utilization=min(1.0, self.active / max(1, self.hw.batch_slots)),
                memory_used_bytes=int(total * 0.6),
                memory_total_bytes=total,
                active_requests=self.active,
            )
        return NodeSnapshot(
            node_id=NodeId(self.node_id),
            state=NodeState.UP,
            capability=self.capability,
            last_heartbeat=now,
            telemetry=self.telemetry,
            outstanding=self.active,
            reliability=self.summary,
            calibration=self.calibration,
            latency_ewma_s=self.latency_ewma_s,
        )


@dataclass(frozen=True)
class Outcome:
    """One simulated request: served (node, times) or failed (no node could take it)."""

    at_s: float
    prompt_tokens: int
    output_tokens: int
    node_id: str | None
    accelerator: str
    ttft_s: float
    tpot_s: float
    price_per_mtok: float

    @property
    def failed(self) -> bool:
        return self.node_id is None


def build_nodes(config: SimConfig, model: ModelSpec, rng: random.Random) -> list[SimNode]:
    cards = list(config.mix)
    weights = [config.mix[c] for c in cards]
    regions = list(REGION_SHARE)
    nodes = []
    for i in range(config.nodes):
        hw = hardware_spec(rng.choices(cards, weights)[0])
        dtype, quant = placement_for(model, hw)
        node_id = f"sim{i:05d}-{hw.key}"
        engine = f"emulated:{hw.key}"
        capability = Capability(
            node_id=NodeId(node_id),
            public_key=f"pk-{node_id}",
            endpoint=f"http://{node_id}.sim:8000",
            engine=engine,
            models=(ModelOffer(name=model.name, dtype=dtype, quantization=quant, max_context=model.max_context),),
            hardware=HardwareInfo(accelerator=hw.key, emulated=True, memory_bytes=int(hw.memory_gib * 2**30)),
            runtime=RuntimeInfo(gridserve="sim", python="sim", engine=engine),
        )
        region = rng.choices(regions, [REGION_SHARE[r] for r in regions])[0]
        slow = config.straggler_slowdown if rng.random() < config.straggler_share else 1.0
        nodes.append(SimNode(node_id, hw, dtype, quant, capability, REGION_RTT_S[region], slow))
    return nodes


def grid_capacity_rps(nodes: list[SimNode], model: ModelSpec, prompt: float, output: float) -> float:
    """Requests per second the grid sustains with every node's batch slots full (the load scale's 100%)."""
    total = 0.0
    for n in nodes:
        slots = max(1, n.hw.batch_slots)
        pred = predict(
            model, n.hw, prompt_tokens=int(prompt), dtype=n.dtype, quantization=n.quant, load=Load(active=slots - 1)
        )
        total += slots / (pred.e2e_s(int(output)) * n.slowdown + n.rtt_s)
    return total


class Simulation:
    def __init__(self, config: SimConfig, profile: Profile) -> None:
        self.config = config
        self.profile = profile
        self.model = model_spec(config.model)
        self.rng = random.Random(config.seed)
        self.nodes = build_nodes(config, self.model, random.Random(config.seed))
        self.by_id = {n.node_id: n for n in self.nodes}
        self.book = ReliabilityBook()
        for n in self.nodes:
            self.book.add_node(n.node_id, EPOCH)

    def _summary(self, node: SimNode, now: float) -> None:
        if now - node.summary_at >= self.config.summary_refresh_s:
            node.summary, node.summary_at = self.book.summary(node.node_id, now), now

    def run(self, trace: list[TraceRequest]) -> list[Outcome]:
        outcomes: list[Outcome] = []
        flights: list[tuple[float, int, _Flight]] = []
        for i, req in enumerate(trace):
            now = EPOCH + req.at_s
            while flights and flights[0][0] <= now:
                self._complete(heapq.heappop(flights)[2])
            outcome, flight = self._serve(i, req, now)
            outcomes.append(outcome)
            if flight is not None:
                heapq.heappush(flights, (flight.finish, i, flight))
        while flights:
            self._complete(heapq.heappop(flights)[2])
        return outcomes

    def _complete(self, f: "_Flight") -> None:
        """A request finished: the node frees a slot; the ledger and the calibration learn, as in the gateway."""
        node = self.by_id[f.node_id]
        node.active -= 1
        within = f.ttft <= self.config.ttft_slo_s and f.tpot <= self.config.tpot_slo_s
        self.book.record(NodeEvent(node_id=f.node_id, kind=EventKind.JOB_COMPLETED, at=f.finish, within_slo=within))
        node.summary_at = -math.inf
        node.latency_ewma_s = ewma(node.latency_ewma_s, f.ttft)
        node.calibration = node.calibration.observe(
            predicted_ttft_s=f.pred_ttft, observed_ttft_s=f.ttft, predicted_itl_s=f.pred_itl, observed_itl_s=f.tpot
        )

    def _serve(self, i: int, req: TraceRequest, now: float) -> tuple[Outcome, "_Flight | None"]:
        for node in self.nodes:
            self._summary(node, now)
        request = ScheduleRequest(
            request_id=f"sim-{i}",
            model=self.model.name,
            prompt_tokens=req.prompt_tokens,
            max_tokens=req.output_tokens,
            ttft_slo_s=self.config.ttft_slo_s,
            tpot_slo_s=self.config.tpot_slo_s,
        )
        snapshots = [n.snapshot(now) for n in self.nodes]
        decision = schedule(request, snapshots, self.profile, self.rng, now, decision_id=f"d{i}")
        if decision.chosen is None:
            return Outcome(req.at_s, req.prompt_tokens, req.output_tokens, None, "", math.inf, math.inf, 0.0), None
        node = self.by_id[decision.chosen]
        pred = predict(
            self.model,
            node.hw,
            prompt_tokens=req.prompt_tokens,
            dtype=node.dtype,
            quantization=node.quant,
            load=Load(active=node.active),
        )
        noise = self.config.noise_sigma
        ttft = node.rtt_s + pred.ttft_s * node.slowdown * self.rng.lognormvariate(0.0, noise)
        tpot = pred.itl_s * node.slowdown * self.rng.lognormvariate(0.0, noise)
        node.active += 1
        chosen = decision.candidate(node.node_id)
        price = chosen.price_per_mtok if chosen and chosen.price_per_mtok else 0.0
        outcome = Outcome(req.at_s, req.prompt_tokens, req.output_tokens, node.node_id, node.hw.key, ttft, tpot, price)
        finish = now + ttft + tpot * max(0, req.output_tokens - 1)
        return outcome, _Flight(node.node_id, finish, ttft, tpot, pred.ttft_s, pred.itl_s)


@dataclass(frozen=True)
class _Flight:
    node_id: str
    finish: float
    ttft: float
    tpot: float
    pred_ttft: float
    pred_itl: float
