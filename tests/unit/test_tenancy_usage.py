"""Usage per key (gateway/tenancy/usage.py): what `Usage` adds up for each key, what `/metrics` shows of it (the
TOP_KEYS keys with the most requests by name, the rest summed as `other`, a TTFT summary), read back through
prometheus_client's registry and text format; and the lifecycle subscriber that charges a request to its admission."""

from __future__ import annotations

from typing import cast

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gridserve.gateway.lifecycle.record import Finished, NodeWork, Settled, Timing
from gridserve.gateway.lifecycle.subscribers import Scope
from gridserve.gateway.tenancy.keys import ApiKey, KeyPolicy, digest
from gridserve.gateway.tenancy.limits import CURRENT, Limiter
from gridserve.gateway.tenancy.usage import TOP_KEYS, Usage, UsageCollector, UsageSubscriber
from gridserve.types import NodeId
from gridserve.types.scheduling import Decision

FAMILIES = [
    "gridserve_key_requests",
    "gridserve_key_errors",
    "gridserve_key_prompt_tokens",
    "gridserve_key_completion_tokens",
    "gridserve_key_spend_usd",
    "gridserve_key_refused",
]


def a_key(key_id: str, name: str | None = None) -> ApiKey:
    return ApiKey(key_id=key_id, name=name or f"name-{key_id}", digest=digest(key_id), policy=KeyPolicy())


def finished(prompt: int = 10, completion: int = 5, *, status: str = "ok", ttft_s: float | None = 0.1) -> Finished:
    """A request's end; Usage reads its tokens, status and timing only (no decision needed)."""
    return Finished(
        decision=cast(Decision, None),
        endpoint="chat",
        status=status,
        error="",
        served_by="n1",
        work=(NodeWork(node_id=NodeId("n1"), outcome=status, tokens=completion, price_per_mtok=1.0),),
        prompt_tokens=prompt,
        completion_tokens=completion,
        duration_s=0.5,
        timing=Timing(ttft_s=ttft_s, itl_s=0.01),
    )


def samples(usage: Usage) -> dict[str, dict[str, float]]:
    """{sample name: {key id label: value}} from the text format, as a scraper reads it (the `name` label checked
    against the key's)."""
    registry = CollectorRegistry()
    registry.register(UsageCollector(usage))
    text = generate_latest(registry).decode()
    out: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            by_key = out.setdefault(s.name, {})
            assert s.labels["key"] not in by_key, f"{s.name} has key={s.labels['key']!r} twice"
            key_id = s.labels["key"]
            assert s.labels["name"] == usage.keys[key_id].name if key_id != "other" else s.labels["name"] == "other"
            by_key[key_id] = s.value
    return out


def test_usage_adds_up_each_keys_requests() -> None:
    usage = Usage()
    key = a_key("a")
    usage.served(key, finished(10, 5, ttft_s=0.2), 0.001)
    usage.served(key, finished(20, 7, status="failed", ttft_s=None), 0.0)
    usage.served(key, finished(1, 1, ttft_s=0.4), 0.002)
    usage.refused(key, "rate_limit_exceeded")
    usage.refused(key, "rate_limit_exceeded")
    usage.refused(key, "insufficient_quota")
    view = usage.view()["a"]
    assert view == {
        "name": "name-a",
        "requests": 3,
        "prompt_tokens": 31,
        "completion_tokens": 13,
        "spent_usd": 0.003,
        "errors": 1,
        "refused": {"rate_limit_exceeded": 2, "insufficient_quota": 1},
        "ttft_p50_s": 0.4,
        "ttft_p99_s": 0.4,
    }
    assert usage.keys["a"].ttft_count == 2
    assert usage.keys["a"].ttft_sum_s == pytest.approx(0.6)


def test_ttft_percentiles_of_a_key() -> None:
    usage = Usage()
    key = a_key("a")
    for ms in range(1, 101):
        usage.served(key, finished(ttft_s=ms / 1000), 0.0)
    view = usage.view()["a"]
    assert (view["ttft_p50_s"], view["ttft_p99_s"]) == (0.051, 0.1)
    assert Usage().view() == {}
    usage.refused(a_key("b"), "x")
    assert usage.view()["b"]["ttft_p50_s"] is None


