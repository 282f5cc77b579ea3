"""gridserve.reliability: decayed scores, ejection with backoff, quarantine and ban, the ledger views.

Expectations are derived from the config (priors, thresholds, backoff) or from relations (monotonicity, decay
ordering, an independent brute-force recomputation of the decayed scores), never copied from the implementation.
"""

import itertools
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gridserve.reliability import (
    JOB_FAILURES,
    CannotRelease,
    EventKind,
    InvalidConfig,
    InvalidEvent,
    NodeEvent,
    ReliabilityBook,
    ReliabilityConfig,
    ReliabilityState,
    ReliabilitySummary,
    Severity,
    UnknownNode,
)

CFG = ReliabilityConfig()
T0 = 1_700_000_000.0
SIGNALS = ("availability", "completion", "latency", "clean")
STATES = ReliabilityState


def ev(node: str, kind: EventKind, at: float, **kw: object) -> NodeEvent:
    return NodeEvent(node_id=node, kind=kind, at=at, **kw)  # type: ignore[arg-type]


def done(node: str, at: float, within_slo: bool | None = True) -> NodeEvent:
    return ev(node, EventKind.JOB_COMPLETED, at, within_slo=within_slo)


def fail(node: str, at: float, kind: EventKind = EventKind.JOB_FAILED) -> NodeEvent:
    return ev(node, kind, at, detail="upstream 500")


def severe(node: str, at: float, detail: str) -> NodeEvent:
    return ev(node, EventKind.INCIDENT, at, severity=Severity.SEVERE, detail=detail)


def canary(node: str, at: float) -> NodeEvent:
    return ev(node, EventKind.CANARY_PASSED, at, detail="canary ok")


def prior_mean(cfg: ReliabilityConfig) -> float:
    return cfg.prior_good / (cfg.prior_good + cfg.prior_bad)


def eject(book: ReliabilityBook, node: str, at: float) -> None:
    """Fail a healthy node exactly as often as it takes to eject it."""
    for _ in range(book.config.consecutive_failures_to_eject):
        book.record(fail(node, at))
    assert book.state(node, at) is STATES.EJECTED


def quarantined(node: str = "n", cfg: ReliabilityConfig = CFG) -> ReliabilityBook:
    book = ReliabilityBook(cfg)
    book.record(severe(node, T0, "model integrity: output mismatch on audit"))
    assert book.state(node, T0) is STATES.QUARANTINED
    return book


# strategies


@st.composite
def minor_events(draw: st.DrawFn, nodes: tuple[str, ...] = ("a", "b", "c")) -> NodeEvent:
    kind = draw(st.sampled_from(list(EventKind)))
    within = draw(st.sampled_from([None, True, False])) if kind is EventKind.JOB_COMPLETED else None
    at = draw(st.floats(min_value=T0, max_value=T0 + 50 * CFG.half_life_s, allow_nan=False))
    return NodeEvent(node_id=draw(st.sampled_from(nodes)), kind=kind, at=at, within_slo=within, detail="d")


histories = st.lists(minor_events(), max_size=60)


@st.composite
def skewed_histories(draw: st.DrawFn) -> list[NodeEvent]:
    """Histories of one node over a few half-lives, drawn from a random subset of the kinds, so that lopsided
    records (say, only failures and protocol errors) come up often."""
    kinds = sorted(draw(st.sets(st.sampled_from(list(EventKind)), min_size=1)))
    times = st.floats(min_value=T0, max_value=T0 + 3 * CFG.half_life_s)
    out = []
    for _ in range(draw(st.integers(0, 150))):
        kind = draw(st.sampled_from(kinds))
        within = draw(st.sampled_from([None, True, False])) if kind is EventKind.JOB_COMPLETED else None
        out.append(NodeEvent(node_id="a", kind=kind, at=draw(times), within_slo=within))
    return out


def in_unit_interval(s: ReliabilitySummary) -> bool:
    return all(0.0 <= v <= 1.0 for v in (*s.signals().values(), s.score))


