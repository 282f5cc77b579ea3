"""What the scheduler is asked (the request's requirements) and what it answers (a decision with reasons).

These are plain frozen dataclasses rather than pydantic models: a decision over 10,000 nodes builds tens
of thousands of them, and they reach the wire only through `as_dict()`."""

from collections.abc import Iterator, Mapping
from dataclasses import FrozenInstanceError, dataclass
from functools import cached_property
from types import MappingProxyType
from typing import Any, Protocol

from gridserve.types.node import NodeId, Task


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
    features: tuple[str, ...] = ()
    """Request features the node must offer for the model (runtime constraint: ModelOffer.features)."""
    cached_tokens: tuple[tuple[str, int], ...] = ()
    """(node id, prompt tokens it probably holds in its prefix cache), from the caller's prefix index; a node not
    named holds none of this prompt. Prefill is predicted on the rest, and a sampled decision always includes
    these nodes."""
    task: Task = "generate"
    """What the request asks of the model (a capability of its own: ModelOffer.tasks); an `embed` request has
    max_tokens 0 and prompt_tokens of its longest input."""

    def reused_by(self, node_id: str) -> int:
        """Prompt tokens `node_id` probably holds (0 when not named)."""
        return next((n for node, n in self.cached_tokens if node == node_id), 0)

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
    cached_tokens: int = 0
    """Prompt tokens the node probably holds in its prefix cache (its prediction prefills only the rest)."""
    prefill_saved_s: float | None = None
    """Predicted prefill time those cached tokens save on this node's hardware."""
    prefill_s_per_token: float | None = None
    """Uncalibrated prefill seconds a prompt token on this node (its roofline: prefill is linear in tokens)."""
    predicted_queue_s: float | None = None
    """The part of `predicted_ttft_s` spent waiting for a batch slot behind the node's other requests."""
    predicted_load_s: float = 0.0
    """The part of `predicted_ttft_s` spent loading weights that are not resident."""
    step_s: float | None = None
    """On an interleaved node (`Capability.interleaved`): the longest a stream may wait between two of its tokens
    while the node works, one chunk of another prompt's prefill (its advertised prefix block) and its own decode
    step; the stall timeout allows for it (a token late behind a prefill is not a stalled node). None: batched."""
    cold: bool = False
    """The node does not hold the model and would load it first: its engine starts as well as the weights move,
    which the first-token timeout allows for (DispatchPolicy.cold_start_s)."""

    @property
    def raw_service_ttft_s(self) -> float | None:
        """The uncalibrated TTFT the node itself is answerable for: the prediction less the queue wait and the
        weights' load, divided by the calibration it used (None: no prediction)."""
        if self.predicted_ttft_s is None:
            return None
        service = self.predicted_ttft_s - (self.predicted_queue_s or 0.0) - self.predicted_load_s
        return max(0.0, service) / self.calibration[0]

    def as_dict(self) -> dict[str, Any]:
        out = {
            "node_id": self.node_id,
            "rank": self.rank,
            "score": round(self.score, 6),
            "predicted_ttft_s": self.predicted_ttft_s,
            "predicted_itl_s": self.predicted_itl_s,
            "price_per_mtok": self.price_per_mtok,
            "scores": [d.as_dict() for d in self.details],
        }
        if self.predicted_queue_s:
            out["predicted_queue_s"] = self.predicted_queue_s
        if self.cold:
            out["cold"] = True
        if self.cached_tokens:
            out["cached_tokens"] = self.cached_tokens
            out["prefill_saved_s"] = self.prefill_saved_s
        return out


class Evidence(Protocol):
    """Where a decision's per-node records come from when first read: the scheduler's columns (a decision over
    thousands of nodes is rarely explained, so its candidates, verdicts and explanation are built on demand)."""

    def candidates(self) -> tuple[Candidate, ...]:
        """Every eligible node, best first."""
        ...

    def ranked(self) -> Iterator[Candidate]:
        """The eligible nodes best first, each built as it is read (a reader that stops early builds no more)."""
        ...

    def chosen_candidate(self) -> Candidate | None:
        """The winner's record alone (reading it must not build every candidate of a large grid)."""
        ...

    def verdicts(self) -> tuple[Verdict, ...]:
        """Every node's filter outcome, in pool order."""
        ...

    def rejected_by_filter(self) -> dict[str, int]:
        """How many nodes each filter removed."""
        ...

    def explanation(self) -> str:
        """Why this node, in one line."""
        ...


