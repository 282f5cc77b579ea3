"""What the scheduler reads: a node at one instant (capability, telemetry, load, reliability, calibration)."""

from dataclasses import dataclass, field

from gridserve.catalog.hardware import HARDWARE, HardwareSpec
from gridserve.perfmodel import Calibration
from gridserve.reliability import ReliabilitySummary
from gridserve.types import Capability, ModelOffer, NodeId, NodeState, Telemetry


@dataclass(frozen=True, slots=True)
class NodeStatic:
    """Facts derived once per capability document (not per decision)."""

    hw: HardwareSpec | None
    hw_class: str
    offers: dict[str, ModelOffer]
    loadable: frozenset[str]
    memory_bytes: int

    @classmethod
    def of(cls, capability: Capability) -> "NodeStatic":
        hw = HARDWARE.get(capability.hardware.accelerator)
        memory = capability.hardware.memory_bytes or (int(hw.memory_gib * 2**30) if hw else 0)
        return cls(
            hw=hw,
            hw_class=hw.hw_class if hw else "unknown",
            offers={offer.name: offer for offer in capability.models},
            loadable=frozenset(capability.loadable_models),
            memory_bytes=memory,
        )


@dataclass(frozen=True, slots=True)
class NodeSnapshot:
    node_id: NodeId
    state: NodeState
    capability: Capability
    last_heartbeat: float
    telemetry: Telemetry | None = None
    outstanding: int = 0
    """Requests the gateway has in flight on this node."""
    reliability: ReliabilitySummary | None = None
    """None: no record yet (scored with the ledger's priors)."""
    calibration: Calibration | None = None
    static: NodeStatic = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.static is None:
            object.__setattr__(self, "static", NodeStatic.of(self.capability))
