"""Choosing a chain of stage nodes that covers a model's layers (pure: the gateway runs it in
gateway/pipeline/session.py).

Stage nodes hold fixed layer ranges; a chain is a sequence of them meeting at their boundaries. The cheapest
one is a shortest path over layer boundaries, each route costing what it adds to a decode step.
"""

from collections.abc import Sequence
from dataclasses import dataclass


class NoChain(Exception):
    """No chain of live stage nodes covers the model's layers."""


@dataclass(frozen=True)
class StageRoute:
    """A live node that runs layers `[start, end)` of a model."""

    node_id: str
    endpoint: str
    public_key: str
    start: int
    end: int
    n_layers: int
    cost: float = 1.0
    """Lower is better (a chain minimises the sum): e.g. the predicted step time plus the hop's RTT."""


def plan_chain(
    routes: Sequence[StageRoute],
    n_layers: int,
    *,
    start: int = 0,
    end: int | None = None,
    avoid: frozenset[str] = frozenset(),
) -> list[StageRoute]:
    """The cheapest chain of routes covering `[start, end)` exactly (stages meet at their boundaries): a
    shortest path over layer boundaries; ties go to fewer stages. Raises NoChain."""
    end = n_layers if end is None else end
    best: dict[int, tuple[float, int, list[StageRoute]]] = {start: (0.0, 0, [])}
    usable = sorted(
        (r for r in routes if r.node_id not in avoid and start <= r.start < r.end <= end), key=lambda r: r.start
    )
    for route in usable:  # boundaries only grow along a chain: one pass in start order is a DAG relaxation
        here = best.get(route.start)
        if here is None:
            continue
        cost, hops, chain = here
        candidate = (cost + route.cost, hops + 1, [*chain, route])
        there = best.get(route.end)
        if there is None or candidate[:2] < there[:2]:
            best[route.end] = candidate
    if end not in best:
        raise NoChain(f"no chain of live stage nodes covers layers [{start}, {end})")
    return best[end][2]
