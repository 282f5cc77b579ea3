"""What the scheduler reads (snapshots, the request) and what it returns (a decision with its reasons)."""

from pydantic import Field

from gridserve.types.base import Strict
from gridserve.types.node import Capability, NodeId, NodeState, Telemetry


class NodeSnapshot(Strict):
    """A node as the scheduler sees it at one instant."""

    node_id: NodeId
    state: NodeState
    capability: Capability
    telemetry: Telemetry | None = None
    last_heartbeat: float
    outstanding: int = Field(0, description="requests the gateway has in flight on this node")


class ScheduleRequest(Strict):
    request_id: str
    model: str
    prompt_tokens: int = Field(description="estimated prompt length in tokens")
    max_tokens: int


class Rejection(Strict):
    node_id: NodeId
    filter: str
    reason: str


class Candidate(Strict):
    """An eligible node, its rank and the figures behind it."""

    node_id: NodeId
    rank: int
    score: float
    signals: dict[str, float] = Field(default_factory=dict)


class Decision(Strict):
    decision_id: str
    request_id: str
    model: str
    profile: str
    created: float
    chosen: NodeId | None
    candidates: tuple[Candidate, ...]
    rejections: tuple[Rejection, ...]
    explanation: str