def test_more_than_top_keys_show_top_keys_by_name_and_the_rest_as_other() -> None:
    usage = Usage()
    n = TOP_KEYS + 3
    for i in range(1, n + 1):  # key i: i requests, i errors refused once each, spend i cents
        key = a_key(f"k{i:02d}")
        for _ in range(i):
            usage.served(key, finished(prompt=2, completion=3, status="failed", ttft_s=0.5), 0.01)
        usage.refused(key, "rate_limit_exceeded")
    got = samples(usage)
    named = {f"k{i:02d}" for i in range(4, n + 1)}  # the TOP_KEYS with the most requests
    expected = {
        "gridserve_key_requests_total": lambda i: i,
        "gridserve_key_errors_total": lambda i: i,
        "gridserve_key_prompt_tokens_total": lambda i: 2 * i,
        "gridserve_key_completion_tokens_total": lambda i: 3 * i,
        "gridserve_key_spend_usd_total": lambda i: 0.01 * i,
        "gridserve_key_refused_total": lambda i: 1,
    }
    for sample, of in expected.items():
        values = got[sample]
        assert set(values) == named | {"other"}, sample
        assert len(values) == TOP_KEYS + 1
        for i in range(4, n + 1):
            assert values[f"k{i:02d}"] == pytest.approx(of(i)), (sample, i)
        assert values["other"] == pytest.approx(of(1) + of(2) + of(3)), sample
    assert got["gridserve_key_ttft_seconds_count"]["other"] == 1 + 2 + 3
    assert got["gridserve_key_ttft_seconds_sum"]["other"] == pytest.approx(0.5 * 6)
    assert got["gridserve_key_ttft_seconds_count"][f"k{n:02d}"] == n


def test_exactly_top_keys_have_no_other() -> None:
    usage = Usage()
    for i in range(TOP_KEYS):
        usage.served(a_key(f"k{i}"), finished(), 0.0)
    got = samples(usage)
    assert len(got["gridserve_key_requests_total"]) == TOP_KEYS
    assert "other" not in got["gridserve_key_requests_total"]


def test_no_keys_no_samples_but_the_families_are_there() -> None:
    registry = CollectorRegistry()
    registry.register(UsageCollector(Usage()))
    text = generate_latest(registry).decode()
    for family in [*FAMILIES, "gridserve_key_ttft_seconds"]:
        assert f"# TYPE {family}" in text
    assert "key=" not in text


def test_ttft_summary_counts_only_requests_with_a_first_token() -> None:
    usage = Usage()
    key = a_key("a", "alpha")
    usage.served(key, finished(ttft_s=0.25), 0.0)
    usage.served(key, finished(ttft_s=0.5), 0.0)
    usage.served(key, finished(status="failed", ttft_s=None), 0.0)
    registry = CollectorRegistry()
    registry.register(UsageCollector(usage))
    assert registry.get_sample_value("gridserve_key_ttft_seconds_count", {"key": "a", "name": "alpha"}) == 2
    assert registry.get_sample_value("gridserve_key_ttft_seconds_sum", {"key": "a", "name": "alpha"}) == pytest.approx(
        0.75
    )
    assert registry.get_sample_value("gridserve_key_requests_total", {"key": "a", "name": "alpha"}) == 3
    assert registry.get_sample_value("gridserve_key_errors_total", {"key": "a", "name": "alpha"}) == 1


def test_the_ttft_sum_and_count_outlive_the_sample_window() -> None:
    usage = Usage()
    key = a_key("a", "alpha")
    stats = usage._stats(key)
    cap = stats.ttfts.maxlen
    assert cap is not None
    for _ in range(cap + 5):
        usage.served(key, finished(ttft_s=0.1), 0.0)
    assert len(stats.ttfts) == cap
    registry = CollectorRegistry()
    registry.register(UsageCollector(usage))
    assert registry.get_sample_value("gridserve_key_ttft_seconds_count", {"key": "a", "name": "alpha"}) == cap + 5


def test_two_keys_with_one_name_give_distinct_series() -> None:
    usage = Usage()
    usage.served(a_key("a", "ci"), finished(), 0.0)
    usage.served(a_key("b", "ci"), finished(), 0.0)
    assert samples(usage)["gridserve_key_requests_total"] == {"a": 1.0, "b": 1.0}


# -- the lifecycle subscriber --------------------------------------------------------------------------------------


def test_subscriber_charges_the_current_admission_and_adds_usage() -> None:
    limiter = Limiter(lambda: 1_700_000_040.0)
    usage = Usage()
    subscriber = UsageSubscriber(usage)
    key = ApiKey(key_id="k1", name="k", digest=digest("k"), policy=KeyPolicy(tpm=1000))
    admission = limiter.admit(key, 500)
    settled = Settled(entries=({"amount_usd": 0.002}, {"amount_usd": "0.003"}))
    token = CURRENT.set(admission)
    try:
        subscriber.finished(cast(Scope, None), finished(10, 5, status="failed"), settled)
    finally:
        CURRENT.reset(token)
    assert (admission.tokens, admission.spent_usd, admission.failed) == (15, pytest.approx(0.005), True)
    admission.close()
    own = limiter.counts("k1").own
    assert (own.tokens, own.spent_usd, own.errors) == (15, pytest.approx(0.005), 1)
    assert usage.keys["k1"].requests == 1 and usage.keys["k1"].spent_usd == pytest.approx(0.005)


def test_subscriber_without_an_admission_does_nothing() -> None:
    usage = Usage()
    UsageSubscriber(usage).finished(cast(Scope, None), finished(), Settled(entries=({"amount_usd": 1.0},)))
    assert usage.keys == {}
