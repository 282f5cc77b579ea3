"""`schedule(request, snapshots, profile, rng, now) -> Decision`.

Filters remove nodes that cannot run the request (each rejection says why); the picker orders the rest.
This is the first scheduler (state + model filters, fewest outstanding requests); the full framework of
named filter/scorer/picker plugins composed by YAML profiles builds on the same signature.
"""

import random
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from gridserve.types import NodeState
from gridserve.types.scheduling import Candidate, Decision, NodeSnapshot, Rejection, ScheduleRequest

SERVING_STATES = frozenset({NodeState.UP, NodeState.SUSPECT})


class Filter(Protocol):
    name: str

    def reject(self, request: ScheduleRequest, node: NodeSnapshot, now: float) -> str | None:
        """Why the node cannot run the request, or None when it can."""
        ...


class Picker(Protocol):
    name: str

    def rank(self, request: ScheduleRequest, nodes: Sequence[NodeSnapshot], rng: random.Random) -> list[Candidate]: ...


class NodeStateFilter:
    name = "node-state"

    def reject(self, request: ScheduleRequest, node: NodeSnapshot, now: float) -> str | None:
        if node.state in SERVING_STATES:
            return None
        return f"node is {node.state.value}"


class ModelServedFilter:
    name = "model-served"

    def reject(self, request: ScheduleRequest, node: NodeSnapshot, now: float) -> str | None:
        offers = {m.name: m for m in node.capability.models}
        offer = offers.get(request.model)
        if offer is None:
            return f"does not serve {request.model} (serves {', '.join(sorted(offers)) or 'nothing'})"
        if request.prompt_tokens + request.max_tokens > offer.max_context:
            return f"needs {request.prompt_tokens + request.max_tokens} tokens of context, serves {offer.max_context}"
        return None


class LeastOutstandingPicker:
    """Fewest in-flight requests first; suspect nodes after healthy ones; ties broken at random."""

    name = "least-outstanding"

    def rank(self, request: ScheduleRequest, nodes: Sequence[NodeSnapshot], rng: random.Random) -> list[Candidate]:
        keyed = [(node.state != NodeState.UP, node.outstanding, rng.random(), node) for node in nodes]
        keyed.sort(key=lambda item: item[:3])
        return [
            Candidate(
                node_id=node.node_id,
                rank=i,
                score=1.0 / (1.0 + node.outstanding) * (0.5 if suspect else 1.0),
                signals={"outstanding": float(node.outstanding), "suspect": float(suspect)},
            )
            for i, (suspect, _, _, node) in enumerate(keyed)
        ]


@dataclass(frozen=True)
class Profile:
    name: str
    filters: tuple[Filter, ...]
    picker: Picker


def default_profile() -> Profile:
    return Profile(name="first", filters=(NodeStateFilter(), ModelServedFilter()), picker=LeastOutstandingPicker())


def _explain(chosen: Candidate | None, ranked: Sequence[Candidate], rejected: Sequence[Rejection]) -> str:
    if chosen is None:
        reasons = "; ".join(f"{r.node_id[:10]}: {r.reason}" for r in rejected[:5])
        return f"no eligible node ({len(rejected)} rejected: {reasons or 'no nodes registered'})"
    outstanding = chosen.signals.get("outstanding", 0.0)
    return (
        f"{chosen.node_id[:10]} had the fewest requests in flight ({outstanding:.0f}) of {len(ranked)} eligible "
        f"node(s); {len(rejected)} rejected"
    )


def schedule(
    request: ScheduleRequest,
    snapshots: Sequence[NodeSnapshot],
    profile: Profile,
    rng: random.Random,
    now: float,
    decision_id: str | None = None,
) -> Decision:
    eligible: list[NodeSnapshot] = []
    rejected: list[Rejection] = []
    for node in snapshots:
        for filt in profile.filters:
            reason = filt.reject(request, node, now)
            if reason is not None:
                rejected.append(Rejection(node_id=node.node_id, filter=filt.name, reason=reason))
                break
        else:
            eligible.append(node)
    ranked = profile.picker.rank(request, eligible, rng)
    chosen = ranked[0] if ranked else None
    return Decision(
        decision_id=decision_id or "dec_" + secrets.token_hex(10),
        request_id=request.request_id,
        model=request.model,
        profile=profile.name,
        created=now,
        chosen=chosen.node_id if chosen else None,
        candidates=tuple(ranked),
        rejections=tuple(rejected),
        explanation=_explain(chosen, ranked, rejected),
    )
