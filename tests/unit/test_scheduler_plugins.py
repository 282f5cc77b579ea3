"""The scheduler's seams: a plugin added in one file works in a profile, a decision is frozen and explains itself
from what it was made of, and `schedule()` is a function of its arguments and of its Scheduler."""

import dataclasses
import random
import threading
from dataclasses import dataclass

import numpy as np
import pytest
from tests.unit.test_scheduler import DEFAULT_DOC, NOW, Spec, Tele, build, grid, request

from gridserve.scheduler import (
    FILTERS,
    SCORERS,
    Scheduler,
    default_profile,
    fused,
    profile_from_dict,
    schedule,
)
from gridserve.scheduler.context import Context
from gridserve.scheduler.plugins import OneRow, register
from gridserve.scheduler.snapshot import C_TEMP, NodeSnapshot
from gridserve.scheduler.table import SnapshotTable
from gridserve.scheduler.vector import Array, Columns, Mask
from gridserve.types import NodeState
from gridserve.types.scheduling import Decision

# -- a filter and a scorer added by this file alone ------------------------------------------------------------------


@register(FILTERS, "test-max-temperature")
@dataclass
class MaxTemperatureFilter(OneRow):
    """Rejects nodes running hotter than a limit (an operator's rule, say)."""

    limit_c: float = 80.0
    name: str = "test-max-temperature"

    def mask(self, ctx: Context, cols: Columns) -> Mask:
        return np.asarray(cols.col(C_TEMP) > self.limit_c)  # NaN (no figure) compares False: kept

    def reason(self, ctx: Context, cols: Columns, j: int) -> str:
        return f"runs at {cols.col(C_TEMP)[j]:.0f} C, limit {self.limit_c:.0f} C"


@register(SCORERS, "test-cool")
@dataclass
class CoolScorer:
    """Cooler is better: 1 at 0 C, 0 at 100 C and above (0.5 without a figure)."""

    name: str = "test-cool"

    def unit_for(self, node: NodeSnapshot, raw: float) -> str:
        return "C (no figure)" if np.isnan(raw) else "C"

    def score(self, ctx: Context, cols: Columns) -> tuple[Array, Array]:
        temp = cols.col(C_TEMP)
        return np.where(np.isnan(temp), 0.5, np.clip(1.0 - temp / 100.0, 0.0, 1.0)), temp


def with_plugins() -> dict[str, object]:
    """The default profile's document, plus the new filter (args from YAML) and the new scorer."""
    return {
        **DEFAULT_DOC,
        "name": "cool",
        "filters": [*DEFAULT_DOC["filters"], {"type": "test-max-temperature", "args": {"limit_c": 70}}],
        "scorers": [{"type": "test-cool", "weight": 1.0}],
        "picker": {"type": "max-score", "args": {"exploration": 0.0}},
    }


HOT, WARM, COOL = (Spec(telemetry=Tele(temperature_c=t)) for t in (85.0, 60.0, 40.0))


def test_a_filter_and_a_scorer_registered_in_one_file_work_in_a_profile() -> None:
    profile = profile_from_dict(with_plugins())
    nodes = [build(HOT, "hot"), build(WARM, "warm"), build(COOL, "cool")]
    decision = schedule(request(), nodes, profile, random.Random(0), NOW, decision_id="d")
    assert decision.chosen == "cool"
    assert [c.node_id for c in decision.candidates] == ["cool", "warm"]
    hot = next(v for v in decision.verdicts if v.node_id == "hot")
    assert (hot.eligible, hot.filter, hot.reason) == (False, "test-max-temperature", "runs at 85 C, limit 70 C")
    assert decision.rejected_by_filter == {"test-max-temperature": 1}
    detail = decision.candidates[0].details[0]
    assert (detail.scorer, detail.raw, detail.unit, detail.normalized) == ("test-cool", 40.0, "C", pytest.approx(0.6))
    # The single-node check is the same code over one row.
    ctx = Context.build(request(), NOW)
    assert MaxTemperatureFilter(limit_c=70).reject(ctx, nodes[0]) == "runs at 85 C, limit 70 C"
    assert MaxTemperatureFilter(limit_c=70).reject(ctx, nodes[2]) is None


def test_a_compiled_scheduler_decides_a_profile_with_new_plugins_on_the_column_path() -> None:
    """The kernel knows the stock plugins only: a new one needs no change there, its profile takes the columns."""
    profile = profile_from_dict(with_plugins())
    assert fused.plan_of(profile) is None
    scheduler = Scheduler(profile, compiled=True)
    assert not scheduler.compiled  # nothing to compile for this profile
    nodes = grid([HOT, WARM, COOL] * 10)
    decided = scheduler.schedule(request(), nodes, random.Random(3), NOW, decision_id="d")
    assert decided == schedule(request(), nodes, profile, random.Random(3), NOW, decision_id="d")
    assert decided.chosen is not None and int(decided.chosen.split("-")[1]) % 3 == 2  # a COOL one


