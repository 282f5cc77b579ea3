"""Per-key limits decided in memory (gateway/tenancy/limits.py) against a fake clock: requests and tokens per minute
in fixed windows, requests in flight, a budget; the other gateways' counts as the sync sets them; OpenAI's 429s and
x-ratelimit-* headers; and, as properties over several simulated gateways, the requests-per-minute bound with a
perfect sync (never over) and with none (at most (G-1) x rpm over)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gridserve.gateway.tenancy import limits
from gridserve.gateway.tenancy.keys import ApiKey, KeyPolicy, digest
from gridserve.gateway.tenancy.limits import WINDOW_S, Counts, Limiter, OverLimit, _duration

W0 = 1_700_000_040.0
"""The start of a minute window (a multiple of 60)."""
assert W0 % WINDOW_S == 0


class Clock:
    def __init__(self, t: float = W0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def a_key(key_id: str = "k1", **policy: object) -> ApiKey:
    return ApiKey(key_id=key_id, name=f"key {key_id}", digest=digest(key_id), policy=KeyPolicy(**policy))  # type: ignore[arg-type]


def headers(h: list[tuple[bytes, bytes]]) -> dict[str, str]:
    out = {k.decode(): v.decode() for k, v in h}
    assert len(out) == len(h), f"a header repeated: {h}"
    return out


# -- requests per minute -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("offset", "retry_after"), [(0.0, 60), (15.0, 45), (15.2, 45), (59.5, 1), (59.999, 1)])
def test_rpm_admits_exactly_n_then_429_with_retry_after_to_the_windows_end(offset: float, retry_after: int) -> None:
    clock = Clock(W0 + offset)
    limiter = Limiter(clock)
    key = a_key(rpm=3)
    for _ in range(3):
        limiter.admit(key, 0).close()  # closing frees nothing of a per-minute count
    with pytest.raises(OverLimit) as refused:
        limiter.admit(key, 0)
    exc = refused.value
    assert (exc.status, exc.code, exc.type) == (429, "rate_limit_exceeded", "rate_limit_exceeded")
    assert "3 requests per minute" in exc.message
    h = headers(exc.headers)
    assert h["retry-after"] == str(retry_after)
    assert h["x-ratelimit-limit-requests"] == "3"
    assert h["x-ratelimit-remaining-requests"] == "0"
    assert exc.response().status_code == 429
    assert exc.response().headers["retry-after"] == str(retry_after)
    assert limiter.counts("k1").own.requests == 3, "a refused request counts nothing"


def test_rpm_admitted_answers_carry_the_remaining_count_and_reset() -> None:
    clock = Clock(W0 + 20.0)
    limiter = Limiter(clock)
    key = a_key(rpm=3)
    seen = [headers(limiter.admit(key, 0).headers) for _ in range(3)]
    assert [h["x-ratelimit-remaining-requests"] for h in seen] == ["2", "1", "0"]
    assert {h["x-ratelimit-reset-requests"] for h in seen} == {"40s"}
    assert all("retry-after" not in h for h in seen)
    assert all("x-ratelimit-limit-tokens" not in h for h in seen), "no tokens limit, no tokens headers"


def test_rpm_the_next_window_admits_again() -> None:
    clock = Clock(W0 + 30.0)
    limiter = Limiter(clock)
    key = a_key(rpm=2)
    limiter.admit(key, 0)
    limiter.admit(key, 0)
    with pytest.raises(OverLimit):
        limiter.admit(key, 0)
    clock.t = W0 + WINDOW_S - 0.001  # still the same minute
    with pytest.raises(OverLimit):
        limiter.admit(key, 0)
    clock.t = W0 + WINDOW_S  # the next minute starts
    limiter.admit(key, 0)
    limiter.admit(key, 0)
    with pytest.raises(OverLimit):
        limiter.admit(key, 0)
    assert limiter.counts("k1").own.window == W0 + WINDOW_S


def test_keys_are_limited_separately() -> None:
    limiter = Limiter(Clock())
    a, b = a_key("a", rpm=1), a_key("b", rpm=1)
    limiter.admit(a, 0)
    limiter.admit(b, 0)
    with pytest.raises(OverLimit):
        limiter.admit(a, 0)


# -- tokens per minute -------------------------------------------------------------------------------------------


def test_tpm_reserves_then_close_turns_the_reservation_into_what_was_used() -> None:
    limiter = Limiter(Clock(W0 + 10.0))
    key = a_key(tpm=1000)
    first = limiter.admit(key, 600)
    assert headers(first.headers)["x-ratelimit-remaining-tokens"] == "400"
    assert headers(first.headers)["x-ratelimit-limit-tokens"] == "1000"
    assert headers(first.headers)["x-ratelimit-reset-tokens"] == "50s"
    with pytest.raises(OverLimit) as refused:  # 600 reserved + 500 > 1000
        limiter.admit(key, 500)
    assert "Try again in 50 s" in refused.value.message
    assert headers(refused.value.headers)["retry-after"] == "50"
    assert headers(refused.value.headers)["x-ratelimit-remaining-tokens"] == "400"
    first.charge(100, 0.0, failed=False)
    first.charge(50, 0.0, failed=False)  # a second choice of the same request
    assert limiter.counts("k1").own.tokens == 600, "charges wait for close"
    first.close()
    assert limiter.counts("k1").own.tokens == 150
    second = limiter.admit(key, 500)
    assert headers(second.headers)["x-ratelimit-remaining-tokens"] == "350"


def test_tpm_a_request_over_its_reservation_counts_what_it_used() -> None:
    limiter = Limiter(Clock())
    key = a_key(tpm=1000)
    a = limiter.admit(key, 100)
    a.charge(900, 0.0, failed=False)
    a.close()
    assert limiter.counts("k1").own.tokens == 900
    with pytest.raises(OverLimit):
        limiter.admit(key, 101)
    limiter.admit(key, 100)


def test_tpm_a_request_bigger_than_the_limit_alone_is_told_so() -> None:
    limiter = Limiter(Clock())
    key = a_key(tpm=1000)
    with pytest.raises(OverLimit) as refused:
        limiter.admit(key, 1001)
    assert "this request alone needs 1001 tokens" in refused.value.message
    assert refused.value.code == "rate_limit_exceeded"
    assert limiter.counts("k1").own.tokens == 0
    assert limiter.counts("k1").own.requests == 0
    limiter.admit(key, 1000)  # exactly the limit fits


def test_tpm_a_reservation_from_a_past_window_is_not_returned_to_the_new_one() -> None:
    clock = Clock(W0 + 50.0)
    limiter = Limiter(clock)
    key = a_key(tpm=1000)
    old = limiter.admit(key, 800)
    clock.t = W0 + WINDOW_S + 1.0
    new = limiter.admit(key, 300)
    old.charge(10, 0.0, failed=False)
    old.close()  # would subtract 790 from the new window's 300 if it were counted there
    assert limiter.counts("k1").own.tokens == 300
    new.close()
    assert limiter.counts("k1").own.tokens == 0


# -- concurrency -------------------------------------------------------------------------------------------------


def test_concurrency_close_frees_the_slot_and_double_close_is_harmless() -> None:
    limiter = Limiter(Clock())
    key = a_key(max_concurrency=2)
    a = limiter.admit(key, 0)
    b = limiter.admit(key, 0)
    with pytest.raises(OverLimit) as refused:
        limiter.admit(key, 0)
    exc = refused.value
    assert (exc.status, exc.code) == (429, "concurrency_limit_exceeded")
    assert headers(exc.headers)["retry-after"] == "1"
    assert "2 requests in flight" in exc.message
    a.close()
    a.close()
    a.close()
    assert limiter.counts("k1").own.inflight == 1
    c = limiter.admit(key, 0)
    with pytest.raises(OverLimit):  # a double close that freed twice would let this one in
        limiter.admit(key, 0)
    b.close()
    c.close()
    assert limiter.counts("k1").own.inflight == 0


def test_a_charge_after_close_still_counts() -> None:
    limiter = Limiter(Clock())
    key = a_key(tpm=10_000, budget_usd=5.0)
    a = limiter.admit(key, 100)
    a.charge(40, 1.0, failed=False)
    a.close()
    counts = limiter.counts("k1")
    counts.dirty = False
    assert (counts.own.tokens, counts.own.spent_usd, counts.own.errors) == (40, 1.0, 0)
    a.charge(25, 0.5, failed=True)  # an abandoned answer that ended after its request
    assert (counts.own.tokens, counts.own.spent_usd, counts.own.errors) == (65, 1.5, 1)
    assert counts.dirty
    assert counts.own.inflight == 0


def test_a_charge_after_close_in_a_later_window_counts_spend_not_tokens() -> None:
    clock = Clock(W0 + 59.0)
    limiter = Limiter(clock)
    key = a_key(tpm=10_000)
    a = limiter.admit(key, 100)
    a.close()
    clock.t = W0 + WINDOW_S + 5.0
    limiter.admit(key, 7).close()  # the new window: 7 reserved, 0 used
    a.charge(30, 0.25, failed=True)
    own = limiter.counts("k1").own
    assert (own.tokens, own.spent_usd, own.errors) == (0, 0.25, 1)


def test_failed_flag_counts_one_error_per_request() -> None:
    limiter = Limiter(Clock())
    key = a_key()
    a = limiter.admit(key, 0)
    a.charge(1, 0.0, failed=True)
    a.charge(1, 0.0, failed=False)
    a.close()
    b = limiter.admit(key, 0)
    b.charge(1, 0.0, failed=False)
    b.close()
    assert limiter.counts("k1").own.errors == 1


# -- budget ------------------------------------------------------------------------------------------------------


def test_budget_refuses_once_spend_reaches_it_with_no_retry_after() -> None:
    limiter = Limiter(Clock())
    key = a_key(budget_usd=1.0, rpm=100)
    a = limiter.admit(key, 0)
    a.charge(10, 0.6, failed=False)
    b = limiter.admit(key, 0)  # spend in flight is not counted yet
    a.close()
    b.charge(10, 0.3999, failed=False)
    b.close()
    assert limiter.counts("k1").own.spent_usd == pytest.approx(0.9999)
    c = limiter.admit(key, 0)  # just under
    c.charge(10, 0.0001, failed=False)
    c.close()
    with pytest.raises(OverLimit) as refused:
        limiter.admit(key, 0)
    exc = refused.value
    assert (exc.status, exc.code, exc.type) == (429, "insufficient_quota", "insufficient_quota")
    h = headers(exc.headers)
    assert "retry-after" not in h
    assert h["x-ratelimit-remaining-requests"] == "97"
    assert "spent its budget" in exc.message
    assert limiter.counts("k1").own.requests == 3


def test_budget_is_checked_before_the_requests_limit() -> None:
    limiter = Limiter(Clock())
    key = a_key(budget_usd=1.0, rpm=1)
    a = limiter.admit(key, 0)
    a.charge(1, 2.0, failed=False)
    a.close()
    with pytest.raises(OverLimit) as refused:
        limiter.admit(key, 0)
    assert refused.value.code == "insufficient_quota"


def test_budget_spend_carries_across_windows() -> None:
    clock = Clock()
    limiter = Limiter(clock)
    key = a_key(budget_usd=1.0)
    a = limiter.admit(key, 0)
    a.charge(1, 1.0, failed=False)
    a.close()
    clock.t += 10 * WINDOW_S
    with pytest.raises(OverLimit):
        limiter.admit(key, 0)


# -- the other gateways' counts ------------------------------------------------------------------------------------


def others(limiter: Limiter, key_id: str, **counts: float) -> None:
    """Set the others' counts as TenancySync does (for the current window)."""
    limiter.counts(key_id).others = Counts(window=limiter.window(limiter.clock()), **counts)  # type: ignore[arg-type]


