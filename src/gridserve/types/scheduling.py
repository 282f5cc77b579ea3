"""What the scheduler is asked (the request's requirements) and what it answers (a decision with reasons).

These are plain frozen dataclasses rather than pydantic models: a decision over 10,000 nodes builds tens
of thousands of them, and they reach the wire only through `as_dict()`."""

from collections.abc import Callable
from dataclasses import dataclass
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


class Decision:
    """The scheduler's answer. `candidates` and `verdicts` may be given as callables: a decision over
    thousands of nodes then builds its per-node records only when someone reads them (an explanation)."""

    def __init__(
        self,
        *,
        decision_id: str,
        request: ScheduleRequest,
        requirements: dict[str, Any],
        profile: str,
        created: float,
        chosen: NodeId | None,
        candidates: tuple[Candidate, ...] | Callable[[], tuple[Candidate, ...]],
        verdicts: tuple[Verdict, ...] | Callable[[], tuple[Verdict, ...]],
        explanation: str | Callable[[], str],
        margin: float | None = None,
        picked_by: str = "",
        eligible: int | None = None,
        rejected: int | None = None,
        extra: dict[str, Any] | None = None,
        chosen_candidate: Candidate | Callable[[], Candidate | None] | None = None,
        rejected_by_filter: dict[str, int] | Callable[[], dict[str, int]] | None = None,
    ) -> None:
        self.decision_id = decision_id
        self.request = request
        self.requirements = requirements
        self.profile = profile
        self.created = created
        self.chosen = chosen
        self._candidates = candidates
        self._verdicts = verdicts
        self._explanation = explanation
        self.margin = margin
        """Winner's score minus the runner-up's (None with fewer than two candidates)."""
        self.picked_by = picked_by
        self.extra = extra or {}
        self._eligible = eligible
        self._rejected = rejected
        self._chosen_candidate = chosen_candidate
        """The winner's record (or how to build it when first read), kept so that reading it does not build every
        candidate of a large grid."""
        self._rejected_by_filter = rejected_by_filter

    @property
    def rejected_by_filter(self) -> dict[str, int]:
        """How many nodes each filter removed."""
        if callable(self._rejected_by_filter):
            self._rejected_by_filter = self._rejected_by_filter()
        if self._rejected_by_filter is None:
            counts: dict[str, int] = {}
            for v in self.rejections:
                counts[v.filter or "?"] = counts.get(v.filter or "?", 0) + 1
            self._rejected_by_filter = counts
        return self._rejected_by_filter

    def ranked_for_dispatch(self) -> list[Candidate]:
        """The chosen candidate first (the picker may explore below rank 0), then the rest by rank."""
        chosen = self.candidate(self.chosen) if self.chosen is not None else None
        rest = [c for c in self.candidates if chosen is None or c.node_id != chosen.node_id]
        return [chosen, *rest] if chosen is not None else rest

    @property
    def explanation(self) -> str:
        """Why this node, in one line (built when first read: most decisions on a large grid are never explained)."""
        if callable(self._explanation):
            self._explanation = self._explanation()
        return self._explanation

    @explanation.setter
    def explanation(self, text: str) -> None:
        self._explanation = text

    def explain_also(self, text: str) -> None:
        """Append to the explanation without building it now."""
        before = self._explanation
        self._explanation = lambda: (before() if callable(before) else before) + text

    @property
    def candidates(self) -> tuple[Candidate, ...]:
        if callable(self._candidates):
            self._candidates = self._candidates()
        return self._candidates

    @property
    def verdicts(self) -> tuple[Verdict, ...]:
        if callable(self._verdicts):
            self._verdicts = self._verdicts()
        return self._verdicts

    @property
    def eligible_count(self) -> int:
        return self._eligible if self._eligible is not None else len(self.candidates)

    @property
    def rejected_count(self) -> int:
        return self._rejected if self._rejected is not None else len(self.rejections)

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
        if callable(self._chosen_candidate):
            self._chosen_candidate = self._chosen_candidate()
        if self._chosen_candidate is not None and self._chosen_candidate.node_id == node_id:
            return self._chosen_candidate
        return next((c for c in self.candidates if c.node_id == node_id), None)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Decision) and self.as_dict() == other.as_dict()

    __hash__ = None  # type: ignore[assignment]

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