# config and events


def test_config_rejects_out_of_range_values() -> None:
    bad: list[dict[str, float]] = [
        {"half_life_s": 0},
        {"half_life_s": math.inf},
        {"prior_good": -1},
        {"prior_good": 0, "prior_bad": 0},
        {"consecutive_failures_to_eject": 0},
        {"max_ejected_share": 1.5},
        {"base_ejection_s": 60, "max_ejection_s": 30},
        {"weight_availability": 0, "weight_completion": 0, "weight_latency": 0, "weight_clean": 0},
        {"weight_clean": -0.1},
    ]
    for kwargs in bad:
        with pytest.raises(InvalidConfig):
            ReliabilityConfig(**kwargs)  # type: ignore[arg-type]
    assert sum(CFG.weights.values()) > 0


def test_events_that_contradict_themselves_are_refused() -> None:
    with pytest.raises(InvalidEvent):
        ev("n", EventKind.JOB_FAILED, T0, severity=Severity.SEVERE)
    with pytest.raises(InvalidEvent):
        ev("n", EventKind.JOB_FAILED, T0, within_slo=True)
    with pytest.raises(InvalidEvent):
        ev("n", EventKind.HEARTBEAT_KEPT, math.nan)
    assert isinstance(InvalidEvent("x"), ValueError)


# priors, decay, monotonicity


@pytest.mark.parametrize("cfg", [CFG, ReliabilityConfig(prior_good=1.0, prior_bad=1.0), ReliabilityConfig(prior_bad=9)])
def test_fresh_node_scores_are_the_prior_mean(cfg: ReliabilityConfig) -> None:
    book = ReliabilityBook(cfg)
    unknown = book.summary("ghost", T0)
    book.add_node("added", T0)
    for s in (unknown, book.summary("added", T0 + 10 * cfg.half_life_s)):
        for value in s.signals().values():
            assert value == pytest.approx(prior_mean(cfg))
        assert s.score == pytest.approx(prior_mean(cfg))
        assert s.state is STATES.HEALTHY and s.is_new and s.samples == 0 and s.reason == ""
        assert s.ejected_until is None and s.ejections == 0
    assert book.nodes() == ["added"], "summary() of an unknown node must not add it"
    assert book.state("ghost", T0) is STATES.HEALTHY and book.nodes() == ["added"]


def test_old_failures_matter_less_than_recent_ones() -> None:
    book = ReliabilityBook()
    now = T0 + 10 * CFG.half_life_s
    for i in range(3):
        book.record(fail("old", T0 + i))
        book.record(fail("recent", now - 3 + i))
    old, recent = book.summary("old", now), book.summary("recent", now)
    assert old.completion > recent.completion and old.score > recent.score
    assert recent.completion < prior_mean(CFG) and old.completion < prior_mean(CFG)
    assert abs(old.completion - prior_mean(CFG)) < abs(recent.completion - prior_mean(CFG)) / 100
    # and the same node recovers towards the prior as its failures age
    later = book.summary("recent", now + 10 * CFG.half_life_s)
    assert recent.completion < later.completion < prior_mean(CFG)


def test_samples_and_is_new_follow_exploration_samples() -> None:
    book = ReliabilityBook()
    n = CFG.exploration_samples
    for _ in range(n - 1):
        book.record(done("n", T0))
    s = book.summary("n", T0)
    assert s.is_new and s.samples == n - 1
    book.record(fail("n", T0))
    s = book.summary("n", T0)
    assert s.samples == n and not s.is_new
    assert book.summary("n", T0 + 1).samples < n, "samples decay"
    assert book.summary("n", T0 + 5 * CFG.half_life_s).is_new, "decayed evidence makes a node new again"