def test_others_requests_count_against_rpm() -> None:
    limiter = Limiter(Clock())
    key = a_key(rpm=5)
    others(limiter, "k1", requests=3)
    limiter.admit(key, 0)
    admitted = limiter.admit(key, 0)
    assert headers(admitted.headers)["x-ratelimit-remaining-requests"] == "0"
    with pytest.raises(OverLimit):
        limiter.admit(key, 0)


def test_others_tokens_count_against_tpm() -> None:
    limiter = Limiter(Clock())
    key = a_key(tpm=100)
    others(limiter, "k1", tokens=70)
    with pytest.raises(OverLimit) as refused:
        limiter.admit(key, 31)
    assert "Try again" in refused.value.message, "not too big alone: 31 <= 100"
    limiter.admit(key, 30)


def test_others_inflight_counts_against_concurrency() -> None:
    limiter = Limiter(Clock())
    key = a_key(max_concurrency=3)
    others(limiter, "k1", inflight=2)
    limiter.admit(key, 0)
    with pytest.raises(OverLimit):
        limiter.admit(key, 0)


def test_others_spend_counts_against_budget() -> None:
    limiter = Limiter(Clock())
    key = a_key(budget_usd=2.0)
    others(limiter, "k1", spent_usd=1.5)
    a = limiter.admit(key, 0)
    a.charge(1, 0.5, failed=False)
    a.close()
    with pytest.raises(OverLimit) as refused:
        limiter.admit(key, 0)
    assert "2.000000 of 2.0 USD" in refused.value.message


