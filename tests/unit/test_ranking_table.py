"""The partial ranking equals a full sort; a SnapshotTable kept by puts and removes decides as a fresh list."""

import random

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from gridserve.catalog import model_spec
from gridserve.scheduler import default_profile, schedule
from gridserve.scheduler.ranking import HEAD, Order
from gridserve.scheduler.table import SnapshotTable
from gridserve.sim.grid import SimConfig, build_nodes
from gridserve.types.scheduling import ScheduleRequest

NOW = 1_700_000_000.0


@settings(max_examples=300, deadline=None)
@given(
    totals=st.lists(st.sampled_from([0.1, 0.2, 0.5, 0.5, 0.7, 0.9]), min_size=0, max_size=80),
    seed=st.integers(0, 2**31),
    start=st.integers(0, 10),
)
def test_order_is_the_full_sort_and_first_where_finds_the_best(totals: list[float], seed: int, start: int) -> None:
    rng = np.random.default_rng(seed)
    n = len(totals)
    total = np.array(totals, dtype=float)
    eligible = np.flatnonzero(rng.random(n) < 0.8)
    ties = rng.random(len(eligible))
    order = Order(eligible, total, ties)
    tie_of = dict(zip(eligible.tolist(), ties.tolist(), strict=True))
    expected = sorted(eligible.tolist(), key=lambda j: (-total[j], tie_of[j]))
    assert [order[r] for r in range(len(order))] == expected
    assert order.head.tolist() == expected[:HEAD]
    mask = rng.random(n) < 0.3
    want = next((r for r, j in enumerate(expected) if r >= start and mask[j]), None)
    assert order.first_where(mask, start) == want


def test_a_table_kept_by_puts_and_removes_decides_as_a_fresh_snapshot_list() -> None:
    config = SimConfig(nodes=60, seed=3)
    nodes = build_nodes(config, model_spec(config.model), random.Random(3))
    for n in nodes:
        n.heartbeat_at = NOW
    table = SnapshotTable([n.snapshot() for n in nodes])
    rng = random.Random(0)
    for step in range(40):
        node = rng.choice(nodes)
        node.active = rng.randint(0, 12)
        if step % 7 == 3:
            table.remove(node.node_id)
        else:
            table.put(node.snapshot())
        request = ScheduleRequest(
            request_id=f"r{step}", model=config.model, prompt_tokens=rng.randint(10, 3000), max_tokens=200
        )
        fresh = list(table)
        a = schedule(request, table, default_profile(), random.Random(step), NOW, decision_id="d")
        b = schedule(request, fresh, default_profile(), random.Random(step), NOW, decision_id="d")
        assert a.chosen == b.chosen
        assert [c.node_id for c in a.candidates] == [c.node_id for c in b.candidates]
        assert [c.score for c in a.candidates] == [c.score for c in b.candidates]
    assert len(table) == len({s.node_id for s in table})
