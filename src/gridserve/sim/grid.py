"""The simulated grid: nodes drawn from a hardware mix, each with a region, a hidden speed (stragglers), an
honest or dishonest operator, sessions (churn) and thermal episodes; what the gateway would see of each node
is kept as a NodeSnapshot in a SnapshotTable, replaced only when something about the node changes.
"""

import functools
import math
import random
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from gridserve.catalog import hardware_spec
from gridserve.catalog.hardware import HardwareSpec
from gridserve.catalog.models import MODELS, ModelSpec
from gridserve.engines.placement import EmulationError, placement_for
from gridserve.perfmodel import Calibration, Load, predict
from gridserve.policy import AuditRates, DispatchPolicy, HealthTiming
from gridserve.reliability.book import ReliabilitySummary
from gridserve.scheduler import NodeSnapshot
from gridserve.scheduler.snapshot import NodeStatic
from gridserve.sim.cache import BlockCache
from gridserve.sim.trace import TOKENS_PER_BLOCK, TraceRequest
from gridserve.types import Capability, HardwareInfo, ModelOffer, NodeId, NodeState, RuntimeInfo, Telemetry

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
HEALTH = HealthTiming()
"""The gateway's default failure detection (gridserve/policy/health.py)."""
AUDIT = AuditRates()
"""The gateway's default audit rates (gridserve/policy/audit.py)."""
THROTTLED_TEMPERATURE_C = 88.0


@dataclass(frozen=True)
class SimConfig:
    nodes: int = 100
    model: str = "llama-3-8b"
    seed: int = 0
    mix: dict[str, float] = field(default_factory=lambda: dict(DECENTRALIZED_MIX))
    cards: tuple[str, ...] = ()
    """Explicit cards, node i gets cards[i % len] (instead of drawing from `mix`)."""
    rtt_s: float | None = None
    """Every node's round-trip time (None: drawn by region)."""
    noise_sigma: float = 0.10
    """Log-normal noise on each request's TTFT and ITL."""
    straggler_share: float = 0.05
    straggler_slowdown: float = 3.0
    """Stragglers run this many times slower than their card's spec says; only observation reveals it."""
    ttft_slo_s: float = 2.0
    tpot_slo_s: float = 0.100
    churn: bool = True
    uptime_mean_s: float = 1800.0
    uptime_shape: float = 0.5
    """Weibull shape of session lengths (< 1: heavy-tailed, many short sessions and a few very long ones, as
    volunteer-computing availability studies report)."""
    downtime_mean_s: float = 300.0
    """Exponential time away before a node that left comes back (same identity, same record)."""
    thermal_per_hour: float = 2.0
    """Thermal-throttling episodes per node per hour (Poisson)."""
    thermal_mean_s: float = 120.0
    thermal_clock: float = 0.6
    """Clock ratio while throttled: the node runs at this share of its speed and reports it in telemetry."""
    dishonest_share: float = 0.05
    """Operators whose answers fail verification (wrong model, skipped compute): caught by sampled audits."""
    heartbeat_s: float = HEALTH.heartbeat_interval_s
    """How often nodes report telemetry and the gateway refreshes reliability summaries."""
    detect_s: float = HEALTH.quiet_detect_s
    """A node that left with no stream open is marked down this long after it went (a probe fails once its
    last heartbeat is older than one interval); one with streams open when the first stalls."""
    probation_s: float = HEALTH.probation_s
    audit_rate: float = AUDIT.rate
    audit_new_rate: float = AUDIT.new_rate
    audit_floor: float = AUDIT.floor
    dispatch: DispatchPolicy = field(default_factory=DispatchPolicy)
    """The gateway's dispatch policy: hedge delay, stall guard, failovers (gridserve/policy/dispatch.py)."""

    @property
    def availability(self) -> float:
        """Long-run share of time a node is in the grid."""
        if not self.churn:
            return 1.0
        return self.uptime_mean_s / (self.uptime_mean_s + self.downtime_mean_s)

    def uptime(self, rng: random.Random) -> float:
        scale = self.uptime_mean_s / math.gamma(1.0 + 1.0 / self.uptime_shape)
        return rng.weibullvariate(scale, self.uptime_shape)

    def downtime(self, rng: random.Random) -> float:
        return rng.expovariate(1.0 / self.downtime_mean_s)


