"""Heartbeat ingestion at grid scale (bench/ingest.py measures it): the nonce cache forgets incrementally yet
exactly, cached keys change no verdict, and the failure detector's sweep ages nodes and counts every state.
(What a heartbeat leaves for the garbage collector: tests/unit/test_registry.py.)"""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tests.conftest import bare_record

from gridserve.gateway.config import GatewayConfig
from gridserve.gateway.ops.gcwatch import GcWatch
from gridserve.gateway.ops.metrics import GatewayMetrics
from gridserve.gateway.registry.events import Registered, StateChanged
from gridserve.gateway.registry.membership import Membership
from gridserve.store import Store, StoreWriter
from gridserve.trust import (
    BadSignature,
    EnvelopeVerifier,
    Expired,
    FreshnessPolicy,
    Identity,
    Replayed,
    node_id_for,
    sign_envelope,
)
from gridserve.trust.envelope import NonceCache
from gridserve.trust.identity import verify_key
from gridserve.types import NodeState

T0 = 1_700_000_000.0
POLICY = FreshnessPolicy()
SIGNERS = [Identity.generate() for _ in range(3)]


class Clock:
    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


# --- nonce cache -------------------------------------------------------------------------------------------

steps = st.lists(
    st.tuples(
        st.floats(0.0, 20.0, allow_nan=False),  # clock advance (the clock never runs backwards)
        st.sampled_from(["a", "b"]),  # keyid
        st.integers(0, 5),  # nonce: few values, so reuse is common
        st.floats(0.0, 60.0, allow_nan=False),  # forget_at - now (>= 0: the verifier adds only fresh messages)
    ),
    max_size=200,
)


@settings(max_examples=300, deadline=None)
@given(steps=steps)
def test_nonce_cache_is_exact_and_holds_only_live_entries(steps: list[tuple[float, str, int, float]]) -> None:
    """Against a model: a (keyid, nonce) is refused exactly while an earlier acceptance's forget_at >= now,
    and the cache holds exactly the entries that are still live (bounded by the traffic of one lifetime)."""
    cache = NonceCache()
    model: dict[tuple[str, str], float] = {}
    now = T0
    for advance, keyid, nonce, ahead in steps:
        now += advance
        key = (keyid, str(nonce))
        expected = key not in model or model[key] < now
        assert cache.check_and_add(keyid, str(nonce), now + ahead, now) is expected
        if expected:
            model[key] = now + ahead
        live = {k for k, t in model.items() if t >= now}
        assert len(cache) == len(live)


def test_nonce_cache_forgets_incrementally_at_scale() -> None:
    """2,000 messages a second for 3 minutes of 60 s retention: the size follows the live set, never the total."""
    cache = NonceCache()
    for i in range(2000 * 180):
        now = T0 + i / 2000
        assert cache.check_and_add("k", str(i), now + 60.0, now)
    assert 2000 * 60 <= len(cache) <= 2000 * 60 + 1


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    created_offset=st.floats(-25.0, 25.0, allow_nan=False),
    lifetime=st.floats(0.0, 120.0, allow_nan=False),
    first=st.floats(0.0, 200.0, allow_nan=False),
    later=st.lists(st.floats(0.0, 200.0, allow_nan=False), min_size=1, max_size=6),
    signer=st.integers(0, len(SIGNERS) - 1),
)
def test_a_message_is_refused_whenever_it_could_still_pass_freshness(
    created_offset: float, lifetime: float, first: float, later: list[float], signer: int
) -> None:
    """Accepted once, a message presented again at any later time (with other traffic between, which drives
    the cache's forgetting) is Replayed while it would pass the freshness check, and Expired after."""
    clock = Clock(T0)
    verifier = EnvelopeVerifier(POLICY, clock)
    created = T0 + created_offset
    body = sign_envelope(SIGNERS[signer], {"x": 1}, purpose="heartbeat", now=created, lifetime_s=lifetime)
    sig = orjson.loads(body)["sig"]
    created, expires = float(sig["created"]), float(sig["expires"])
    clock.t = T0 + first
    skew = POLICY.max_skew_s
    if not (created <= clock.t + skew and expires >= clock.t - skew):
        return  # not fresh the first time: nothing to replay
    verifier.verify(body, purpose="heartbeat")
    for dt in sorted(later):
        clock.t = T0 + first + dt
        other = SIGNERS[(signer + 1) % len(SIGNERS)]
        verifier.verify(sign_envelope(other, {"dt": dt}, purpose="heartbeat", now=clock.t), purpose="heartbeat")
        with pytest.raises(Replayed if expires >= clock.t - skew else Expired):
            verifier.verify(body, purpose="heartbeat")


