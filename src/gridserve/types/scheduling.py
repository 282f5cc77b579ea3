"""What the scheduler is asked (the request's requirements) and what it answers (a decision with reasons).

These are plain frozen dataclasses rather than pydantic models: a decision over 10,000 nodes builds tens
of thousands of them, and they reach the wire only through `as_dict()`."""

from dataclasses import dataclass, field
from typing import Any

from gridserve.types.node import NodeId


@dataclass(frozen=True, slots=True, kw_only=True)
class ScheduleRequest:
    request_id: str
    model: str
    prompt_tokens: int
    """Estimated prompt length in tokens."""
    max_tokens: int
    tier: str = "standard"
    max_price_per_mtok: float | None = None
    ttft_slo_s: float | None = None
    """Overrides the tier's TTFT target."""
    tpot_slo_s: float | None = None
    engines: tuple[str, ...] | None = None
    """Allowed engine kinds (runtime constraint), e.g. ('openai-upstream',); None = any."""

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass(frozen=True, slots=True)
class Verdict:
    """One node's filter outcome: passed every filter, or the first filter that rejected it and why."""

    node_id: NodeId
    eligible: bool
    filter: str = ""
    reason: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"node_id": self.node_id, "eligible": self.eligible, "filter": self.filter, "reason": self.reason}


@dataclass(frozen=True, slots=True)
class ScoreDetail:
    scorer: str
    raw: float
    unit: str
    normalized: float
    weight: float

    @property
    def contribution(self) -> float:
        return self.normalized * self.weight

    def as_dict(self) -> dict[str, Any]:
        return {
            "scorer": self.scorer,
            "raw": self.raw,
            "unit": self.unit,
            "normalized": round(self.normalized, 6),
            "weight": self.weight,
            "contribution": round(self.contribution, 6),
        }


@dataclass(frozen=True, slots=True)
class Candidate:
    """An eligible node, its rank, its total score and the figures behind it."""

    node_id: NodeId
    rank: int
    score: float
    details: tuple[ScoreDetail, ...]
    predicted_ttft_s: float | None = None
    predicted_itl_s: float | None = None
    price_per_mtok: float | None = None
    calibration: tuple[float, float] = (1.0, 1.0)
    """The node's (TTFT, ITL) calibration factors the prediction used: observed timings are compared with
    predicted / factor, the uncalibrated roofline of that moment."""

    def as_dict(self) -> dict[str, Any]:
        return {
            "node_id": self.node_id,
            "rank": self.rank,
            "score": round(self.score, 6),
            "predicted_ttft_s": self.predicted_ttft_s,
            "predicted_itl_s": self.predicted_itl_s,
            "price_per_mtok": self.price_per_mtok,
            "scores": [d.as_dict() for d in self.details],
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class Decision:
    decision_id: str
    request: ScheduleRequest
    requirements: dict[str, Any]
    profile: str
    created: float
    chosen: NodeId | None
    candidates: tuple[Candidate, ...]
    verdicts: tuple[Verdict, ...]
    explanation: str
    margin: float | None = None
    """Winner's score minus the runner-up's (None with fewer than two candidates)."""
    picked_by: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def model(self) -> str:
        return self.request.model

    @property
    def rejections(self) -> tuple[Verdict, ...]:
        return tuple(v for v in self.verdicts if not v.eligible)

    def candidate(self, node_id: str) -> Candidate | None:
        return next((c for c in self.candidates if c.node_id == node_id), None)

    def as_dict(self) -> dict[str, Any]:
        return {
            "decision_id": self.decision_id,
            "request_id": self.request_id,
            "model": self.model,
            "profile": self.profile,
            "created": self.created,
            "requirements": self.requirements,
            "chosen": self.chosen,
            "margin": self.margin,
            "picked_by": self.picked_by,
            "explanation": self.explanation,
            "candidates": [c.as_dict() for c in self.candidates],
            "rejections": [v.as_dict() for v in self.verdicts if not v.eligible],
            "nodes": [v.as_dict() for v in self.verdicts],
            **self.extra,
        }