def test_others_per_minute_counts_end_with_their_window_but_totals_carry_on() -> None:
    clock = Clock(W0 + 30.0)
    limiter = Limiter(clock)
    key = a_key(rpm=2, max_concurrency=2)
    others(limiter, "k1", requests=2, inflight=1)
    with pytest.raises(OverLimit):
        limiter.admit(key, 0)
    clock.t = W0 + WINDOW_S + 1.0  # no sync yet in the new minute
    limiter.admit(key, 0)
    with pytest.raises(OverLimit) as refused:  # one in flight here, one there
        limiter.admit(key, 0)
    assert refused.value.code == "concurrency_limit_exceeded"


# -- every refusal's message and headers --------------------------------------------------------------------------


def refusal(limiter: Limiter, key: ApiKey, tokens: int = 0) -> OverLimit:
    with pytest.raises(OverLimit) as refused:
        limiter.admit(key, tokens)
    return refused.value


def test_each_refusal_says_exactly_why_with_the_headers_as_they_stood() -> None:
    """Each limit's 429, message and headers to the byte, the budget's first; refusing counts nothing."""
    limiter = Limiter(Clock(W0 + 20.0))
    key = a_key(rpm=2, tpm=100, max_concurrency=1, budget_usd=1.0)
    stood = {
        "x-ratelimit-limit-requests": "2",
        "x-ratelimit-remaining-requests": "1",
        "x-ratelimit-reset-requests": "40s",
        "x-ratelimit-limit-tokens": "100",
        "x-ratelimit-remaining-tokens": "70",
        "x-ratelimit-reset-tokens": "40s",
    }
    held = limiter.admit(key, 30)
    assert headers(held.headers) == stood

    busy = refusal(limiter, key)
    assert busy.message == "Key 'key k1' has 1 requests in flight, its limit."
    assert (busy.code, headers(busy.headers)) == ("concurrency_limit_exceeded", {"retry-after": "1", **stood})

    held.charge(30, 0.0, failed=False)  # it used what it reserved
    held.close()
    too_big = refusal(limiter, key, 101)
    assert too_big.message == (
        "Rate limit reached for key 'key k1': 100 tokens per minute; this request alone needs 101 tokens (prompt and"
        " max_tokens)."
    )
    assert (too_big.code, headers(too_big.headers)) == ("rate_limit_exceeded", {"retry-after": "40", **stood})
    no_room = refusal(limiter, key, 71)
    assert no_room.message == "Rate limit reached for key 'key k1': 100 tokens per minute; Try again in 40 s."
    assert headers(no_room.headers) == {"retry-after": "40", **stood}

    limiter.admit(key, 0).close()
    rpm = refusal(limiter, key)
    assert rpm.message == "Rate limit reached for key 'key k1': 2 requests per minute. Try again in 40 s."
    assert rpm.code == "rate_limit_exceeded"
    assert headers(rpm.headers) == {"retry-after": "40", **stood, "x-ratelimit-remaining-requests": "0"}

    limiter.counts("k1").others.spent_usd = 1.0
    spent = refusal(limiter, key)
    assert spent.message == "Key 'key k1' has spent its budget (1.000000 of 1.0 USD)."
    assert (spent.code, spent.type) == ("insufficient_quota", "insufficient_quota")
    assert headers(spent.headers) == {**stood, "x-ratelimit-remaining-requests": "0"}, "no retry-after"
    own = limiter.counts("k1").own
    assert (own.requests, own.tokens, own.inflight) == (2, 30, 0), "refusals counted nothing"