@dataclass(frozen=True, slots=True)
class Settled:
    """Evidence given as values: a decision built by hand (tests, tools), or one small enough to build at once."""

    candidates_: tuple[Candidate, ...] = ()
    verdicts_: tuple[Verdict, ...] = ()
    explanation_: str = ""
    chosen: NodeId | None = None

    def candidates(self) -> tuple[Candidate, ...]:
        return self.candidates_

    def ranked(self) -> Iterator[Candidate]:
        return iter(self.candidates_)

    def chosen_candidate(self) -> Candidate | None:
        return next((c for c in self.candidates_ if c.node_id == self.chosen), None)

    def verdicts(self) -> tuple[Verdict, ...]:
        return self.verdicts_

    def rejected_by_filter(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for v in self.verdicts_:
            if not v.eligible:
                counts[v.filter or "?"] = counts.get(v.filter or "?", 0) + 1
        return counts

    def explanation(self) -> str:
        return self.explanation_


class Decision:
    """The scheduler's answer: frozen once made. The per-node parts (candidates, verdicts, the explanation) are
    cached properties computed from `evidence` on first read, so a decision over a large grid costs only what
    its reader asks for, and no field is ever a value-or-thunk or assigned after the decision is returned."""

    decision_id: str
    request: ScheduleRequest
    requirements: dict[str, Any]
    """What the request needs, as the scheduler read it (model, tier, SLOs, limits). Read-only."""
    profile: str
    created: float
    chosen: NodeId | None
    margin: float | None
    """Winner's score minus the runner-up's (None with fewer than two candidates)."""
    picked_by: str
    eligible_count: int
    rejected_count: int
    sampled: tuple[int, int] | None
    """(nodes considered, pool size) when the decision was made over a random sample of the pool."""
    evidence: Evidence

    def __init__(
        self,
        *,
        decision_id: str,
        request: ScheduleRequest,
        requirements: dict[str, Any],
        profile: str,
        created: float,
        chosen: NodeId | None,
        candidates: tuple[Candidate, ...] = (),
        verdicts: tuple[Verdict, ...] = (),
        explanation: str = "",
        margin: float | None = None,
        picked_by: str = "",
        eligible: int | None = None,
        rejected: int | None = None,
        sampled: tuple[int, int] | None = None,
        evidence: Evidence | None = None,
    ) -> None:
        """Either `evidence` (with the `eligible` and `rejected` counts), or the parts as values."""
        if evidence is None:
            evidence = Settled(candidates, verdicts, explanation, chosen)
            eligible = len(candidates) if eligible is None else eligible
            rejected = sum(not v.eligible for v in verdicts) if rejected is None else rejected
        elif eligible is None or rejected is None:
            raise TypeError("a decision made from evidence needs its eligible and rejected counts")
        fields = {
            "decision_id": decision_id,
            "request": request,
            "requirements": requirements,
            "profile": profile,
            "created": created,
            "chosen": chosen,
            "margin": margin,
            "picked_by": picked_by,
            "eligible_count": eligible,
            "rejected_count": rejected,
            "sampled": sampled,
            "evidence": evidence,
        }
        for name, value in fields.items():
            object.__setattr__(self, name, value)

    def __setattr__(self, name: str, value: Any) -> None:
        raise FrozenInstanceError(f"cannot assign to field {name!r}: a Decision is frozen")

    def __delattr__(self, name: str) -> None:
        raise FrozenInstanceError(f"cannot delete field {name!r}: a Decision is frozen")

    @cached_property
    def explanation(self) -> str:
        """Why this node, in one line."""
        text = self.evidence.explanation()
        if self.sampled is not None:
            text += f"; over a random sample of {self.sampled[0]} of {self.sampled[1]} nodes"
        return text

    @cached_property
    def candidates(self) -> tuple[Candidate, ...]:
        return self.evidence.candidates()

    @cached_property
    def verdicts(self) -> tuple[Verdict, ...]:
        return self.evidence.verdicts()

    @cached_property
    def rejected_by_filter(self) -> Mapping[str, int]:
        """How many nodes each filter removed."""
        return MappingProxyType(self.evidence.rejected_by_filter())

    @cached_property
    def chosen_candidate(self) -> Candidate | None:
        """The winner's record, without building every candidate."""
        return self.evidence.chosen_candidate() if self.chosen is not None else None

    @property
    def rejections(self) -> tuple[Verdict, ...]:
        return tuple(v for v in self.verdicts if not v.eligible)

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def model(self) -> str:
        return self.request.model

    def candidate(self, node_id: str) -> Candidate | None:
        """The node's record (built down the ranking only as far as the node)."""
        chosen = self.chosen_candidate
        if chosen is not None and chosen.node_id == node_id:
            return chosen
        return next((c for c in self.evidence.ranked() if c.node_id == node_id), None)

    def ranked_for_dispatch(self) -> Iterator[Candidate]:
        """The chosen candidate first (the picker may explore below rank 0), then the rest by rank, each built as
        it is read: dispatch reads a few (building all of a 256-node sample took longer than the decision)."""
        chosen = self.chosen_candidate if self.chosen is not None else None
        if chosen is not None:
            yield chosen
        for candidate in self.evidence.ranked():
            if chosen is None or candidate.node_id != chosen.node_id:
                yield candidate

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Decision) and self.as_dict() == other.as_dict()

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Decision({self.decision_id!r}, chosen={self.chosen!r}, profile={self.profile!r})"

    def as_dict(self) -> dict[str, Any]:
        out = {
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
        }
        if self.sampled is not None:
            out["sampled"] = {"considered": self.sampled[0], "pool": self.sampled[1]}
        return out