def expected_signals(events: list[NodeEvent], now: float, cfg: ReliabilityConfig) -> dict[str, float]:
    """Brute force, from the rules: each outcome weighs 0.5 ** (age / half-life); Beta posterior mean."""
    good = dict.fromkeys(SIGNALS, 0.0)
    bad = dict.fromkeys(SIGNALS, 0.0)
    for e in events:
        w = 0.5 ** ((now - e.at) / cfg.half_life_s)
        if e.kind is EventKind.HEARTBEAT_KEPT:
            good["availability"] += w
            good["clean"] += w
        elif e.kind is EventKind.HEARTBEAT_MISSED:
            bad["availability"] += w
        elif e.kind is EventKind.JOB_COMPLETED:
            good["completion"] += w
            good["clean"] += w
            if e.within_slo is not None:
                (good if e.within_slo else bad)["latency"] += w
        elif e.kind in JOB_FAILURES:
            bad["completion"] += w
        elif e.kind in (EventKind.PROTOCOL_ERROR, EventKind.SIGNALS_MATCHED) or (
            e.kind is EventKind.INCIDENT and e.severity is Severity.MINOR
        ):
            bad["clean"] += w
        elif e.kind is EventKind.CANARY_PASSED:  # (an audit passed vets a node but moves no score)
            good["clean"] += w
    return {k: (good[k] + cfg.prior_good) / (good[k] + bad[k] + cfg.prior_good + cfg.prior_bad) for k in SIGNALS}


@settings(deadline=None)
@given(events=st.lists(minor_events(nodes=("n",)), min_size=1, max_size=80), extra=st.floats(0, 5 * 3600.0))
def test_running_sums_match_a_brute_force_recomputation(events: list[NodeEvent], extra: float) -> None:
    """Scores come from O(1) running sums, yet equal the decayed sums over every event, evicted ones included,
    whatever order the events arrive in."""
    cfg = ReliabilityConfig(ledger_events_per_node=5)
    book = ReliabilityBook(cfg)
    for e in events:
        book.record(e)
    now = max(e.at for e in events) + extra
    s = book.summary("n", now)
    want = expected_signals(events, now, cfg)
    for k in SIGNALS:
        assert getattr(s, k) == pytest.approx(want[k], rel=1e-9, abs=1e-12)
    weights = cfg.weights
    assert s.score == pytest.approx(sum(weights[k] * want[k] for k in SIGNALS) / sum(weights.values()), rel=1e-9)


@settings(deadline=None)
@given(history=skewed_histories() | histories, extra=st.sampled_from(["good", "bad"]), age=st.floats(0, 3 * 3600.0))
def test_good_jobs_never_lower_and_failures_never_raise(history: list[NodeEvent], extra: str, age: float) -> None:
    book = ReliabilityBook()
    for e in history:
        book.record(e)
    now = max((e.at for e in history), default=T0) + 1.0
    before = book.summary("a", now)
    if extra == "good":
        book.record(done("a", now - age, within_slo=True))
    else:
        book.record(fail("a", now - age, kind=EventKind.JOB_TIMED_OUT))
    after = book.summary("a", now)
    sign = 1 if extra == "good" else -1
    for k in ("completion", "latency", "score"):
        assert sign * (getattr(after, k) - getattr(before, k)) >= -1e-12, k
    assert sign * (after.completion - before.completion) > 0, "the job outcome must move completion"


@pytest.mark.parametrize("failures", [0, 10, 100, 400])
@pytest.mark.parametrize("protocol_errors", [0, 10, 100, 400])
def test_a_failure_never_raises_the_score_of_a_lopsided_record(failures: int, protocol_errors: int) -> None:
    """Long runs of failures and protocol errors: a further failure must not dilute the protocol-error share."""
    book = ReliabilityBook()
    for _ in range(failures):
        book.record(fail("a", T0))
    for _ in range(protocol_errors):
        book.record(ev("a", EventKind.PROTOCOL_ERROR, T0))
    before = book.summary("a", T0)
    book.record(fail("a", T0))
    after = book.summary("a", T0)
    assert after.score < before.score and after.completion < before.completion
    assert after.clean == before.clean and after.latency == before.latency


