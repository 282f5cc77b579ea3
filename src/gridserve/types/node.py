"""What a node is (capability) and how it is right now (telemetry)."""

from enum import StrEnum
from typing import Literal, NewType

from pydantic import Field

from gridserve.types.base import Strict

NodeId = NewType("NodeId", str)


class NodeState(StrEnum):
    """Membership state as the gateway sees it."""

    UP = "up"
    SUSPECT = "suspect"
    DOWN = "down"
    EJECTED = "ejected"
    PROBATION = "probation"
    QUARANTINED = "quarantined"
    BANNED = "banned"


class GpuInfo(Strict):
    name: str
    memory_total_bytes: int
    driver: str = ""


class HardwareInfo(Strict):
    """Detected (or, for emulated nodes, advertised) hardware."""

    accelerator: str = Field(description="catalog key, e.g. 'cpu', 'rtx4090', 'h100-sxm'")
    emulated: bool = False
    cpu_model: str = ""
    cpu_cores: int = 0
    ram_bytes: int = 0
    gpus: tuple[GpuInfo, ...] = ()
    memory_bytes: int = Field(0, description="memory available to the engine for weights + KV cache")


class LayerRange(Strict):
    """A contiguous, half-open range of transformer layers `[start, end)`: what one pipeline stage runs."""

    start: int = Field(ge=0)
    end: int = Field(gt=0)

    def model_post_init(self, context: object, /) -> None:
        if self.end <= self.start:
            raise ValueError(f"empty layer range [{self.start}, {self.end})")

    def __len__(self) -> int:
        return self.end - self.start


class ModelOffer(Strict):
    """One model a node serves."""

    name: str
    dtype: str = "float32"
    quantization: str = "none"
    max_context: int = 2048
    weights_digest: str = ""
    layers: LayerRange | None = None
    """The layers this node runs; None means the whole model (pipeline stages are not served yet)."""


class RuntimeInfo(Strict):
    gridserve: str
    python: str
    engine: str
    versions: dict[str, str] = Field(default_factory=dict)


class Capability(Strict):
    """The signed capability document a node registers with."""

    node_id: NodeId
    public_key: str
    endpoint: str
    engine: str
    models: tuple[ModelOffer, ...]
    hardware: HardwareInfo
    runtime: RuntimeInfo
    price_per_mtok: float = 0.0
    """The operator's price (USD per million generated tokens); 0 = the price derived from the hardware."""
    loadable_models: tuple[str, ...] = ()
    """Models on disk that the node could load on demand (not resident: slower first token)."""
    stage_models: tuple[str, ...] = ()
    """Models of which the node runs whatever layer range the gateway's planner assigns it (`--layers auto`)."""


ErrorKind = Literal["oom", "cuda", "timeout", "refused", "engine"]


class NodeError(Strict):
    """One entry of a node's recent error log (sent with heartbeats; read by the latency doctor)."""

    at: float
    kind: ErrorKind
    message: str


class Telemetry(Strict):
    """How a node is right now; carried by every heartbeat."""

    utilization: float = 0.0
    memory_used_bytes: int = 0
    memory_total_bytes: int = 0
    temperature_c: float | None = None
    clock_ratio: float | None = None
    queue_depth: int = 0
    active_requests: int = 0
    tokens_per_s: float = 0.0
    errors: tuple[NodeError, ...] = ()
    """The node's most recent errors, oldest first."""
    faults: tuple[str, ...] = ()
    """Faults injected on this node (tests and demos; node/faults.py), shown so nobody mistakes them for real."""
