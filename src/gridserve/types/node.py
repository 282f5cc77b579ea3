"""What a node is (capability) and how it is right now (telemetry)."""

from enum import StrEnum
from typing import Annotated, Literal, NewType

from pydantic import Field

from gridserve.types.base import Strict

NodeId = NewType("NodeId", str)

# Bounds on what a node may send: a signed message is still untrusted input.
MAX_NAME = 256
"""Longest id, key, name, version or digest (real ones are tens of characters)."""
MAX_URL = 2048
"""Longest endpoint URL."""
MAX_MESSAGE = 1000
"""Longest error message (nodes cut theirs at 300: engines/base.py)."""
MAX_ITEMS = 64
"""Most entries in a list (GPUs, errors, faults, versions)."""
MAX_MODELS = 64
"""Most models a node may offer, list as loadable or serve stages of (a real node: a handful). With MAX_NAME this
bounds a capability document at tens of kB, so no node can make a request path (`/v1/models`, snapshots,
explanations) do work in proportion to a list it chose."""
MAX_CAPABILITY_BYTES = 64 * 1024
"""Largest signed registration the gateway reads (refused with 413 before its signature is checked)."""
JOIN_TOKEN_HEADER = "x-gridserve-join-token"
"""The header a node's registration carries its join token in (HTTP header names are case-insensitive)."""
Name = Annotated[str, Field(max_length=MAX_NAME)]
Count = Annotated[int, Field(ge=0)]
"""Bytes, cores, requests: never negative."""
Rate = Annotated[float, Field(ge=0.0, allow_inf_nan=False)]
"""Tokens per second, USD per million tokens: finite, never negative."""


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
    name: Name
    memory_total_bytes: Count
    driver: Name = ""


Vendor = Literal["nvidia", "amd", "apple", "other"]


class DeviceFigures(Strict):
    """A card as its driver describes it (NVML, amdsmi): enough to derive its bandwidth, FLOPs and dtypes when its
    name is in no table (catalog/derive.py)."""

    name: Name
    vendor: Vendor = "nvidia"
    memory_bytes: Count
    memory_bus_width_bits: int = Field(ge=1, le=65536)
    memory_clock_mhz: float = Field(gt=0.0, le=100_000.0, allow_inf_nan=False)
    """The maximum memory clock as the driver reports it (NVML's NVML_CLOCK_MEM): bandwidth is bus width / 8 x this
    clock x 2 (two transfers a reported clock, for GDDR and HBM alike as NVML reports them)."""
    sm_count: int = Field(ge=1, le=100_000)
    """Streaming multiprocessors (NVIDIA) or compute units (AMD)."""
    sm_clock_mhz: float = Field(gt=0.0, le=100_000.0, allow_inf_nan=False)
    """The maximum (boost) shader clock."""
    compute_capability: Name = ""
    """NVIDIA's major.minor (e.g. "8.9"), or AMD's gfx target (e.g. "gfx942")."""


class MeasuredFigures(Strict):
    """What the node's micro-benchmark measured when it started (node/microbench.py), signed with its capability."""

    bandwidth_gbs: Rate
    """Device memory copy: bytes read plus bytes written per second, GB/s."""
    tflops: dict[Name, Rate] = Field(default_factory=dict, max_length=MAX_ITEMS)
    """Dense matmul throughput per dtype measured (float16, bfloat16, float32, fp8...), TFLOPS."""
    seconds: Rate = 0.0
    """How long the benchmark ran."""
    device: Name = ""
    """What it ran on ("cuda:0", "cpu")."""


class HardwareInfo(Strict):
    """Detected (or, for emulated nodes, advertised) hardware."""

    accelerator: Name = Field(description="catalog key, e.g. 'cpu', 'rtx4090', 'h100-sxm'")
    emulated: bool = False
    cpu_model: Name = ""
    cpu_cores: Count = 0
    ram_bytes: Count = 0
    gpus: tuple[GpuInfo, ...] = Field((), max_length=MAX_ITEMS)
    memory_bytes: Count = Field(0, description="memory available to the engine for weights + KV cache")
    device: DeviceFigures | None = None
    """The card as its driver describes it; the gateway derives its figures from it when `accelerator` names no card
    it knows (catalog/derive.py)."""
    measured: MeasuredFigures | None = None
    """The micro-benchmark's figures: the performance model starts from them, and the gateway checks the claimed
    card against them (gateway/registry/claims.py)."""


class LayerRange(Strict):
    """A contiguous, half-open range of transformer layers `[start, end)`: what one pipeline stage runs."""

    start: int = Field(ge=0)
    end: int = Field(gt=0)

    def model_post_init(self, context: object, /) -> None:
        if self.end <= self.start:
            raise ValueError(f"empty layer range [{self.start}, {self.end})")

    def __len__(self) -> int:
        return self.end - self.start