@settings(deadline=None)
@given(history=histories, probes=st.lists(st.floats(T0, T0 + 60 * 3600.0), max_size=5))
def test_minor_events_never_quarantine_and_scores_stay_in_unit_interval(
    history: list[NodeEvent], probes: list[float]
) -> None:
    book = ReliabilityBook(ReliabilityConfig(consecutive_failures_to_eject=2))
    for i, e in enumerate(history):
        for t in book.record(e):
            assert t.new not in (STATES.QUARANTINED, STATES.BANNED)
        if i < len(probes):
            assert book.state(e.node_id, probes[i]) not in (STATES.QUARANTINED, STATES.BANNED)
    for node in ("a", "b", "c"):
        for now in (T0, T0 + 100 * 3600.0, *probes):
            s = book.summary(node, now)
            assert s.state not in (STATES.QUARANTINED, STATES.BANNED)
            assert in_unit_interval(s)
    assert all(t.new not in (STATES.QUARANTINED, STATES.BANNED) for t in book.transitions(limit=10_000))


def test_minor_incident_lowers_clean_but_changes_no_state() -> None:
    book = ReliabilityBook()
    book.record(ev("n", EventKind.INCIDENT, T0, severity=Severity.MINOR, detail="latency spike"))
    book.record(ev("n", EventKind.PROTOCOL_ERROR, T0, detail="replayed nonce"))
    s = book.summary("n", T0)
    assert s.state is STATES.HEALTHY and s.clean < prior_mean(CFG) and s.score < prior_mean(CFG)
    assert book.transitions("n") == []


# severe incidents: quarantine, ban, release, canaries


def test_one_severe_incident_quarantines_a_node_with_a_long_good_record() -> None:
    book = ReliabilityBook()
    for i in range(10_000):
        book.record(done("n", T0 + i))
    now = T0 + 10_000
    good = book.summary("n", now)
    assert good.score > prior_mean(CFG) and good.state is STATES.HEALTHY
    detail = "model integrity: output mismatch on audit"
    changes = book.record(severe("n", now, detail))
    assert [(t.old, t.new) for t in changes] == [(STATES.HEALTHY, STATES.QUARANTINED)]
    assert detail in changes[0].reason
    s = book.summary("n", now)
    assert s.state is STATES.QUARANTINED and s.score == 0.0 and detail in s.reason
    assert s.completion == pytest.approx(good.completion), "signals are still reported, the score is zeroed"
    assert book.incidents("n")[0].detail == detail


def test_a_severe_incident_moves_state_not_scores() -> None:
    book = ReliabilityBook()
    for node in ("plain", "flagged"):
        book.record(done(node, T0))
        book.record(ev(node, EventKind.HEARTBEAT_KEPT, T0))
    book.record(severe("flagged", T0, "output mismatch"))
    book.release("flagged", reason="audit was wrong", now=T0)
    plain, flagged = book.summary("plain", T0), book.summary("flagged", T0)
    assert flagged.state is STATES.PROBATION
    assert flagged.signals() == plain.signals() and flagged.score == plain.score


def test_a_second_severe_incident_bans_even_long_after_the_first() -> None:
    book = quarantined()
    book.release("n", reason="operator re-flashed weights", now=T0 + 1)
    for i in range(CFG.probation_successes):
        book.record(done("n", T0 + 2 + i))
    assert book.state("n", T0 + 10) is STATES.HEALTHY
    later = T0 + 100 * CFG.half_life_s
    changes = book.record(severe("n", later, "identity spoofing: key mismatch"))
    assert [t.new for t in changes] == [STATES.BANNED]
    s = book.summary("n", later)
    assert s.state is STATES.BANNED and s.score == 0.0 and "identity spoofing" in s.reason