def test_headers_are_built_once_per_request_admitted_or_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    built: list[int] = []
    real = limits._headers

    def counting(*args: Any) -> list[tuple[bytes, bytes]]:
        built.append(1)
        return real(*args)

    monkeypatch.setattr(limits, "_headers", counting)
    limiter = Limiter(Clock())
    key = a_key(rpm=1)
    limiter.admit(key, 0)
    assert len(built) == 1, "an admission builds its answer's headers only"
    refusal(limiter, key)
    assert len(built) == 2, "a refusal builds its own"


# -- static keys -------------------------------------------------------------------------------------------------


def test_static_keys_are_never_limited_nor_counted() -> None:
    limiter = Limiter(Clock())
    key = ApiKey(
        key_id="static-1",
        name="--api-key 1",
        digest=digest("s"),
        policy=KeyPolicy(rpm=1, tpm=1, max_concurrency=1, budget_usd=0.01),
        static=True,
    )
    held = [limiter.admit(key, 1_000) for _ in range(50)]
    for a in held:
        a.charge(5, 1.0, failed=True)
        a.close()
        a.charge(5, 1.0, failed=True)
    assert limiter.keys == {}
    assert all(a.headers == [] for a in held)


# -- headers' durations ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.02, "20ms"),
        (0.0, "0ms"),
        (0.5, "500ms"),
        (1, "1s"),
        (1.2, "2s"),
        (59, "59s"),
        (60, "1m0s"),
        (61, "1m1s"),
        (360, "6m0s"),
        (-3, "0ms"),
    ],
)
def test_duration_is_openais_reset_format(seconds: float, text: str) -> None:
    assert _duration(seconds) == text