@dataclass
class SimNode:
    node_id: str
    hw: HardwareSpec
    dtype: str
    quant: str
    capability: Capability
    rtt_s: float
    slowdown: float
    dishonest: bool
    static: NodeStatic
    present: bool = True
    """In the grid now (churn takes it away and brings it back)."""
    state: NodeState = NodeState.UP
    """What the gateway believes (a node that left stays UP until the failure detector notices)."""
    clock: float = 1.0
    """1.0, or the throttled clock ratio during a thermal episode."""
    active: int = 0
    """Requests in a batch slot (at most the card's batch slots)."""
    queue: deque[Any] = field(default_factory=deque)
    """Requests waiting for a slot, first come first served."""
    session: int = 0
    """Counts the node's sessions: events of an earlier session are ignored."""
    calibration: Calibration = field(default_factory=Calibration)
    summary: ReliabilitySummary | None = None
    latency_ewma_s: float | None = None
    heartbeat_at: float = 0.0
    touched_at: float = -math.inf
    """When its snapshot was last rebuilt."""
    price_per_mtok: float = 0.0
    """What a million tokens of the simulated model cost on it (the scheduler's price)."""
    cache: BlockCache = field(default_factory=lambda: BlockCache(0))
    """Its prefix cache: the prompt blocks its KV memory holds (emptied when it leaves)."""
    weight_bytes: float = 0.0
    """The model's weights at the node's precision."""
    kv_split: tuple[float, float, int] = (0.0, 0.0, 0)
    """The model's KV bytes a token in its full-attention and its sliding layers, and the window (ModelSpec)."""
    kv_tokens: int = 0
    """KV cache held by the requests in its batch (prompt and answer): what its telemetry reports in use."""
    kv_window_tokens: int = 0
    """Of those, what the sliding layers keep: each sequence's tokens up to the window (0 without windows)."""

    def hold_kv(self, tokens: int) -> None:
        """A sequence of `tokens` tokens takes a batch slot: its KV is in use (`release_kv` with the same)."""
        self.kv_tokens += tokens
        self.kv_window_tokens += min(tokens, self.kv_split[2])

    def release_kv(self, tokens: int) -> None:
        self.kv_tokens -= tokens
        self.kv_window_tokens -= min(tokens, self.kv_split[2])

    def clear_kv(self) -> None:
        self.kv_tokens = self.kv_window_tokens = 0

    def snapshot(self) -> NodeSnapshot:
        return NodeSnapshot(
            node_id=NodeId(self.node_id),
            state=self.state,
            capability=self.capability,
            last_heartbeat=self.heartbeat_at,
            # the gateway's in-flight count includes the ones queued at the node (its only gateway): they are
            # not reported again as queue_depth, which the scheduler would add to them
            telemetry=_telemetry(self.hw, self.active, self.clock, self._memory_used()),
            outstanding=self.active + len(self.queue),
            reliability=self.summary,
            calibration=self.calibration,
            static=self.static,
            latency_ewma_s=self.latency_ewma_s,
        )

    def _memory_used(self) -> int:
        """Weights plus the KV of the sequences in its batch (ModelSpec.kv_bytes of each: the sliding layers keep
        at most their window), in whole blocks (telemetry is shared per value)."""
        full, sliding, _ = self.kv_split
        blocks = -(-self.kv_tokens // TOKENS_PER_BLOCK)
        window_blocks = -(-self.kv_window_tokens // TOKENS_PER_BLOCK)
        return int(self.weight_bytes + blocks * TOKENS_PER_BLOCK * full + window_blocks * TOKENS_PER_BLOCK * sliding)

    def speed(self) -> float:
        """Service time multiplier: hidden slowness x thermal throttling."""
        return self.slowdown / self.clock


@functools.lru_cache(maxsize=65536)
def _telemetry(hw: HardwareSpec, active: int, clock: float, used: int) -> Telemetry:
    """What a node reports: load, memory (weights and the KV cache its batch holds, as a serving engine's KV
    usage), and while throttled its clock and temperature (shared, immutable)."""
    total = int(hw.memory_gib * 2**30)
    throttled = clock < 1.0
    return Telemetry(
        utilization=min(1.0, active / max(1, hw.batch_slots)),
        memory_used_bytes=min(total, used),
        memory_total_bytes=total,
        active_requests=active,
        clock_ratio=clock if throttled else None,
        temperature_c=THROTTLED_TEMPERATURE_C if throttled else None,
    )


def build_nodes(config: SimConfig, model: ModelSpec, rng: random.Random) -> list[SimNode]:
    cards = list(config.mix)
    weights = [config.mix[c] for c in cards]
    regions = list(REGION_SHARE)
    nodes = []
    for i in range(config.nodes):
        hw = hardware_spec(config.cards[i % len(config.cards)] if config.cards else rng.choices(cards, weights)[0])
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
        dishonest = rng.random() < config.dishonest_share
        static = NodeStatic.of(capability)
        rtt = REGION_RTT_S[region] if config.rtt_s is None else config.rtt_s
        node = SimNode(node_id, hw, dtype, quant, capability, rtt, slow, dishonest, static)
        node.cache = BlockCache(cache_blocks(model, hw, dtype, quant))
        node.weight_bytes = model.weight_bytes(dtype, quant)
        node.kv_split = model.kv_split()
        price = static.price_per_mtok(model.name)
        node.price_per_mtok = 0.0 if math.isnan(price) else price
        nodes.append(node)
    return nodes


def model_for_trace(trace: Sequence[TraceRequest], mix: dict[str, float]) -> tuple[str, int]:
    """The model a simulation of `trace` serves by default, and how many of its requests no model's context holds:
    llama-3-8b when it holds every request (the simulator's long-standing default), else the smallest catalogue
    model (emulated, every card of `mix` can hold it) whose context holds the longest request (prompt + output),
    else the one with the longest context."""
    longest = max((r.prompt_tokens + r.output_tokens for r in trace), default=0)

    def fits_mix(spec: ModelSpec) -> bool:
        try:
            for card in mix:
                placement_for(spec, hardware_spec(card))
        except EmulationError:
            return False
        return True

    usable = [m for m in MODELS.values() if not m.real_engine and fits_mix(m)]
    if MODELS["llama-3-8b"].max_context >= longest:
        return "llama-3-8b", 0
    holding = [m for m in usable if m.max_context >= longest]
    if holding:
        return min(holding, key=lambda m: (m.params, m.max_context, m.name)).name, 0
    best = max(usable, key=lambda m: (m.max_context, -m.params))
    return best.name, sum(1 for r in trace if r.prompt_tokens + r.output_tokens > best.max_context)


def cache_blocks(model: ModelSpec, hw: HardwareSpec, dtype: str, quant: str) -> int:
    """Prompt blocks a card's prefix cache holds: its memory less the model's weights at its precision, over the
    KV bytes a token of a typical prompt takes (ModelSpec.kv_room_tokens; as the gateway sizes its index of the
    node: gateway/dispatch/prefixes.py)."""
    return model.kv_room_tokens(hw.memory_gib * 2**30, dtype, quant) // TOKENS_PER_BLOCK


def grid_capacity_rps(nodes: list[SimNode], model: ModelSpec, config: SimConfig, prompt: float, output: float) -> float:
    """Requests per second the grid sustains with every node's batch slots full, times the share of time nodes
    are present (churn): the load scale's 100%."""
    total = 0.0
    for n in nodes:
        slots = max(1, n.hw.batch_slots)
        pred = predict(
            model, n.hw, prompt_tokens=int(prompt), dtype=n.dtype, quantization=n.quant, load=Load(active=slots - 1)
        )
        total += slots / (pred.e2e_s(int(output)) * n.slowdown + n.rtt_s)
    return total * config.availability