def test_a_banned_node_stays_banned() -> None:
    book = quarantined()
    book.record(severe("n", T0 + 1, "settlement mismatch"))
    assert book.state("n", T0 + 1) is STATES.BANNED
    with pytest.raises(CannotRelease) as err:
        book.release("n", reason="please", now=T0 + 2)
    assert isinstance(err.value, ValueError) and "banned" in str(err.value)
    for i in range(CFG.canaries_to_release + CFG.probation_successes):
        assert book.record(canary("n", T0 + 3 + i)) == []
        assert book.record(done("n", T0 + 3 + i)) == []
    assert book.quarantine("n", reason="belt and braces", now=T0 + 50) == []
    assert book.record(severe("n", T0 + 60, "again")) == []
    book.remove_node("n")
    book.add_node("n", T0 + 70)
    assert book.state("n", T0 + 10 * CFG.half_life_s) is STATES.BANNED, "leaving and rejoining clears nothing"


def test_release_of_a_quarantined_node_goes_through_probation() -> None:
    book = quarantined()
    changes = book.release("n", reason="false positive: audit bug #12", now=T0 + 1)
    assert [(t.old, t.new) for t in changes] == [(STATES.QUARANTINED, STATES.PROBATION)]
    assert "audit bug #12" in book.summary("n", T0 + 1).reason
    assert book.summary("n", T0 + 1).score > 0
    for i in range(CFG.probation_successes - 1):
        assert book.record(done("n", T0 + 2 + i)) == []
    assert book.state("n", T0 + 100) is STATES.PROBATION
    changes = book.record(done("n", T0 + 100))
    assert [(t.old, t.new) for t in changes] == [(STATES.PROBATION, STATES.HEALTHY)]
    assert book.summary("n", T0 + 100).reason == ""


def test_passed_canaries_end_a_quarantine() -> None:
    book = quarantined()
    for i in range(CFG.canaries_to_release - 1):
        assert book.record(canary("n", T0 + 1 + i)) == []
    assert book.state("n", T0 + 50) is STATES.QUARANTINED
    changes = book.record(canary("n", T0 + 50))
    assert [(t.old, t.new) for t in changes] == [(STATES.QUARANTINED, STATES.PROBATION)]
    assert "canar" in changes[0].reason


def test_jobs_do_not_end_a_quarantine() -> None:
    book = quarantined()
    for i in range(CFG.probation_successes + CFG.canaries_to_release):
        assert book.record(done("n", T0 + 1 + i)) == []
    assert book.state("n", T0 + 10 * CFG.half_life_s) is STATES.QUARANTINED


@pytest.mark.parametrize("start", ["healthy", "ejected", "probation"])
def test_admin_quarantine_works_from_any_state_but_banned(start: str) -> None:
    book = ReliabilityBook()
    book.add_node("n", T0)
    if start != "healthy":
        eject(book, "n", T0)
    now = T0 + 1 if start == "ejected" else T0 + CFG.max_ejection_s
    assert book.state("n", now).value == start
    changes = book.quarantine("n", reason="operator report", now=now)
    assert changes[-1].new is STATES.QUARANTINED and "operator report" in changes[-1].reason
    s = book.summary("n", now)
    assert s.score == 0.0 and s.ejected_until is None
    assert book.quarantine("n", reason="twice", now=now) == []


def test_admin_actions_on_unknown_nodes() -> None:
    book = ReliabilityBook()
    with pytest.raises(UnknownNode):
        book.release("ghost", reason="?", now=T0)
    assert book.nodes() == []
    book.quarantine("stranger", reason="reported", now=T0)
    assert book.nodes() == ["stranger"] and book.state("stranger", T0) is STATES.QUARANTINED
    book.add_node("h", T0)
    assert book.release("h", reason="no-op", now=T0) == []


# ejection


@pytest.mark.parametrize("kind", sorted(JOB_FAILURES))
def test_ejection_after_exactly_the_configured_consecutive_failures(kind: EventKind) -> None:
    book = ReliabilityBook()
    n = CFG.consecutive_failures_to_eject
    for i in range(n - 1):
        assert book.record(fail("n", T0 + i, kind)) == []
    assert book.state("n", T0 + n) is STATES.HEALTHY
    changes = book.record(fail("n", T0 + n, kind))
    assert [(t.old, t.new) for t in changes] == [(STATES.HEALTHY, STATES.EJECTED)]
    s = book.summary("n", T0 + n)
    assert s.ejections == 1 and s.ejected_until == pytest.approx(T0 + n + CFG.base_ejection_s)
    assert "upstream 500" in s.reason and str(n) in s.reason


