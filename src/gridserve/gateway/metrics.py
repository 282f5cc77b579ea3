"""Prometheus metrics of the gateway."""

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "gridserve_requests_total",
            "OpenAI API requests by endpoint and outcome",
            ["endpoint", "status"],
            registry=self.registry,
        )
        self.ttft = Histogram(
            "gridserve_ttft_seconds",
            "Time to first token seen by the gateway",
            ["model"],
            registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        self.tokens = Counter(
            "gridserve_completion_tokens_total", "Generated tokens by node", ["node"], registry=self.registry
        )
        self.rejections = Counter(
            "gridserve_protocol_rejections_total", "Refused node messages by reason", ["reason"], registry=self.registry
        )
        self.node_states = Gauge("gridserve_nodes", "Nodes by state", ["state"], registry=self.registry)
        self.retries = Counter(
            "gridserve_dispatch_retries_total",
            "Requests moved to another node before the first token",
            registry=self.registry,
        )
