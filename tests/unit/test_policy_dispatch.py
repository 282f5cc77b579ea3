"""One dispatch policy (gridserve/policy/) for the gateway and the simulator: the gateway's config hands its
fields to the policy, the simulator's defaults are the gateway's, the rules bound the hedge delay and the stall
timeout as documented, and the gateway and the simulator hedge and declare stalls at the same times for the same
prediction."""

import math
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st
from tests.unit.dispatch_support import Grid, store_writer

from gridserve.gateway.config import GatewayConfig
from gridserve.policy import AuditRates, DispatchPolicy, HealthTiming
from gridserve.scheduler import default_profile
from gridserve.sim.engine import EPOCH, SimConfig, Simulation, _Attempt, _Job
from gridserve.sim.trace import TraceRequest
from gridserve.store import StoreWriter
from gridserve.types import NodeId, NodeState
from gridserve.types.scheduling import Candidate

POLICY = DispatchPolicy()
seconds = st.floats(0.0, 1_000.0, allow_nan=False)
ratios = st.floats(0.01, 100.0, allow_nan=False)


def test_the_gateways_defaults_are_the_policys() -> None:
    config = GatewayConfig()
    assert (config.dispatch, config.health, config.audit) == (DispatchPolicy(), HealthTiming(), AuditRates())


def test_the_gateways_settings_reach_the_policy() -> None:
    config = GatewayConfig(
        hedging=False, hedge_min_s=0.2, first_token_timeout_s=5.0, stall_min_s=2.0, max_failovers=1, dispatch_attempts=2
    )
    policy = config.dispatch
    assert (policy.hedging, policy.hedge_min_s, policy.first_token_timeout_s) == (False, 0.2, 5.0)
    assert (policy.stall_min_s, policy.max_failovers, policy.dispatch_attempts) == (2.0, 1, 2)


def test_the_simulators_defaults_are_the_gateways() -> None:
    sim, gateway = SimConfig(), GatewayConfig()
    assert sim.dispatch == gateway.dispatch
    assert sim.heartbeat_s == gateway.heartbeat_interval_s
    assert sim.detect_s == gateway.heartbeat_interval_s + gateway.probe_interval_s
    assert sim.probation_s == gateway.probe_interval_s * gateway.probation_probes
    assert (sim.audit_rate, sim.audit_new_rate, sim.audit_floor) == (
        gateway.audit_rate,
        gateway.audit_new_rate,
        gateway.audit_floor,
    )


@given(seconds)
def test_before_a_node_has_observed_ratios_the_hedge_delay_is_twice_its_prediction(predicted: float) -> None:
    delay = POLICY.hedge_delay(predicted, 1.0, None)
    # (the simulator's rule before the policy existed: its outcomes are unchanged)
    assert delay == max(POLICY.hedge_min_s, 2.0 * predicted)


@given(seconds, ratios, st.one_of(st.none(), ratios))
def test_the_hedge_delay_stays_between_its_floor_and_the_first_token_timeout(
    predicted: float, calibration: float, p95: float | None
) -> None:
    delay = POLICY.hedge_delay(predicted, calibration, p95)
    assert POLICY.hedge_min_s <= delay <= POLICY.first_token_timeout(predicted)
    if p95 is not None:
        assert delay == min(
            max(predicted / calibration * p95, POLICY.hedge_min_s), POLICY.first_token_timeout(predicted)
        )


def test_the_first_token_timeout_grows_with_the_prediction() -> None:
    assert POLICY.first_token_timeout(None) == POLICY.first_token_timeout(0.5) == POLICY.first_token_timeout_s
    assert POLICY.first_token_timeout(3.0) == 30.0


def test_a_node_that_must_load_the_model_first_gets_longer_for_its_first_token() -> None:
    """The prediction counts the weights' move, not the engine's start (CI: a lazy CPU node's torch engine took
    over 10 s to start, and the request failed though nothing else could serve it)."""
    assert POLICY.first_token_timeout(None, cold=True) == POLICY.first_token_timeout_s + POLICY.cold_start_s
    assert POLICY.first_token_timeout(3.0, cold=True) == 30.0 + POLICY.cold_start_s


@given(st.one_of(st.none(), st.floats(0.0, 10.0, allow_nan=False)))
def test_the_stall_timeout(itl: float | None) -> None:
    stall = POLICY.stall_timeout(itl)
    if itl is None:
        assert stall == POLICY.stall_unpredicted_s
    else:
        assert stall == max(POLICY.stall_min_s, POLICY.stall_itl_multiple * itl)
    assert POLICY.stall_timeout(itl, resumable=False) == max(stall, POLICY.stall_unresumable_s)
    assert POLICY.stall_timeout(itl, takeover=False) == max(stall, POLICY.stall_unresumable_s)
    assert POLICY.stall_timeout(itl, resumable=True, takeover=True) == stall


def test_failovers_are_allowed_up_to_max_failovers() -> None:
    allowed = [n for n in range(10) if POLICY.may_fail_over(n)]
    assert len(allowed) == POLICY.max_failovers and allowed == list(range(POLICY.max_failovers))


# -- the gateway and the simulator, side by side ---------------------------------------------------------------


@pytest.fixture(scope="module")
def writer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StoreWriter]:
    yield from store_writer(tmp_path_factory.mktemp("store"))


def _simulation() -> Simulation:
    return Simulation(SimConfig(nodes=2, churn=False, thermal_per_hour=0.0), default_profile())


PREDICTIONS = [(0.0, 0.0), (0.004, 0.0005), (0.2, 0.03), (0.8, 0.15), (3.0, 1.2)]