def test_a_completed_job_resets_the_failure_run() -> None:
    book = ReliabilityBook()
    n = CFG.consecutive_failures_to_eject
    t = T0
    for _ in range(3):
        for _ in range(n - 1):
            book.record(fail("n", t))
            t += 1
        book.record(done("n", t, within_slo=None))
        t += 1
    assert book.state("n", t) is STATES.HEALTHY
    assert book.transitions("n") == []


def test_ejection_backoff_grows_is_capped_and_expires_into_probation() -> None:
    book = ReliabilityBook()
    t = T0
    eject(book, "n", t)
    durations: list[float] = []
    rounds = math.ceil(CFG.max_ejection_s / CFG.base_ejection_s) + 3
    for n in range(1, rounds + 1):
        s = book.summary("n", t)
        assert s.state is STATES.EJECTED and s.ejections == n and s.ejected_until is not None
        durations.append(s.ejected_until - t)
        assert durations[-1] == pytest.approx(min(CFG.base_ejection_s * n, CFG.max_ejection_s))
        until = s.ejected_until
        assert book.state("n", until - 1e-3) is STATES.EJECTED
        assert book.state("n", until) is STATES.PROBATION
        expiry = book.transitions("n", limit=1)[0]
        assert (expiry.old, expiry.new, expiry.at) == (STATES.EJECTED, STATES.PROBATION, until)
        t = until + 1
        changes = book.record(fail("n", t))  # a single failure in probation ejects again
        assert [c.new for c in changes] == [STATES.EJECTED]
    assert durations[0] == pytest.approx(CFG.base_ejection_s)
    assert all(a < b for a, b in itertools.pairwise(durations) if a < CFG.max_ejection_s)
    assert max(durations) == pytest.approx(CFG.max_ejection_s) and durations[-1] == durations[-2]


def test_probation_ends_after_the_configured_successes() -> None:
    book = ReliabilityBook()
    eject(book, "n", T0)
    t = T0 + CFG.base_ejection_s
    for i in range(CFG.probation_successes - 1):
        book.record(done("n", t + i) if i % 2 else canary("n", t + i))
    assert book.state("n", t + CFG.probation_successes) is STATES.PROBATION
    changes = book.record(done("n", t + CFG.probation_successes))
    assert [(c.old, c.new) for c in changes] == [(STATES.PROBATION, STATES.HEALTHY)]


def test_an_expired_ejection_is_reported_by_the_next_event() -> None:
    book = ReliabilityBook()
    eject(book, "n", T0)
    changes = book.record(done("n", T0 + 10 * CFG.max_ejection_s))
    assert changes[0].new is STATES.PROBATION and changes[0].at == pytest.approx(T0 + CFG.base_ejection_s)


def test_results_arriving_while_ejected_change_nothing() -> None:
    book = ReliabilityBook()
    eject(book, "n", T0)
    for _ in range(CFG.consecutive_failures_to_eject + CFG.probation_successes):
        assert book.record(fail("n", T0 + 1)) == []
        assert book.record(done("n", T0 + 1)) == []
    s = book.summary("n", T0 + 1)
    assert s.ejected_until == pytest.approx(T0 + CFG.base_ejection_s) and s.ejections == 1


def ejected_count(book: ReliabilityBook, now: float) -> int:
    return sum(book.state(n, now) is STATES.EJECTED for n in book.nodes())