# --- cached keys ---------------------------------------------------------------------------------------------


def test_cached_keys_change_no_verdict() -> None:
    """A key verified once (so cached) still refuses a signature by another key; bad keys keep raising."""
    alice, mallory = SIGNERS[0], SIGNERS[1]
    verifier = EnvelopeVerifier(POLICY, Clock(T0))
    verifier.verify(sign_envelope(alice, {"n": 1}, purpose="heartbeat", now=T0), purpose="heartbeat")
    assert verify_key(alice.public_key) is verify_key(alice.public_key)
    assert node_id_for(alice.public_key) == alice.node_id
    forged = orjson.loads(sign_envelope(mallory, {"n": 2}, purpose="heartbeat", now=T0))
    forged["sig"]["keyid"] = alice.public_key
    with pytest.raises(BadSignature):
        verifier.verify(orjson.dumps(forged), purpose="heartbeat")
    for bad in ("", "AAAA", "not base64!", alice.public_key[:-4]):
        for _ in range(2):  # errors are not cached: the second call raises too
            with pytest.raises(ValueError):
                verify_key(bad)


# --- sweep ---------------------------------------------------------------------------------------------------


def _membership(tmp_path: Path, clock: Clock) -> Membership:
    store = Store(f"sqlite:///{tmp_path / 'gs.db'}")
    store.migrate()
    config = GatewayConfig(heartbeat_interval_s=5.0)
    return Membership(config, EnvelopeVerifier(POLICY, clock), StoreWriter(store), GatewayMetrics(), clock=clock)


def _gauge(membership: Membership) -> dict[str, float]:
    out: dict[str, float] = {}
    for metric in membership.metrics.node_states.collect():
        for sample in metric.samples:
            out[sample.labels["state"]] = sample.value
    return out


def test_sweep_ages_nodes_and_counts_every_state(tmp_path: Path) -> None:
    clock = Clock(T0)
    membership = _membership(tmp_path, clock)
    config = membership.config
    ages = [0.0, config.suspect_after_s + 0.5, config.down_after_s + 0.5]
    states = list(NodeState)
    for i in range(70):  # registered `age` ago, then put in a state by the registry's own events
        at = T0 - ages[i % len(ages)]
        capability = bare_record(i, NodeState.UP).capability
        membership.apply(Registered(capability, at=at, registered_at=at, capability_at=at, last_seen=at))
        membership.apply(
            StateChanged(capability.node_id, at=at, state=states[i % len(states)], reason="t", if_live=False)
        )
    before = {k: (r.state, T0 - r.last_heartbeat) for k, r in membership.nodes.items()}
    membership.sweep()
    for node_id, (state, age) in before.items():
        after = membership.nodes[node_id].state
        if age > config.down_after_s and state in (NodeState.UP, NodeState.SUSPECT, NodeState.PROBATION):
            assert after == NodeState.DOWN
        elif age > config.suspect_after_s and state == NodeState.UP:
            assert after == NodeState.SUSPECT
        else:
            assert after == state
    expected: dict[str, Any] = {s.value: 0 for s in NodeState}
    for record in membership.nodes.values():
        expected[record.state.value] += 1
    assert _gauge(membership) == expected
    membership.writer.close()


# --- garbage-collector pauses -----------------------------------------------------------------------------------


def test_gc_pauses_are_observed_by_generation_until_removed() -> None:
    metrics = GatewayMetrics()
    watch = GcWatch(metrics.gc_pause)

    def count(generation: str) -> float:
        value = metrics.registry.get_sample_value("gridserve_gc_pause_seconds_count", {"generation": generation})
        return value or 0.0

    watch.install()
    watch.install()  # once only
    try:
        gc.collect(2)
        gc.collect(0)
        assert count("2") == 1 and count("0") == 1
        total = metrics.registry.get_sample_value("gridserve_gc_pause_seconds_sum", {"generation": "2"})
        assert total is not None and 0 < total < 5
    finally:
        watch.remove()
    gc.collect(2)
    assert count("2") == 1, "removed: no more observations"