@pytest.mark.parametrize(("ttft", "itl"), PREDICTIONS)
def test_the_gateway_and_the_simulator_time_hedges_and_stalls_alike(
    writer: StoreWriter, ttft: float, itl: float
) -> None:
    grid, sim = Grid(writer, nodes=1, config=GatewayConfig()), _simulation()
    candidate = Candidate(
        node_id=NodeId("n1"),
        rank=0,
        score=1.0,
        details=(),
        predicted_ttft_s=ttft,
        predicted_itl_s=itl,
        calibration=(1.7, 0.8),
    )
    assert grid.dispatcher.hedge_delay(candidate) == sim.hedge_delay(ttft)  # a node without observed ratios
    assert grid.dispatcher.stall_timeout(candidate) == sim.stall_timeout(itl)
    assert grid.dispatcher.first_token_timeout(candidate) == GatewayConfig().dispatch.first_token_timeout(ttft)


def test_the_gateway_hedges_on_the_ratios_it_observed(writer: StoreWriter) -> None:
    grid = Grid(writer, nodes=1, config=GatewayConfig())
    for ratio in (1.0, 1.5, 2.0, 1.2, 1.1, 3.0, 1.3, 1.4):  # observed TTFT / raw predicted TTFT
        grid.membership.observed_timing(
            NodeId("n1"),
            ttft_s=ratio,
            raw_predicted_ttft_s=1.0,
            fresh_ttft_s=ratio,
            raw_predicted_itl_s=0.01,
            itl_s=0.01,
        )
    candidate = Candidate(
        node_id=NodeId("n1"), rank=0, score=1.0, details=(), predicted_ttft_s=0.4, calibration=(2.0, 1.0)
    )
    assert grid.dispatcher.hedge_delay(candidate) == pytest.approx(0.4 / 2.0 * 3.0)  # the p95 of eight is the max


def _lost_attempt(sim: Simulation, *, pred_ttft: float, pred_itl: float, sent_tokens: int) -> tuple[_Job, float]:
    """A job whose node leaves after `sent_tokens` tokens reached the client; returns it and when its node left."""
    node = sim.nodes[0]
    job = _Job(0, TraceRequest(0.0, 100, 50), EPOCH, tried={node.node_id})  # as _start leaves it
    attempt = _Attempt(job, node, EPOCH, 50, pred_ttft, pred_itl, 0.0)
    if sent_tokens:
        attempt.first_at, attempt.itl = EPOCH + 0.1, 0.02
        sim.now = attempt.first_at + attempt.itl * (sent_tokens - 0.5)
    else:
        sim.now = EPOCH + 0.01
    sim.open_jobs, sim._open[0], sim.outcomes = 1, job, [None]
    sim._lost(attempt)
    return job, sim.now


def _retry_at(sim: Simulation) -> float:
    """When the simulated gateway sends the job again (running its stall timer's handler if that is due first)."""
    (event,) = sim._events
    when, _, handler, args = event
    if handler == sim._stall_due:
        sim._events.clear()
        sim.now = when
        handler(*args)
        (when,) = [when for when, _, handler, _ in sim._events if handler == sim._retry] or [sim.now]
    else:
        assert handler == sim._retry
    return when


def test_the_simulator_sends_again_after_the_policys_hedge_delay() -> None:
    sim = _simulation()
    job, _ = _lost_attempt(sim, pred_ttft=0.3, pred_itl=0.02, sent_tokens=0)
    assert job.retries == 1 and _retry_at(sim) == EPOCH + POLICY.hedge_delay(0.3, 1.0, None)


def test_the_simulator_fails_over_after_the_policys_stall_timeout() -> None:
    sim = _simulation()
    job, _ = _lost_attempt(sim, pred_ttft=0.3, pred_itl=0.2, sent_tokens=5)
    last_token = EPOCH + 0.1 + 0.02 * 4
    assert job.failovers == 1 and math.isclose(_retry_at(sim), last_token + POLICY.stall_timeout(0.2))


@pytest.mark.parametrize("itl", [0.02, 0.2, 5.0])
def test_a_stream_no_live_node_could_take_over_waits_the_longer_stall_timeout_in_both(
    writer: StoreWriter, itl: float
) -> None:
    """The gateway's patience and the simulator's stall handler apply the same rule: when the only other node is
    down when the stall timer runs out, the stream waits the policy's unresumable timeout after its last token."""
    sim = _simulation()
    sim.nodes[1].state = NodeState.DOWN
    _lost_attempt(sim, pred_ttft=0.3, pred_itl=itl, sent_tokens=5)
    last_token = EPOCH + 0.1 + 0.02 * 4
    assert math.isclose(_retry_at(sim), last_token + POLICY.stall_timeout(itl, takeover=False))
    grid = Grid(writer, nodes=1, config=GatewayConfig())
    candidate = Candidate(
        node_id=NodeId("n1"), rank=0, score=1.0, details=(), predicted_ttft_s=0.3, predicted_itl_s=itl
    )
    assert grid.dispatcher.stall_timeout(candidate, takeover=False) == POLICY.stall_timeout(itl, takeover=False)
    assert POLICY.stall_timeout(itl, takeover=False) >= POLICY.stall_unresumable_s


def test_the_simulator_stops_failing_over_at_the_policys_max_failovers() -> None:
    sim = _simulation()
    sim._open[0] = _Job(0, TraceRequest(0.0, 100, 50), EPOCH, failovers=POLICY.max_failovers)
    node = sim.nodes[0]
    attempt = _Attempt(sim._open[0], node, EPOCH, 50, 0.3, 0.02, 0.0, first_at=EPOCH + 0.1, itl=0.02)
    sim.now, sim.open_jobs, sim.outcomes = EPOCH + 0.15, 1, [None]
    sim._lost(attempt)
    outcome = sim.outcomes[0]
    assert outcome is not None and outcome.failed and not sim._events