@pytest.mark.parametrize("pool", [3, 20, 35])
def test_max_ejected_share_is_respected(pool: int) -> None:
    book = ReliabilityBook()
    nodes = [f"n{i:02}" for i in range(pool)]
    for n in nodes:
        book.add_node(n, T0)
    for n in nodes:
        for _ in range(CFG.consecutive_failures_to_eject):
            book.record(fail(n, T0))
    allowed = max(1, math.floor(CFG.max_ejected_share * pool))
    assert ejected_count(book, T0) == allowed
    assert allowed / pool <= CFG.max_ejected_share or allowed == 1
    # once those ejections end, the next failures of the nodes held back eject them
    t = T0 + CFG.base_ejection_s
    for n in nodes:
        if book.state(n, t) is STATES.HEALTHY:
            book.record(fail(n, t))
    assert ejected_count(book, t) == allowed


def test_banned_and_removed_nodes_do_not_count_in_the_pool() -> None:
    book = ReliabilityBook()
    nodes = [f"n{i:02}" for i in range(20)]
    for n in nodes:
        book.add_node(n, T0)
    for n in nodes[:10]:
        book.record(severe(n, T0, "first"))
        book.record(severe(n, T0, "second"))
    for n in nodes[10:]:
        for _ in range(CFG.consecutive_failures_to_eject):
            book.record(fail(n, T0))
    assert ejected_count(book, T0) == max(1, math.floor(CFG.max_ejected_share * 10))


def test_removing_ejected_nodes_frees_their_places() -> None:
    book = ReliabilityBook()
    nodes = [f"n{i:02}" for i in range(40)]
    for n in nodes:
        book.add_node(n, T0)

    def fail_everyone_healthy() -> None:
        for n in book.nodes():
            if book.state(n, T0) is STATES.HEALTHY:
                for _ in range(CFG.consecutive_failures_to_eject):
                    book.record(fail(n, T0))

    def allowed() -> int:
        return max(1, math.floor(CFG.max_ejected_share * len(book.nodes())))

    fail_everyone_healthy()
    assert ejected_count(book, T0) == allowed()
    gone = [n for n in nodes if book.state(n, T0) is STATES.EJECTED][:2]
    for n in gone:
        book.remove_node(n)
    assert ejected_count(book, T0) < allowed()
    fail_everyone_healthy()
    assert ejected_count(book, T0) == allowed()


def test_a_zero_share_disables_ejection() -> None:
    book = ReliabilityBook(ReliabilityConfig(max_ejected_share=0.0))
    for i in range(3 * CFG.consecutive_failures_to_eject):
        book.record(fail("n", T0 + i))
    assert book.state("n", T0 + 100) is STATES.HEALTHY


def test_removed_nodes_keep_their_record_and_late_events_do_not_bring_them_back() -> None:
    book = quarantined("q")
    book.add_node("h", T0)
    book.remove_node("q")
    book.remove_node("q")
    assert book.nodes() == ["h"]
    book.record(done("q", T0 + 1))
    assert book.nodes() == ["h"]
    book.add_node("q", T0 + 2)
    assert book.state("q", T0 + 2) is STATES.QUARANTINED and book.nodes() == ["h", "q"]


# the ledger views


def test_events_newest_first_across_nodes_and_by_kind() -> None:
    book = ReliabilityBook()
    recorded = []
    for i in range(30):
        e = (done if i % 3 else fail)(f"n{i % 2}", T0 + i)
        book.record(e)
        recorded.append(e)
    assert book.events(limit=1000) == recorded[::-1]
    assert book.events("n1", limit=1000) == [e for e in recorded if e.node_id == "n1"][::-1]
    assert book.events(limit=4) == recorded[::-1][:4]
    failures = book.events(kinds={EventKind.JOB_FAILED}, limit=1000)
    assert failures == [e for e in recorded if e.kind is EventKind.JOB_FAILED][::-1]
    assert book.events("nobody") == [] and book.events(limit=0) == []
    with pytest.raises(ValueError):
        book.events(limit=-1)


