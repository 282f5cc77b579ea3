"""Prometheus metrics of the gateway (served at `/metrics`)."""

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from gridserve.gateway.ops.gcwatch import GC_BUCKETS
from gridserve.gateway.ops.looplag import LAG_BUCKETS
from gridserve.observability import ITL_BUCKETS, LATENCY_BUCKETS


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "gridserve_requests_total",
            "OpenAI API requests by endpoint and outcome",
            ["endpoint", "status"],
            registry=r,
        )
        self.ttft = Histogram(
            "gridserve_ttft_seconds",
            "Time to first token seen by the gateway, by model and serving node",
            ["model", "node"],
            registry=r,
            buckets=LATENCY_BUCKETS,
        )
        self.itl = Histogram(
            "gridserve_itl_seconds",
            "Mean inter-token latency of a request, by model and node",
            ["model", "node"],
            registry=r,
            buckets=ITL_BUCKETS,
        )
        self.gc_pause = Histogram(
            "gridserve_gc_pause_seconds",
            "Pauses of the cyclic garbage collector (the event loop stops meanwhile), by generation",
            ["generation"],
            registry=r,
            buckets=GC_BUCKETS,
        )
        self.loop_lag = Histogram(
            "gridserve_event_loop_lag_seconds",
            "How much later than asked the gateway's event loop woke a sampler (the gateway's own share of latency)",
            registry=r,
            buckets=LAG_BUCKETS,
        )
        self.tokens = Counter("gridserve_completion_tokens_total", "Generated tokens by node", ["node"], registry=r)
        self.decisions = Counter(
            "gridserve_decisions_total", "Scheduling decisions by outcome (placed / none)", ["outcome"], registry=r
        )
        self.filter_rejections = Counter(
            "gridserve_filter_rejections_total",
            "Nodes a scheduling filter removed from a request's candidates, by filter",
            ["filter"],
            registry=r,
        )
        self.rejections = Counter(
            "gridserve_protocol_rejections_total", "Refused node messages by reason", ["reason"], registry=r
        )
        self.node_states = Gauge("gridserve_nodes", "Nodes by state", ["state"], registry=r)
        self.retries = Counter(
            "gridserve_dispatch_retries_total", "Requests moved to another node before the first token", registry=r
        )
        self.hedges = Counter(
            "gridserve_hedges_total", "Requests also sent to the runner-up because the first token was late", registry=r
        )
        self.failovers = Counter(
            "gridserve_failovers_total", "Generations continued on another node mid-stream", registry=r
        )
        self.preloads = Counter(
            "gridserve_preloads_total", "Nodes asked to load a model before it is needed", ["model"], registry=r
        )
        self.audits = Counter(
            "gridserve_audits_total", "Completions re-executed by the verifier, by result", ["result"], registry=r
        )
        self.redundancy = Counter(
            "gridserve_redundancy_checks_total",
            "Answers of models the verifier cannot run, checked against other nodes' (gateway/integrity/redundancy.py)"
            ", by result: agree, disagree_resolved, disagree_unresolved, error, no_peer",
            ["result"],
            registry=r,
        )
        self.incidents = Counter(
            "gridserve_incidents_total",
            "Reliability incidents (quarantines, bans) by severity",
            ["severity"],
            registry=r,
        )
