"""The dashboard's series aggregation (`/admin/series`) as a pure function: buckets, grouping, percentiles."""

from typing import Any

import pytest

from gridserve.gateway.api.dashboard import Hardware, bucket_edges, check_window, hardware_of, percentile, series
from gridserve.gateway.api.errors import APIError
from gridserve.gateway.ops.outcomes import RequestTrace

CARDS = {"n-cpu-1": "cpu", "n-cpu-2": "cpu", "n-4090": "rtx4090"}


def trace(
    at: float, node: str, model: str = "m", *, ttft: float = 0.1, itl: float | None = 0.01, status: str = "ok"
) -> RequestTrace:
    return RequestTrace(
        at=at,
        decision_id="dec",
        request_id="req",
        model=model,
        node_id=node,
        status=status,
        ttft_s=ttft,
        network_s=None,
        queue_s=None,
        prefill_s=None,
        decode_s=None,
        itl_s=itl,
        predicted_ttft_s=None,
        predicted_itl_s=None,
        failovers=0,
        hedged=False,
    )


def card(node_id: str) -> Hardware:
    return hardware_of(CARDS.get(node_id))


def run(traces: list[RequestTrace], now: float = 1000.0, window_s: float = 60.0, bucket_s: float = 10.0) -> Any:
    return series(traces, card, now=now, window_s=window_s, bucket_s=bucket_s)


def test_percentile_nearest_rank() -> None:
    assert percentile([], 0.5) is None
    assert percentile([3.0], 0.95) == 3.0
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 0.5) == 50.0
    assert percentile(values, 0.95) == 95.0
    assert percentile([5.0, 1.0, 3.0], 0.5) == 3.0


def test_bucket_edges_are_aligned_and_hold_now() -> None:
    start, count = bucket_edges(1005.0, 60.0, 10.0)
    assert (start, count) == (950.0, 6)
    assert start + (count - 1) * 10.0 <= 1005.0 < start + count * 10.0
    assert bucket_edges(1005.0, 65.0, 10.0)[1] == 7


def test_groups_by_model_and_card_with_rates_and_percentiles() -> None:
    traces = [
        trace(995.0, "n-cpu-1", ttft=0.1, itl=0.01),
        trace(996.0, "n-cpu-2", ttft=0.3, itl=0.03),
        trace(997.0, "n-cpu-1", ttft=0.2, itl=None),  # one token: no ITL
        trace(998.0, "n-cpu-2", ttft=9.0, status="failed"),  # counted as an error, not in the latencies
        trace(985.0, "n-4090", model="llama", ttft=0.05, itl=0.02),
        trace(900.0, "n-cpu-1"),  # before the window
        trace(1011.0, "n-cpu-1"),  # after now's bucket
    ]
    found = run(traces)
    assert [(s["model"], s["hardware"], s["hw_class"], s["requests"]) for s in found] == [
        ("llama", "rtx4090", "consumer-high", 1),
        ("m", "cpu", "cpu", 4),
    ]
    cpu = found[1]["buckets"]
    assert [b["t"] for b in cpu] == [950.0, 960.0, 970.0, 980.0, 990.0, 1000.0]
    last = cpu[-2]  # 990 <= t < 1000
    assert last["requests"] == 4 and last["errors"] == 1 and last["rate"] == pytest.approx(0.4)
    assert (last["ttft_p50_s"], last["ttft_p95_s"]) == (0.2, 0.3)
    assert (last["itl_p50_s"], last["itl_p95_s"]) == (0.01, 0.03)
    empty = cpu[0]
    assert empty["requests"] == 0 and empty["rate"] == 0 and empty["ttft_p50_s"] is None and empty["itl_p95_s"] is None
    assert found[0]["buckets"][3]["ttft_p50_s"] == 0.05


def test_unknown_node_and_card_are_labelled_unknown() -> None:
    found = run([trace(995.0, "gone")])
    assert (found[0]["hardware"], found[0]["hw_class"]) == ("unknown", "unknown")
    assert hardware_of("some-new-card") == Hardware("some-new-card", "unknown")


def test_no_traces_no_series() -> None:
    assert run([]) == []


@pytest.mark.parametrize(
    ("window_s", "bucket_s", "param"),
    [
        (0.0, 10.0, "window_s"),
        (-5.0, 1.0, "window_s"),
        (float("nan"), 10.0, "window_s"),
        (float("inf"), 10.0, "window_s"),
        (100_000.0, 600.0, "window_s"),
        (600.0, 0.0, "bucket_s"),
        (600.0, float("nan"), "bucket_s"),
        (600.0, 601.0, "bucket_s"),
        (86_400.0, 1.0, "bucket_s"),  # too many buckets
    ],
)
def test_bad_windows_are_400(window_s: float, bucket_s: float, param: str) -> None:
    with pytest.raises(APIError) as caught:
        check_window(window_s, bucket_s)
    assert caught.value.status == 400 and caught.value.param == param


def test_good_windows_pass() -> None:
    check_window(600.0, 10.0)
    check_window(86_400.0, 120.0)
    check_window(1.0, 1.0)
