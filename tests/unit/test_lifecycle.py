"""The request lifecycle: every subscriber hears every hook in order, a failing subscriber does not break the
request, settlement is awaited only for answers that finished; and tracing (OpenTelemetry, in-memory exporter)
makes one trace per request whose dispatch span is what nodes receive as W3C `traceparent`."""

import asyncio
import random
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from gridserve.catalog import model_spec
from gridserve.gateway.lifecycle import Finished, Lifecycle, NodeWork, Scope, Settled, Subscriber, Timing
from gridserve.gateway.lifecycle.tracing import TracingSubscriber, tracer_provider
from gridserve.scheduler import default_profile, schedule
from gridserve.sim.grid import SimConfig, build_nodes
from gridserve.types import NodeId
from gridserve.types.scheduling import Decision, ScheduleRequest

NOW = 1_700_000_000.0


def a_decision() -> Decision:
    config = SimConfig(nodes=4, seed=3)
    nodes = build_nodes(config, model_spec(config.model), random.Random(3))
    for n in nodes:
        n.heartbeat_at = NOW
    request = ScheduleRequest(request_id="req-1", model=config.model, prompt_tokens=50, max_tokens=8)
    decision = schedule(request, [n.snapshot() for n in nodes], default_profile(), random.Random(0), NOW)
    assert decision.chosen is not None
    return decision


def finished(decision: Decision, status: str = "ok", error: str = "") -> Finished:
    node = NodeId(decision.chosen or "")
    return Finished(
        decision=decision,
        endpoint="chat",
        status=status,
        error=error,
        served_by=node,
        work=(NodeWork(node_id=node, outcome=status, tokens=8, price_per_mtok=1.0),),
        prompt_tokens=50,
        completion_tokens=8,
        duration_s=0.5,
        timing=Timing(ttft_s=0.1, itl_s=0.02),
    )


class Recorder(Subscriber):
    def __init__(self, calls: list[str], name: str, fail: bool = False) -> None:
        self.calls, self.name, self.fail = calls, name, fail

    def _hear(self, hook: str) -> None:
        self.calls.append(f"{self.name}.{hook}")
        if self.fail:
            raise RuntimeError("subscriber bug")

    def decided(self, scope: Scope, decision: Decision) -> None:
        self._hear("decided")

    def opened(self, scope: Scope, decision: Decision, served_by: str, fields: dict[str, Any]) -> None:
        self._hear("opened")

    def failover(self, scope: Scope, node_id: str, detail: str) -> None:
        self._hear("failover")

    def finished(self, scope: Scope, end: Finished, settled: Settled) -> None:
        self._hear(f"finished:{len(settled.entries)}")


class FakeSettlement:
    def settle(self, end: Finished) -> Settled:
        return Settled(entries=tuple({"node_id": w.node_id, "tokens": w.tokens, "status": "ok"} for w in end.work))


class FakeReceipts:
    def __init__(self) -> None:
        self.committed: list[dict[str, Any]] = []
        self.background: list[dict[str, Any]] = []

    async def commit(self, entries: list[dict[str, Any]]) -> None:
        self.committed += entries

    def write(self, entries: list[dict[str, Any]]) -> None:
        self.background += entries


def lifecycle(subscribers: list[Subscriber]) -> tuple[Lifecycle, FakeReceipts]:
    receipts = FakeReceipts()
    return Lifecycle(FakeSettlement(), receipts, subscribers), receipts  # type: ignore[arg-type]


