"""Choosing a chain of stage nodes (gateway/pipeline/session.py plan_chain) equals the brute-force optimum."""

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gridserve.planner.chain import NoChain, StageRoute, plan_chain


@st.composite
def pools(draw: st.DrawFn) -> tuple[int, list[StageRoute]]:
    n = draw(st.integers(2, 8))
    routes = []
    for i in range(draw(st.integers(1, 9))):
        start = draw(st.integers(0, n - 1))
        end = draw(st.integers(start + 1, n))
        cost = draw(st.sampled_from([0.5, 1.0, 1.5, 2.0, 3.0]))
        routes.append(StageRoute(f"n{i}", "http://x", "k", start, end, n, cost))
    return n, routes


def brute(n: int, routes: list[StageRoute], avoid: frozenset[str]) -> float | None:
    """The cheapest of every chain of distinct usable routes from layer 0 to n, each starting where the last
    ended: all of them enumerated (a depth-first walk that extends only chains still contiguous, instead of
    testing every permutation of the routes: the same chains, without 9! orderings per example)."""
    usable = [r for r in routes if r.node_id not in avoid]
    costs: list[float] = []

    def extend(at: int, used: frozenset[int], cost: float) -> None:
        if at == n:
            costs.append(cost)
        for i, r in enumerate(usable):
            if i not in used and r.start == at:
                extend(r.end, used | {i}, cost + r.cost)

    extend(0, frozenset(), 0.0)
    return min(costs, default=None)


@given(pool=pools(), data=st.data())
@settings(max_examples=300, deadline=None)
def test_plan_chain_is_the_cheapest_exact_cover(pool: tuple[int, list[StageRoute]], data: st.DataObject) -> None:
    n, routes = pool
    avoid = frozenset(data.draw(st.sets(st.sampled_from([r.node_id for r in routes]), max_size=2)))
    expected = brute(n, routes, avoid)
    if expected is None:
        with pytest.raises(NoChain):
            plan_chain(routes, n, avoid=avoid)
        return
    chain = plan_chain(routes, n, avoid=avoid)
    assert chain[0].start == 0 and chain[-1].end == n
    assert all(a.end == b.start for a, b in itertools.pairwise(chain))
    assert not {r.node_id for r in chain} & avoid
    assert sum(r.cost for r in chain) == pytest.approx(expected)


def test_a_sub_span_can_be_replanned_onto_a_split() -> None:
    """A dead [0, 4) stage can be replaced by [0, 2) + [2, 4) when no single node holds it."""
    routes = [
        StageRoute("dead", "http://x", "k", 0, 4, 6, 1.0),
        StageRoute("a", "http://x", "k", 0, 2, 6, 1.0),
        StageRoute("b", "http://x", "k", 2, 4, 6, 1.0),
        StageRoute("c", "http://x", "k", 4, 6, 6, 1.0),
    ]
    chain = plan_chain(routes, 6, start=0, end=4, avoid=frozenset({"dead"}))
    assert [r.node_id for r in chain] == ["a", "b"]
