"""Admission buckets (gateway/registry/admission.py): however requests arrive, an address gets at most its burst
plus its rate times the time elapsed, all addresses together at most the overall bucket, and an address refused
for the others' sake keeps its turn."""

from hypothesis import given
from hypothesis import strategies as st

from gridserve.gateway.registry.admission import MAX_ADDRESSES, Admission, Bucket, RefusalRecorder

gaps = st.lists(st.floats(0.0, 2.0), min_size=1, max_size=300)


def admission(rate: float = 1.0, burst: float = 20, total: float = 20.0) -> Admission:
    return Admission(registration_rate=rate, registration_burst=burst, registration_rate_total=total)


@given(gaps=gaps, rate=st.floats(0.1, 10.0), burst=st.integers(1, 50))
def test_a_bucket_never_admits_more_than_its_burst_plus_its_rate(gaps: list[float], rate: float, burst: int) -> None:
    bucket, now, admitted = Bucket.full(rate, burst, 0.0), 0.0, 0
    for gap in gaps:
        now += gap
        wait = bucket.take(now)
        admitted += wait == 0.0
        assert wait >= 0.0
    assert admitted <= burst + rate * now + 1e-9


@given(gaps=gaps)
def test_a_refused_caller_is_told_how_long_to_wait_and_may_come_back_then(gaps: list[float]) -> None:
    bucket, now = Bucket.full(1.0, 3, 0.0), 0.0
    for gap in gaps:
        now += gap
        wait = bucket.take(now)
        if wait:
            assert bucket.take(now + wait + 1e-9) == 0.0
            now += wait + 1e-9


def test_one_address_flooding_leaves_room_for_others() -> None:
    gate = admission()
    flood = sum(gate.registration("10.0.0.1", 0.5) == 0.0 for _ in range(1000))
    assert flood == 20
    assert all(gate.registration(f"10.0.1.{i}", 0.5) == 0.0 for i in range(50))  # others still get in


def test_the_overall_bucket_holds_many_addresses_and_refunds_their_own() -> None:
    gate = admission(total=2.0)  # bursts of 20 in all
    admitted = [gate.registration(f"10.0.0.{i}", 0.0) == 0.0 for i in range(100)]
    assert sum(admitted) == 20
    assert gate.per_address["10.0.0.99"].tokens == 20  # refused for the others' sake: its own token given back
    assert gate.registration("10.0.0.99", 1.0) == 0.0  # and in after the overall bucket refilled


def test_per_address_buckets_are_bounded() -> None:
    gate = admission()
    for i in range(MAX_ADDRESSES + 500):
        gate.registration(f"a{i}", float(i) / 1000)
    assert len(gate.per_address) <= MAX_ADDRESSES


def test_refusals_past_the_rate_are_counted_and_the_next_record_says_how_many() -> None:
    recorder = RefusalRecorder(rate=5.0)
    first = [recorder.admit(0.0) for _ in range(80)]
    assert sum(r is not None for r in first) == 50 and first[:50] == [0] * 50
    assert recorder.admit(1.0) == 30  # 30 went unrecorded before this one
    assert recorder.admit(1.0) == 0