Task = Literal["generate", "embed"]
"""What a node serves a model for: `generate` (chat and text completions), `embed` (`/v1/embeddings`)."""
GENERATE: Task = "generate"
EMBED: Task = "embed"


class ModelOffer(Strict):
    """One model a node serves."""

    name: Name
    dtype: Name = "float32"
    quantization: Name = "none"
    max_context: int = Field(2048, ge=1)
    weights_digest: Name = ""
    layers: LayerRange | None = None
    """The layers this node runs; None means the whole model (pipeline stages are not served yet)."""
    features: tuple[Name, ...] = Field((), max_length=MAX_ITEMS)
    """Request features beyond plain sampling it honours for this model, named as the request parameters
    (SamplingParams.features): the gateway gives a request that turns one on only to nodes that offer it."""
    tasks: tuple[Task, ...] = Field((GENERATE,), min_length=1, max_length=2)
    """What it serves the model for: each task is its own capability, and the scheduler gives a request only to
    offers of its task (an embedding-only offer never gets a chat request). Default: generation (older nodes)."""

    def serves(self, task: Task) -> bool:
        return task in self.tasks


class RuntimeInfo(Strict):
    gridserve: Name
    python: Name
    engine: Name
    versions: dict[Name, Name] = Field(default_factory=dict, max_length=MAX_ITEMS)


class Capability(Strict):
    """The signed capability document a node registers with."""

    node_id: NodeId = Field(max_length=MAX_NAME)
    public_key: Name
    endpoint: str = Field(max_length=MAX_URL)
    engine: Name
    models: tuple[ModelOffer, ...] = Field(max_length=MAX_MODELS)
    hardware: HardwareInfo
    runtime: RuntimeInfo
    price_per_mtok: Rate = 0.0
    """The operator's price (USD per million generated tokens); 0 = the price derived from the hardware."""
    loadable_models: tuple[Name, ...] = Field((), max_length=MAX_MODELS)
    """Models on disk that the node could load on demand (not resident: slower first token)."""
    stage_models: tuple[Name, ...] = Field((), max_length=MAX_MODELS)
    """Models of which the node runs whatever layer range the gateway's planner assigns it (`--layers auto`)."""
    prefix_cache_tokens: Count | None = None
    """Prompt tokens the node's prefix cache holds (KV of recent prompts, reused by prompts that start the same way;
    0: no prefix cache); None: not said (an upstream server's own cache, or a node that predates the field)."""
    prefix_block_tokens: Count | None = None
    """The prefix cache's block: it reuses whole blocks of this many prompt tokens (the gateway rounds what it
    expects a node to reuse down to them); None: not said."""
    interleaved: bool = False
    """The engine runs every request it is given at once, taking turns token by token (gridserve's own engines):
    a new request waits for no other to finish, and each runs slower the more run. False: batch slots, and
    requests beyond them wait in a queue (vLLM, llama.cpp server: what the hardware catalogue says)."""
    max_running: Count | None = None
    """The most requests the engine runs at once (a serving engine's batch limit: vLLM's `--max-num-seqs`, the
    llama.cpp server's `--parallel`); later ones wait in its own queue, and the gateway holds its fair queue at this
    many. 0: no limit (every request runs at once); None: not said (the hardware catalogue's batch slots)."""


ErrorKind = Literal["oom", "cuda", "timeout", "refused", "engine"]


class NodeError(Strict):
    """One entry of a node's recent error log (sent with heartbeats; read by the latency doctor)."""

    at: float = Field(allow_inf_nan=False)
    kind: ErrorKind
    message: str = Field(max_length=MAX_MESSAGE)


class Telemetry(Strict):
    """How a node is right now; carried by every heartbeat."""

    utilization: float = Field(0.0, ge=0.0, le=1.0)
    memory_used_bytes: Count = 0
    memory_total_bytes: Count = 0
    temperature_c: float | None = Field(None, ge=-273.15, allow_inf_nan=False)
    clock_ratio: float | None = Field(None, ge=0.0, allow_inf_nan=False)
    """SM clock over its maximum while a thermal or power reason slows it, else 1.0 (idle is not slow)."""
    clock_reasons: tuple[Name, ...] = Field((), max_length=MAX_ITEMS)
    """NVML's current clock event reasons (e.g. GpuIdle, SwThermalSlowdown, SwPowerCap); empty if unknown."""
    queue_depth: Count = 0
    active_requests: Count = 0
    tokens_per_s: Rate = 0.0
    errors: tuple[NodeError, ...] = Field((), max_length=MAX_ITEMS)
    """The node's most recent errors, oldest first."""
    faults: tuple[Name, ...] = Field((), max_length=MAX_ITEMS)
    """Faults injected on this node (tests and demos; node/faults.py), shown so nobody mistakes them for real."""
