"""The decision log keeps requests in flight and a bounded number of finished decisions in memory; older ones
come back from the store (a soak found 10,000 full decisions held in memory growing the gateway by 11 MiB a
minute)."""

import random

import pytest

from gridserve.catalog import model_spec
from gridserve.gateway.ops.decisions import BATCH, DecisionLog
from gridserve.scheduler import default_profile, schedule
from gridserve.sim.grid import SimConfig, build_nodes
from gridserve.store import Store, StoreWriter
from gridserve.types.scheduling import Decision, ScheduleRequest

NOW = 1_700_000_000.0


def decisions(count: int) -> list[Decision]:
    config = SimConfig(nodes=6, seed=1)
    nodes = build_nodes(config, model_spec(config.model), random.Random(1))
    for n in nodes:
        n.heartbeat_at = NOW
    snapshots = [n.snapshot() for n in nodes]
    made = []
    for i in range(count):
        request = ScheduleRequest(request_id=f"r{i}", model=config.model, prompt_tokens=100, max_tokens=20)
        made.append(schedule(request, snapshots, default_profile(), random.Random(i), NOW, decision_id=f"dec_{i}"))
    return made


def test_in_flight_decisions_stay_and_finished_ones_are_bounded_then_read_from_the_store() -> None:
    store = Store("sqlite://")
    store.migrate()
    writer = StoreWriter(store)
    log = DecisionLog(writer, capacity=10)
    assert log.capacity == 2 * BATCH  # never below one write batch
    made = decisions(3 * log.capacity)
    streaming = made[0]
    log.record(streaming, status="streaming", ttft_s=0.5)
    for d in made[1:]:
        log.record(d, status="streaming")
        log.record(d, status="ok", usage={"completion_tokens": 3})
    assert len(log._recent) == log.capacity and set(log._live) == {streaming.decision_id}
    kept = log.get(streaming.decision_id)
    assert kept is not None and kept["status"] == "streaming" and kept["ttft_s"] == 0.5
    log.record(streaming, status="ok")
    assert log.get(streaming.decision_id) == {**kept, "status": "ok"}  # the in-flight outcome fields are kept
    log.flush()
    writer.flush()
    oldest = made[1].decision_id
    assert oldest not in log._recent
    from_store = log.get(oldest)
    assert from_store is not None and from_store["status"] == "ok" and from_store["usage"] == {"completion_tokens": 3}
    writer.close()


def test_a_request_in_flight_builds_its_record_only_when_it_ends_or_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    """The full record (every node's verdict and scores) is not made on the way to the first token."""

    built: list[str] = []
    as_dict = Decision.as_dict

    def counted(self: Decision) -> dict[str, object]:
        built.append(self.decision_id)
        return as_dict(self)

    monkeypatch.setattr(Decision, "as_dict", counted)
    store = Store("sqlite://")
    store.migrate()
    writer = StoreWriter(store)
    log = DecisionLog(writer, capacity=10)
    first, second = decisions(2)
    log.record(first, status="dispatching")
    log.record(first, status="streaming", served_by="n1", ttft_s=0.25)
    assert built == []
    seen = log.get(first.decision_id)
    assert seen is not None and (seen["status"], seen["served_by"], seen["ttft_s"]) == ("streaming", "n1", 0.25)
    assert seen["decision_id"] == first.decision_id and built == [first.decision_id]
    log.record(first, status="ok", duration_s=1.5)
    ended = log.get(first.decision_id)
    assert ended == {**seen, "status": "ok", "duration_s": 1.5}
    log.record(second, status="failed", error="no node")  # failed before dispatch: never in flight
    failed = log.get(second.decision_id)
    assert failed is not None and (failed["status"], failed["error"]) == ("failed", "no node")
    writer.close()
