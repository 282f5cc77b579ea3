"""OpenTelemetry tracing as one more lifecycle subscriber (off by default; `gridserve gateway --otlp-endpoint`).

Each request is one trace: a `gridserve.request` span from arrival to end, with a `decide` span (the scheduler),
a `dispatch` span (from the decision to the first token: retries and hedges inside it), and events for the first
token and each failover. While the dispatch span is open it is the current span of the request's task, so the
node transport injects its W3C `traceparent` into the node request (`opentelemetry.propagate.inject`), and a
node's own spans (or logs) join the gateway's trace.
"""

import contextlib
import time
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.trace import Span, Status, StatusCode, Tracer

from gridserve.gateway.lifecycle.record import Finished, Settled
from gridserve.gateway.lifecycle.subscribers import Scope, Subscriber
from gridserve.types.scheduling import Decision

KEY = "otel"


class _Spans:
    """The open spans of one request, and the context token that made its dispatch span current."""

    __slots__ = ("dispatch", "root", "token")

    def __init__(self, root: Span) -> None:
        self.root = root
        self.dispatch: Span | None = None
        self.token: object | None = None


class TracingSubscriber(Subscriber):
    def __init__(self, tracer: Tracer) -> None:
        self.tracer = tracer

    def decided(self, scope: Scope, decision: Decision) -> None:
        now = time.time_ns()
        root = self.tracer.start_span(
            "gridserve.request",
            start_time=scope.arrived_ns,
            attributes={
                "gridserve.endpoint": scope.endpoint,
                "gridserve.request_id": decision.request_id,
                "gridserve.decision_id": decision.decision_id,
                "gen_ai.request.model": decision.model,
            },
        )
        spans = _Spans(root)
        scope.state[KEY] = spans
        parent = trace.set_span_in_context(root)
        decide = self.tracer.start_span("decide", context=parent, start_time=scope.arrived_ns)
        decide.set_attributes(
            {
                "gridserve.chosen": decision.chosen or "",
                "gridserve.eligible": decision.eligible_count,
                "gridserve.rejected": decision.rejected_count,
            }
        )
        decide.end(end_time=now)
        spans.dispatch = self.tracer.start_span("dispatch", context=parent, start_time=now)
        spans.token = otel_context.attach(trace.set_span_in_context(spans.dispatch))

    def not_opened(self, scope: Scope, decision: Decision | None, error: str) -> None:
        spans = self._release(scope)
        if spans is None:
            return
        for span in (spans.dispatch, spans.root):
            if span is not None:
                span.set_status(Status(StatusCode.ERROR, error))
                span.end()

    def opened(self, scope: Scope, decision: Decision, served_by: str, fields: dict[str, Any]) -> None:
        spans = self._release(scope)
        if spans is None:
            return
        if spans.dispatch is not None:
            attempts = fields.get("attempts") or []
            spans.dispatch.set_attributes(
                {"gridserve.served_by": served_by, "gridserve.attempts": len(attempts), **_hedge(fields)}
            )
            spans.dispatch.end()
            spans.dispatch = None
        spans.root.add_event("first_token", {"gridserve.served_by": served_by})

    def failover(self, scope: Scope, node_id: str, detail: str) -> None:
        spans = scope.state.get(KEY)
        if isinstance(spans, _Spans):
            spans.root.add_event("failover", {"gridserve.failed_node": node_id, "gridserve.detail": detail[:300]})

    def finished(self, scope: Scope, end: Finished, settled: Settled) -> None:
        spans = self._release(scope)
        if spans is None:
            return
        root = spans.root
        root.set_attributes(
            {
                "gridserve.status": end.status,
                "gridserve.served_by": end.served_by,
                "gridserve.failovers": end.failovers,
                "gridserve.pipeline": end.pipeline,
                "gen_ai.usage.input_tokens": end.prompt_tokens,
                "gen_ai.usage.output_tokens": end.completion_tokens,
            }
        )
        if end.timing.ttft_s is not None:
            root.set_attribute("gridserve.ttft_s", end.timing.ttft_s)
        if end.status == "failed":
            root.set_status(Status(StatusCode.ERROR, end.error))
        root.end()
        scope.state.pop(KEY, None)

    @staticmethod
    def _release(scope: Scope) -> _Spans | None:
        """The request's spans, with the dispatch span no longer current (the node has been called)."""
        spans = scope.state.get(KEY)
        if not isinstance(spans, _Spans):
            return None
        if spans.token is not None:
            token, spans.token = spans.token, None
            with contextlib.suppress(ValueError):  # attached in another task's context: nothing is current here
                otel_context.detach(token)  # type: ignore[arg-type]
        return spans


def _hedge(fields: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"gridserve.hedged": bool(fields.get("hedged"))}
    if fields.get("hedge_delay_s") is not None:
        out["gridserve.hedge_delay_s"] = float(fields["hedge_delay_s"])
    return out


def tracer_provider(processor: SpanProcessor, service: str = "gridserve-gateway") -> TracerProvider:
    """A provider of the gateway's own (not the process-global one: tests run several gateways)."""
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    provider.add_span_processor(processor)
    return provider


def otlp_provider(endpoint: str, service: str = "gridserve-gateway") -> TracerProvider:
    """Spans batched to an OTLP/HTTP collector at `endpoint` (e.g. http://127.0.0.1:4318/v1/traces)."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    exporter: SpanExporter = OTLPSpanExporter(endpoint=endpoint)
    return tracer_provider(BatchSpanProcessor(exporter), service)


__all__ = ["TracingSubscriber", "otlp_provider", "tracer_provider"]
