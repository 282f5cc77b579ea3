"""The pipeline doctor's rules (diagnostics/pipeline_doctor.py) on hand-made stage timings."""

from hypothesis import assume, given
from hypothesis import strategies as st

from gridserve.diagnostics.doctor import Cause
from gridserve.diagnostics.pipeline_doctor import StageView, diagnose_pipeline, diagnose_run


def stage(node: str, start: int, end: int, compute_ms: float, transfer_ms: float, steps: int = 10) -> StageView:
    return StageView(node, start, end, steps, compute_ms * steps / 1e3, transfer_ms * steps / 1e3, 3000 * steps, 3000)


def test_compute_bound_balanced_stages_are_healthy() -> None:
    stages = [stage("a", 0, 9, 40, 1), stage("b", 9, 18, 42, 1)]
    d = diagnose_pipeline(stages, 10, 0.86)
    assert d.cause is Cause.HEALTHY and "compute 82.0 ms" in d.evidence[0]


def test_transfer_heavy_steps_are_communication_overhead_naming_the_worst_stage() -> None:
    stages = [stage("a", 0, 9, 20, 2), stage("slowlink", 9, 18, 20, 25)]
    d = diagnose_pipeline(stages, 10, 0.70)
    assert d.cause is Cause.PIPELINE_OVERHEAD
    assert "slowlink" in d.evidence[0] and "25.0 ms per step on transfer" in d.evidence[0]


def test_gateway_time_counts_as_overhead_too() -> None:
    stages = [stage("a", 0, 9, 20, 1), stage("b", 9, 18, 20, 1)]
    d = diagnose_pipeline(stages, 10, 0.80)  # 80 ms per step, 42 of them on the stages
    assert d.cause is Cause.PIPELINE_OVERHEAD and "gateway 38.0 ms" in d.evidence[1]


def test_a_stage_slow_per_layer_is_named() -> None:
    stages = [stage("fast", 0, 12, 24, 1), stage("busy", 12, 18, 30, 1)]  # 2 ms/layer vs 5 ms/layer
    d = diagnose_pipeline(stages, 10, 0.57)
    assert d.cause is Cause.COMPUTE_SATURATION and "busy" in d.evidence[0] and "2.5x" in d.evidence[0]


def test_nothing_to_examine() -> None:
    assert diagnose_pipeline([], 0, 0.0).cause is Cause.HEALTHY
    assert diagnose_run({"stages": [], "steps": 0, "forward_s": 0}).cause is Cause.HEALTHY


@given(
    compute=st.lists(st.floats(0.001, 1.0), min_size=1, max_size=5),
    transfer=st.floats(0.0, 1.0),
    extra=st.floats(0.0, 1.0),
)
def test_the_split_adds_up_and_overhead_follows_its_share(compute: list[float], transfer: float, extra: float) -> None:
    stages = [StageView(f"n{i}", i, i + 1, 1, c, transfer / len(compute), 10, 10) for i, c in enumerate(compute)]
    forward = sum(compute) + transfer + extra
    d = diagnose_pipeline(stages, 1, forward)
    share = (transfer + extra) / forward
    assume(abs(share - 0.30) > 1e-9)  # (float rounding at the threshold itself)
    overhead = share >= 0.30
    assert (d.cause is Cause.PIPELINE_OVERHEAD) == overhead