def test_every_subscriber_hears_every_hook_in_order_and_a_failing_one_breaks_nothing() -> None:
    calls: list[str] = []
    life, receipts = lifecycle([Recorder(calls, "a", fail=True), Recorder(calls, "b")])
    decision = a_decision()
    scope = life.begin("chat")
    life.decided(scope, decision)
    life.opened(scope, decision, decision.chosen or "")
    life.failover(scope, decision.chosen or "", "stalled")
    end = finished(decision)
    settled = life.finished(scope, end)
    asyncio.run(life.commit(end, settled))
    assert calls == [
        "a.decided",
        "b.decided",
        "a.opened",
        "b.opened",
        "a.failover",
        "b.failover",
        "a.finished:1",
        "b.finished:1",
    ]
    assert scope.decided_at is not None and scope.decided_at >= scope.arrived
    assert [e["tokens"] for e in receipts.committed] == [8] and receipts.background == []


@pytest.mark.parametrize("status", ["failed", "cancelled"])
def test_an_answer_that_did_not_finish_is_settled_in_the_background(status: str) -> None:
    life, receipts = lifecycle([])
    decision = a_decision()
    scope = life.begin("text")
    end = finished(decision, status=status, error="node failed")
    asyncio.run(life.commit(end, life.finished(scope, end)))
    assert receipts.committed == [] and [e["tokens"] for e in receipts.background] == [8]


@pytest.fixture(autouse=True)
def no_current_span() -> Iterator[None]:
    """Each test starts with no current span, and one that fails midway leaves none behind."""
    token = otel_context.attach(otel_context.Context())
    yield
    otel_context.detach(token)


def tracing() -> tuple[TracingSubscriber, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = tracer_provider(SimpleSpanProcessor(exporter))
    return TracingSubscriber(provider.get_tracer("test")), exporter


def test_a_request_is_one_trace_and_its_dispatch_span_goes_to_the_node_as_traceparent() -> None:
    sub, exporter = tracing()
    life, _ = lifecycle([sub])
    decision = a_decision()
    scope = life.begin("chat")
    life.decided(scope, decision)
    carrier: dict[str, str] = {}
    propagate.inject(carrier)  # what the node transport does for each attempt
    current = trace.get_current_span().get_span_context()
    assert carrier["traceparent"] == f"00-{current.trace_id:032x}-{current.span_id:016x}-{current.trace_flags:02x}"
    assert current.trace_flags.sampled
    life.opened(scope, decision, decision.chosen or "", attempts=[{}, {}], hedged=True, hedge_delay_s=0.05)
    after: dict[str, str] = {}
    propagate.inject(after)
    assert after == {}  # the node has been called: nothing of this request stays current
    life.failover(scope, decision.chosen or "", "stalled: no token for 1.00 s")
    life.finished(scope, finished(decision))
    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert set(spans) == {"gridserve.request", "decide", "dispatch"}
    root, decide, dispatch = spans["gridserve.request"], spans["decide"], spans["dispatch"]
    assert dispatch.context.span_id == current.span_id
    assert {s.context.trace_id for s in spans.values()} == {current.trace_id}
    assert decide.parent is not None and decide.parent.span_id == root.context.span_id
    assert dispatch.parent is not None and dispatch.parent.span_id == root.context.span_id
    assert root.start_time is not None and decide.start_time == root.start_time == scope.arrived_ns
    assert dispatch.attributes is not None and dispatch.attributes["gridserve.attempts"] == 2
    assert dispatch.attributes["gridserve.hedged"] is True
    assert [e.name for e in root.events] == ["first_token", "failover"]
    assert root.attributes is not None and root.attributes["gridserve.status"] == "ok"
    assert root.attributes["gen_ai.usage.output_tokens"] == 8
    assert root.status.status_code != StatusCode.ERROR


def test_a_request_no_node_took_ends_its_trace_with_an_error() -> None:
    sub, exporter = tracing()
    life, _ = lifecycle([sub])
    decision = a_decision()
    scope = life.begin("text")
    life.decided(scope, decision)
    life.not_opened(scope, decision, "every node tried failed before the first token")
    assert trace.get_current_span().get_span_context().is_valid is False
    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert spans["gridserve.request"].status.status_code == StatusCode.ERROR
    assert spans["dispatch"].status.description == "every node tried failed before the first token"