# -- a frozen decision, explained from what it was made of ------------------------------------------------------


def test_a_decision_is_frozen_and_builds_its_parts_once_on_first_read() -> None:
    decision = schedule(request(), grid([WARM, COOL, HOT]), default_profile(), random.Random(0), NOW)
    with pytest.raises(dataclasses.FrozenInstanceError):
        decision.chosen = "someone else"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        del decision.explanation
    assert "explanation" not in vars(decision)  # not built until read
    first = decision.explanation
    assert decision.explanation is first and decision.candidates is decision.candidates
    assert decision.candidate(decision.candidates[1].node_id) is decision.candidates[1]


def test_a_decision_over_a_table_reads_the_table_as_it_was() -> None:
    """Explained later, a decision shows the figures it was made from, not the table's since."""
    nodes = grid([Spec(heartbeat_age_s=30.0), WARM, COOL, WARM])
    table = SnapshotTable(nodes)
    decision = schedule(request(), table, default_profile(), random.Random(1), NOW, decision_id="d")
    before = schedule(request(), list(nodes), default_profile(), random.Random(1), NOW, decision_id="d")
    for node in nodes:  # then every node heartbeats, goes down, one leaves (its row is reused), and it is read
        table.put(dataclasses.replace(node, last_heartbeat=NOW, state=NodeState.DOWN))
    table.remove(nodes[0].node_id)
    assert decision.verdicts[0].reason == "telemetry is 30.0 s old (limit 10 s)"
    assert decision.as_dict() == before.as_dict()


def test_a_decision_built_by_hand_holds_its_parts_as_values() -> None:
    decision = schedule(request(), grid([COOL]), default_profile(), random.Random(0), NOW, decision_id="d")
    copy = Decision(
        decision_id="d",
        request=decision.request,
        requirements=decision.requirements,
        profile=decision.profile,
        created=decision.created,
        chosen=decision.chosen,
        candidates=decision.candidates,
        verdicts=decision.verdicts,
        explanation=decision.explanation,
        margin=decision.margin,
        picked_by=decision.picked_by,
    )
    assert copy == decision
    assert (copy.eligible_count, copy.rejected_count) == (1, 0)
    assert copy.chosen_candidate == decision.candidates[0]


def test_a_sampled_decision_says_so_in_its_explanation_and_record() -> None:
    profile = dataclasses.replace(default_profile(), sample=4)
    decision = schedule(request(), grid([COOL] * 10), profile, random.Random(0), NOW, decision_id="d")
    assert decision.sampled is not None and decision.sampled[1] == 10
    assert decision.explanation.endswith(f"over a random sample of {decision.sampled[0]} of 10 nodes")
    assert decision.as_dict()["sampled"] == {"considered": decision.sampled[0], "pool": 10}


# -- schedule() is a function of its arguments and its Scheduler ------------------------------------------------


def test_schedule_starts_no_thread_and_compiles_nothing() -> None:
    scheduler = Scheduler(default_profile())
    threads = threading.active_count()
    nodes = grid([WARM, COOL] * 30)
    scheduler.schedule(request(), nodes, random.Random(0), NOW)
    schedule(request(), nodes, default_profile(), random.Random(0), NOW)
    assert threading.active_count() == threads
    assert not scheduler.compiled


def test_a_scheduler_continues_an_rngs_draws_and_the_function_starts_them_afresh() -> None:
    """One Scheduler, one rng: the numpy draws go on from decision to decision (the simulator's stream). The
    module function seeds a generator from the rng every time: the same arguments, the same decision."""
    profile = profile_from_dict({**DEFAULT_DOC, "picker": "random"})
    nodes = grid([COOL] * 40)
    ids = [f"{i}" for i in range(20)]

    def run(decide: object) -> list[str | None]:
        rng = random.Random(5)
        return [decide(rng, i).chosen for i in ids]  # type: ignore[operator]

    scheduler = Scheduler(profile)
    held = run(lambda rng, i: scheduler.schedule(request(), nodes, rng, NOW, decision_id=i))
    again = Scheduler(profile)
    assert run(lambda rng, i: again.schedule(request(), nodes, rng, NOW, decision_id=i)) == held
    one_off = run(lambda rng, i: schedule(request(), nodes, profile, rng, NOW, decision_id=i))
    assert run(lambda rng, i: schedule(request(), nodes, profile, rng, NOW, decision_id=i)) == one_off
    assert one_off != held  # each one-off decision drew its generator's seed from the rng
