"""Tracing end to end: a gateway started with `--otlp-endpoint` sends each request's trace to an OTLP/HTTP
collector (a stand-in on 127.0.0.1 that keeps what it is sent), and the node receives the dispatch span as its
W3C `traceparent`."""

import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pytest
from openai import OpenAI
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from tests.conftest import API_KEY, make_grid

from gridserve.catalog.models import TINY_MODEL
from gridserve.cli.grid import LocalGrid, free_port_block


class Collector(BaseHTTPRequestHandler):
    received: ClassVar[list[ExportTraceServiceRequest]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length", "0")))
        if self.path == "/v1/traces":
            request = ExportTraceServiceRequest()
            request.ParseFromString(body)
            self.received.append(request)
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def collector() -> Iterator[tuple[str, list[ExportTraceServiceRequest]]]:
    received: ClassVar[list[ExportTraceServiceRequest]] = []
    handler = type("Handler", (Collector,), {"received": received})
    server = ThreadingHTTPServer(("127.0.0.1", free_port_block(1)), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1/traces", received
    finally:
        server.shutdown()
        server.server_close()


def test_each_request_is_one_trace_at_the_collector_and_the_node_gets_its_traceparent(
    tmp_path: Path, collector: tuple[str, list[ExportTraceServiceRequest]]
) -> None:
    endpoint, received = collector
    grid: LocalGrid = make_grid(
        tmp_path,
        ["tiny"],
        threads=1,
        extra_gateway_args=["--otlp-endpoint", endpoint],
        extra_node_args=["--log-level", "debug"],
    )
    try:
        grid.start(timeout_s=120)
        client = OpenAI(base_url=grid.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)
        raw = client.chat.completions.with_raw_response.create(
            model=TINY_MODEL, messages=[{"role": "user", "content": "trace me"}], max_tokens=8
        )
        answer = raw.parse()
        request_id = answer.id
    finally:
        grid.stop()  # the gateway sends the spans it still holds as it stops
    deadline = time.monotonic() + 10
    while not received and time.monotonic() < deadline:
        time.sleep(0.1)
    spans = [
        (resource.resource, span)
        for export in received
        for resource in export.resource_spans
        for scope in resource.scope_spans
        for span in scope.spans
    ]
    by_name = {span.name: span for _, span in spans}
    assert set(by_name) == {"gridserve.request", "decide", "dispatch"}
    root, dispatch = by_name["gridserve.request"], by_name["dispatch"]
    assert {span.trace_id for _, span in spans} == {root.trace_id}
    assert dispatch.parent_span_id == root.span_id == by_name["decide"].parent_span_id
    attributes = {a.key: a.value for a in root.attributes}
    assert attributes["gridserve.request_id"].string_value == request_id
    assert attributes["gridserve.status"].string_value == "ok"
    assert answer.usage is not None and answer.usage.completion_tokens >= 1
    assert attributes["gen_ai.usage.output_tokens"].int_value == answer.usage.completion_tokens
    assert [e.name for e in root.events] == ["first_token"]
    service = {a.key: a.value.string_value for a in spans[0][0].attributes}["service.name"]
    assert service == "gridserve-gateway"
    traceparent = f"00-{root.trace_id.hex()}-{dispatch.span_id.hex()}-"
    node_log = (tmp_path / "logs" / "node-0.log").read_text()
    assert traceparent in node_log  # the node was called inside the dispatch span