# -- properties over several gateways ------------------------------------------------------------------------------

arrivals = st.lists(
    st.tuples(st.integers(min_value=0, max_value=7), st.floats(min_value=0.0, max_value=20.0)), max_size=120
)
"""(gateway index modulo G, seconds since the previous request)."""


def simulate(gateways: int, rpm: int, steps: list[tuple[int, float]], *, synced: bool) -> dict[float, int]:
    """Admitted requests per window over `gateways` limiters on one clock; each admission closes at once."""
    clock = Clock(W0 + 3.0)
    limiters = [Limiter(clock) for _ in range(gateways)]
    key = a_key(rpm=rpm)
    admitted: dict[float, int] = {}
    for which, gap in steps:
        clock.t += gap
        limiter = limiters[which % gateways]
        try:
            admission = limiter.admit(key, 0)
        except OverLimit:
            continue
        admission.close()
        window = limiter.window(clock.t)
        admitted[window] = admitted.get(window, 0) + 1
        if synced:  # a perfect sync after every admission: each learns the sum of the others' own counts
            for i, me in enumerate(limiters):
                own = [lim.counts("k1").own for j, lim in enumerate(limiters) if j != i]
                me.counts("k1").others = Counts(
                    window=window, requests=sum(c.requests for c in own if c.window == window)
                )
    return admitted


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(gateways=st.integers(min_value=1, max_value=4), rpm=st.integers(min_value=1, max_value=6), steps=arrivals)
def test_property_synced_gateways_never_admit_more_than_rpm_in_a_window(
    gateways: int, rpm: int, steps: list[tuple[int, float]]
) -> None:
    admitted = simulate(gateways, rpm, steps, synced=True)
    assert all(n <= rpm for n in admitted.values()), admitted


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(gateways=st.integers(min_value=1, max_value=4), rpm=st.integers(min_value=1, max_value=6), steps=arrivals)
def test_property_unsynced_gateways_overshoot_by_at_most_g_minus_1_times_rpm(
    gateways: int, rpm: int, steps: list[tuple[int, float]]
) -> None:
    admitted = simulate(gateways, rpm, steps, synced=False)
    assert all(n - rpm <= (gateways - 1) * rpm for n in admitted.values()), admitted


def test_unsynced_bound_is_reached_and_the_synced_one_holds_on_the_same_traffic() -> None:
    """The (G-1) x rpm overshoot is not a loose bound: a burst spread over G gateways reaches it; synced, not."""
    steps = [(i, 0.01) for i in range(3 * 10)]  # 30 requests round-robin over 3 gateways within one second
    assert simulate(3, 4, steps, synced=False) == {W0: 12}
    assert simulate(3, 4, steps, synced=True) == {W0: 4}