def test_incidents_are_never_evicted() -> None:
    book = ReliabilityBook()
    minor = ev("n", EventKind.INCIDENT, T0, severity=Severity.MINOR, detail="throttled")
    big = severe("n", T0 + 1, "settlement mismatch")
    book.record(minor)
    book.record(big)
    later = CFG.ledger_events_per_node + 500
    for i in range(later):
        book.record(done("n", T0 + 2 + i))
    assert book.incidents("n") == [big, minor]
    assert book.incidents() == [big, minor]
    everything = book.events("n", limit=10 * later)
    assert everything[-2:] == [big, minor]
    assert len(everything) == CFG.ledger_events_per_node + 2, "routine events are bounded per node"
    assert everything[0].at == T0 + 1 + later
    assert book.events(kinds={EventKind.INCIDENT}) == [big, minor]


def test_transitions_newest_first_and_filtered_by_node() -> None:
    book = ReliabilityBook()
    book.add_node("a", T0)
    book.add_node("b", T0)
    eject(book, "a", T0)
    book.record(severe("b", T0 + 1, "spoofed identity"))
    book.release("b", reason="key rotated", now=T0 + 2)
    news = [t.new for t in book.transitions()]
    assert news == [STATES.PROBATION, STATES.QUARANTINED, STATES.EJECTED]
    assert [t.new for t in book.transitions("a")] == [STATES.EJECTED]
    assert len(book.transitions(limit=2)) == 2
    assert all(t.reason for t in book.transitions())


def test_kept_heartbeats_count_in_scores_but_never_evict_job_outcomes() -> None:
    book, bare = ReliabilityBook(), ReliabilityBook()
    outcome = done("n", T0)
    book.record(outcome)
    bare.record(outcome)
    beats = 3 * CFG.ledger_events_per_node
    for i in range(beats):
        book.record(ev("n", EventKind.HEARTBEAT_KEPT, T0 + 1 + i / 100))
    now = T0 + 1 + beats / 100
    assert book.events("n", limit=10 * beats) == [outcome], "the job outcome stays; heartbeats are not listed"
    assert book.summary("n", now).availability > bare.summary("n", now).availability, "heartbeats still count"
    assert book.summary("n", now).samples == pytest.approx(bare.summary("n", now).samples)


@settings(max_examples=60, deadline=None)
@given(
    steps=st.lists(
        st.tuples(st.sampled_from(["done", "fail", "severe", "canary", "quarantine"]), st.floats(0.0, 400.0)),
        max_size=25,
    ),
    read_after=st.floats(0.0, 4000.0),
)
def test_the_packed_summary_is_the_summary(steps: list[tuple[str, float]], read_after: float) -> None:
    """`summary_row` (what the gateway's registry keeps per node) equals `summary(...).packed()`, and unpacks to
    the summary, in every state (ejections ending included) and for a node never seen."""
    book, at = ReliabilityBook(), T0
    for node in ("a", "b", "c"):
        book.add_node(node, T0)
    for what, dt in steps:
        at += dt
        if what == "done":
            book.record(done("a", at))
        elif what == "fail":
            book.record(fail("a", at))
        elif what == "severe":
            book.record(severe("a", at, "forged receipt"))
        elif what == "canary":
            book.record(canary("a", at))
        else:
            book.quarantine("a", reason="by hand", now=at)
    now = at + read_after
    for node in ("a", "b", "never-seen"):
        row = book.summary_row(node, now)
        summary = book.summary(node, now)
        assert row == summary.packed()
        assert ReliabilitySummary.unpacked(row) == summary


def test_ejections_ended_lists_exactly_the_ejections_past_their_end() -> None:
    book = ReliabilityBook()
    for node in "abcdefghijklmnopqrst":  # 20 nodes: two may be ejected at once
        book.add_node(node, T0)
    eject(book, "a", T0)
    eject(book, "b", T0 + 10)
    a_until, b_until = (book.summary(n, T0 + 20).ejected_until for n in "ab")
    assert a_until is not None and b_until is not None and a_until < b_until
    assert book.ejections_ended(a_until - 0.001) == []
    assert book.ejections_ended(a_until) == ["a"]
    assert sorted(book.ejections_ended(b_until)) == ["a", "b"]
    book.state("a", a_until)  # a read moves it to probation: no longer listed
    assert book.ejections_ended(b_until) == ["b"]
