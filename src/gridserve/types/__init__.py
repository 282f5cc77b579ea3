"""Frozen, strict data models that cross boundaries. No I/O."""

from gridserve.types.base import Strict
from gridserve.types.node import (
    Capability,
    GpuInfo,
    HardwareInfo,
    LayerRange,
    ModelOffer,
    NodeError,
    NodeId,
    NodeState,
    RuntimeInfo,
    Telemetry,
)
from gridserve.types.wire import (
    ChatMessage,
    GenerateRequest,
    HeartbeatPayload,
    Receipt,
    RegisterPayload,
    RegisterReply,
    SamplingParams,
    StreamError,
    StreamEvent,
    TokenEvent,
)

__all__ = [
    "Capability",
    "ChatMessage",
    "GenerateRequest",
    "GpuInfo",
    "HardwareInfo",
    "HeartbeatPayload",
    "LayerRange",
    "ModelOffer",
    "NodeError",
    "NodeId",
    "NodeState",
    "Receipt",
    "RegisterPayload",
    "RegisterReply",
    "RuntimeInfo",
    "SamplingParams",
    "StreamError",
    "StreamEvent",
    "Strict",
    "Telemetry",
    "TokenEvent",
]
