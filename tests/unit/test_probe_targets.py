"""Which nodes the gateway probes each period (gateway/registry/health.py): all of a small grid; on a large one the
busy and unsettled nodes every period and the idle ones in turn."""

from hypothesis import given, settings
from hypothesis import strategies as st
from tests.conftest import bare_record

from gridserve.gateway.registry.health import probe_targets
from gridserve.gateway.registry.membership import NodeRecord
from gridserve.types import NodeId, NodeState

STATES = [NodeState.UP, NodeState.UP, NodeState.UP, NodeState.SUSPECT, NodeState.DOWN, NodeState.PROBATION]


def record(i: int, state: NodeState, outstanding: int) -> NodeRecord:
    return bare_record(i, state, outstanding=outstanding)


@settings(max_examples=60, deadline=None)
@given(
    nodes=st.lists(st.tuples(st.sampled_from(STATES), st.integers(0, 2)), min_size=1, max_size=300),
    budget=st.integers(1, 64),
)
def test_busy_nodes_every_period_idle_nodes_all_in_turn(nodes: list[tuple[NodeState, int]], budget: int) -> None:
    records = {NodeId(f"n{i}"): record(i, s, o) for i, (s, o) in enumerate(nodes)}
    urgent = {k for k, r in records.items() if r.outstanding > 0 or r.state != NodeState.UP}
    idle = set(records) - urgent
    seen: set[NodeId] = set()
    turn = 0
    rounds = len(idle) // max(1, budget - len(urgent)) + 2 if len(records) > budget else 1
    for _ in range(rounds):
        chosen, turn = probe_targets(records, budget, turn)
        assert len(chosen) == len(set(chosen))
        if len(records) <= budget:
            assert set(chosen) == set(records)  # a small grid: everyone, every period
        else:
            assert urgent <= set(chosen)  # requests in flight or not settled: every period
            assert len(chosen) <= max(budget, len(urgent))
        seen |= set(chosen)
    if len(urgent) < budget or len(records) <= budget:
        assert seen == set(records)  # every idle node is reached in turn


@given(silent=st.lists(st.floats(0.0, 600.0), min_size=1, max_size=50), budget=st.integers(1, 64))
def test_nodes_down_and_silent_past_the_retirement_are_not_probed(silent: list[float], budget: int) -> None:
    now, retire = 10_000.0, 120.0
    records = {
        NodeId(f"n{i}"): bare_record(i, NodeState.DOWN, last_heartbeat=now - quiet) for i, quiet in enumerate(silent)
    }
    records[NodeId(f"n{len(silent)}")] = bare_record(len(silent), NodeState.UP, last_heartbeat=now - 500)
    chosen, _ = probe_targets(records, budget, 0, now, retire)
    expected = {NodeId(f"n{i}") for i, quiet in enumerate(silent) if quiet <= retire}
    assert expected <= set(chosen) and not {NodeId(f"n{i}") for i, q in enumerate(silent) if q > retire} & set(chosen)
