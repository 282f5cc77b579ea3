"""The doctor's rules on hand-made node views: each cause, its evidence, and healthy nodes left alone."""

from hypothesis import given
from hypothesis import strategies as st

from gridserve.diagnostics.doctor import Cause, NodeView, RequestTiming, diagnose
from gridserve.engines.base import classify_error


def timing(ttft: float = 0.05, itl: float = 0.02, network: float = 0.002) -> RequestTiming:
    return RequestTiming(ttft, itl, network, 0.001, ttft - network - 0.001, itl * 20)


def view(name: str = "n1", **kw: object) -> NodeView:
    base: dict[str, object] = {
        "node_id": name,
        "endpoint": "http://10.0.0.7:9000",
        "model": "llama-3-8b",
        "accelerator": "rtx4090",
        "state": "up",
        "rtt_ms": 1.0,
        "utilization": 0.7,
        "memory_share": 0.6,
        "temperature_c": 60.0,
        "clock_ratio": 1.0,
        "requests": [timing() for _ in range(5)],
        "roofline_ttft_s": 0.04,
        "roofline_itl_s": 0.02,
    }
    base.update(kw)
    return NodeView(**base)  # type: ignore[arg-type]


PEERS = [view("p1"), view("p2")]


def test_a_healthy_node_is_healthy() -> None:
    d = diagnose(view(), PEERS)
    assert d.cause is Cause.HEALTHY and "TTFT" in d.evidence[0]


def test_network_lag_high_ttft_normal_itl_high_rtt() -> None:
    slow = [timing(ttft=0.35, network=0.30) for _ in range(5)]
    d = diagnose(view(rtt_ms=300.0, requests=slow), PEERS)
    assert d.cause is Cause.NETWORK
    assert any("probe RTT 300.0 ms" in e for e in d.evidence)
    assert any("on the network" in e for e in d.evidence)
    assert "mtr 10.0.0.7" in d.next_check


def test_slow_prefill_with_no_network_share_is_not_called_network() -> None:
    slow = [timing(ttft=0.35, network=0.002) for _ in range(5)]
    assert diagnose(view(requests=slow), PEERS).cause is Cause.HEALTHY


def test_late_heartbeats_are_discovery_delay() -> None:
    d = diagnose(view(heartbeat_age_s=5.0, heartbeat_interval_s=2.0), PEERS)
    assert d.cause is Cause.NETWORK and "last heartbeat 5.0 s ago" in d.evidence[0]


def test_node_failure_from_state_failures_and_errors() -> None:
    assert diagnose(view(state="down"), PEERS).cause is Cause.NODE_FAILURE
    d = diagnose(view(failures=["stalled: no token for 1.00 s", "stalled: no token for 1.00 s"]), PEERS)
    assert d.cause is Cause.NODE_FAILURE and "2 of 7 recent jobs failed" in d.evidence[0]
    errors = [{"at": 1.0, "kind": "cuda", "message": "CUDA error: an illegal memory access"}]
    d = diagnose(view(errors=errors), PEERS)
    assert d.cause is Cause.NODE_FAILURE and "illegal memory access" in d.evidence[0]


def test_one_failure_in_many_requests_is_not_a_failing_node() -> None:
    many = [timing() for _ in range(20)]
    assert diagnose(view(requests=many, failures=["timeout"]), PEERS).cause is Cause.HEALTHY


def test_thermal_throttling() -> None:
    d = diagnose(view(temperature_c=92.0, clock_ratio=0.55), PEERS)
    assert d.cause is Cause.THERMAL_THROTTLING
    assert any("92 C" in e for e in d.evidence) and any("55%" in e for e in d.evidence)


def test_memory_pressure_explains_out_of_memory_errors() -> None:
    oom = [{"at": 1.0, "kind": "oom", "message": "CUDA out of memory"}]
    d = diagnose(view(memory_share=0.96, errors=oom), PEERS)
    assert d.cause is Cause.MEMORY_PRESSURE and "96% used" in d.evidence[0] and "out-of-memory" in d.evidence[0]


def test_compute_saturation_from_itl_against_peers() -> None:
    slow = [timing(itl=0.1) for _ in range(5)]
    d = diagnose(view(requests=slow, utilization=0.99), PEERS)
    assert d.cause is Cause.COMPUTE_SATURATION and "5.0x the baseline" in d.evidence[0]


def test_compute_saturation_without_peers_uses_the_roofline() -> None:
    slow = [timing(itl=0.1) for _ in range(5)]
    assert diagnose(view(requests=slow), []).cause is Cause.COMPUTE_SATURATION


def test_pipeline_overhead_low_utilisation_high_latency_multi_stage() -> None:
    slow = [timing(ttft=0.2, itl=0.08, network=0.01) for _ in range(5)]
    d = diagnose(view(stages=3, utilization=0.2, requests=slow), PEERS)
    assert d.cause is Cause.PIPELINE_OVERHEAD and "3-stage route" in d.evidence[0]
    single = diagnose(view(stages=1, utilization=0.2, requests=slow), PEERS)
    assert single.cause is Cause.COMPUTE_SATURATION


@given(st.lists(st.floats(0.001, 0.03), min_size=1, max_size=20), st.floats(0.0, 0.89), st.floats(30, 84))
def test_normal_figures_are_always_healthy(itls: list[float], memory: float, temp: float) -> None:
    """Anything within 2x of the baseline, below 90% memory and 85 C, with no failures, is healthy."""
    requests = [timing(itl=i) for i in itls]
    assert diagnose(view(requests=requests, memory_share=memory, temperature_c=temp), PEERS).cause is Cause.HEALTHY


def test_error_kinds() -> None:
    assert classify_error("CUDA out of memory. Tried to allocate 2.00 GiB") == "oom"
    assert classify_error("CUDA error: an illegal memory access was encountered") == "cuda"
    assert classify_error("upstream timed out") == "timeout"
    assert classify_error("refused generate: wrong_signer") == "refused"
    assert classify_error("ValueError: bad shape") == "engine"


def reused(reported: float, expected: float) -> RequestTiming:
    t = timing()
    return RequestTiming(
        t.ttft_s,
        t.itl_s,
        t.network_s,
        t.queue_s,
        t.prefill_s,
        t.decode_s,
        cached_share=reported,
        expected_cached_share=expected,
    )


def test_a_node_reusing_far_less_than_the_index_expects_is_a_prefix_cache_mismatch() -> None:
    short = [reused(0.1, 0.8) for _ in range(10)] + [timing() for _ in range(5)]
    d = diagnose(view(requests=short), PEERS)
    assert d.cause is Cause.PREFIX_CACHE
    assert "over 10 requests with prefix reuse it reported 10% of prompt tokens cached" in d.evidence[0]
    assert "expected 80%" in d.evidence[0] and "--prefix-cache-mb" in d.next_check
    # reuse claimed that the gateway never sent is a mismatch too
    assert diagnose(view(requests=[reused(0.9, 0.0) for _ in range(10)]), PEERS).cause is Cause.PREFIX_CACHE


def test_prefix_reuse_as_expected_or_too_few_samples_is_healthy() -> None:
    assert diagnose(view(requests=[reused(0.7, 0.8) for _ in range(20)]), PEERS).cause is Cause.HEALTHY
    assert diagnose(view(requests=[reused(0.0, 0.9) for _ in range(7)]), PEERS).cause is Cause.HEALTHY
