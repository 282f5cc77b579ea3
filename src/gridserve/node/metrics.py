"""Prometheus metrics of a node agent (served at the node's `/metrics`)."""

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from gridserve.observability import ITL_BUCKETS, LATENCY_BUCKETS


class NodeMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "gridserve_node_requests_total", "Generations by model and outcome", ["model", "status"], registry=r
        )
        self.ttft = Histogram(
            "gridserve_node_ttft_seconds",
            "Time to first token on this node",
            ["model"],
            registry=r,
            buckets=LATENCY_BUCKETS,
        )
        self.itl = Histogram(
            "gridserve_node_itl_seconds", "Time between tokens on this node", ["model"], registry=r, buckets=ITL_BUCKETS
        )
        self.tokens = Counter("gridserve_node_tokens_total", "Generated tokens", ["model"], registry=r)
        self.errors = Counter("gridserve_node_errors_total", "Errors by kind", ["kind"], registry=r)
        self.active = Gauge("gridserve_node_active_requests", "Generations running", registry=r)
        self.faults = Gauge("gridserve_node_faults_active", "Injected faults in effect", registry=r)
