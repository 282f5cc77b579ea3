"""Messages between gateway and node."""

from typing import Literal

from pydantic import Field

from gridserve.types.base import Strict
from gridserve.types.node import Capability, NodeId, Telemetry


class SamplingParams(Strict):
    """Sampling parameters. temperature == 0 means greedy. With a seed, sampling is deterministic."""

    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = None
    stop: tuple[str, ...] = ()


class ChatMessage(Strict):
    role: str
    content: str


class GenerateRequest(Strict):
    """What the gateway asks a node to run. Exactly one of `prompt` and `messages` is set."""

    request_id: str
    model: str
    prompt: str | None = None
    messages: tuple[ChatMessage, ...] | None = None
    sampling: SamplingParams


class TokenEvent(Strict):
    """One streamed piece of output; the last event has `finish_reason` and the counts."""

    text: str = ""
    token_ids: tuple[int, ...] = ()
    finish_reason: Literal["stop", "length"] | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


class RegisterPayload(Strict):
    capability: Capability


class RegisterReply(Strict):
    gateway_public_key: str
    heartbeat_interval_s: float


class HeartbeatPayload(Strict):
    node_id: NodeId
    seq: int
    telemetry: Telemetry
