"""The latency doctor: tells network lag from node failure from a saturated, memory-starved or throttled
device, and from pipeline overhead, each verdict with its evidence and the next check to run.

Pure logic over a `NodeView` (what the gateway knows of one node: probe RTT, state, telemetry, error log,
recent request timings split into network / queue / prefill / decode, recent failures) and the views of
its peers (nodes serving the same model on the same hardware), which give the baseline a node is compared
with. The rules, in order (the first that matches is the verdict; every matching rule's evidence is kept):

1. node failure: the node is down or ejected, its probes fail, or recent jobs failed, stalled or timed out;
   or its error log has CUDA / out-of-memory / timeout errors in the window;
2. thermal throttling: temperature >= 85 C or clock ratio < 0.8;
3. memory pressure: device memory >= 90 % used;
4. pipeline overhead: a multi-stage route with low utilisation (< 50 %) and TTFT or ITL >= 2x baseline
   (stages waiting on each other, not a busy device);
5. compute saturation: ITL >= 2x the baseline (peers' median, else the uncalibrated roofline);
6. network lag / discovery delay: TTFT >= 2x baseline with normal ITL, and the network share of TTFT is
   high or the probe RTT is >= 3x the peers' (>= 20 ms); or heartbeats arrive late;
7. prefix cache mismatch: over requests where the gateway's prefix index expected reuse or the node reported
   some, the share of prompt tokens the node says it took from its cache is >= 25 points off what the index
   expected (a cache smaller than advertised or evicting early; or reuse claimed that the gateway never sent);
8. healthy.
"""

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

SLOW = 2.0
"""A latency this many times its baseline is abnormal."""
HOT_C = 85.0
THROTTLED_CLOCK = 0.8
MEMORY_FULL = 0.90
IDLE_UTILISATION = 0.5
RTT_FACTOR, RTT_FLOOR_MS = 3.0, 20.0
NETWORK_SHARE = 0.5
FAILURE_SHARE = 0.2
REUSE_GAP = 0.25
"""Reported and expected shares of the prompt taken from the prefix cache this far apart are a mismatch."""
REUSE_SAMPLES = 8
"""Requests with expected or reported reuse before the prefix-cache rule judges."""


class Cause(StrEnum):
    NODE_FAILURE = "node_failure"
    THERMAL_THROTTLING = "thermal_throttling"
    MEMORY_PRESSURE = "memory_pressure"
    PIPELINE_OVERHEAD = "pipeline_overhead"
    COMPUTE_SATURATION = "compute_saturation"
    NETWORK = "network"
    PREFIX_CACHE = "prefix_cache_mismatch"
    HEALTHY = "healthy"


NEXT_CHECK = {
    Cause.NODE_FAILURE: "read the node's log around the failures (its `gridserve node` output) and `curl "
    "{endpoint}/health`; a node that comes back serves on probation first",
    Cause.THERMAL_THROTTLING: "on the node: `nvidia-smi -q -d PERFORMANCE,TEMPERATURE` (clocks throttle reasons); "
    "check fans, airflow and the power limit",
    Cause.MEMORY_PRESSURE: "on the node: `nvidia-smi --query-gpu=memory.used,memory.total --format=csv`; lower the "
    "context or batch size, or move a model off the node",
    Cause.COMPUTE_SATURATION: "compare gridserve_node_itl_seconds on {endpoint}/metrics with its peers; look for "
    "other work on the device (`nvidia-smi`) and lower the node's concurrency",
    Cause.PIPELINE_OVERHEAD: "compare the per-stage times of the route; put the stages on nodes with lower RTT "
    "between them, or use fewer stages",
    Cause.NETWORK: "from the gateway host: `mtr {host}` (or ping) and compare with the probe RTT; check the "
    "node's uplink, VPN or relay",
    Cause.PREFIX_CACHE: "on the node: its `--prefix-cache-mb` and the cache figures it logs; compare "
    "`usage.prompt_tokens_details.cached_tokens` of a repeated long prompt sent to it twice",
    Cause.HEALTHY: "nothing to fix; run `gridserve doctor` again while the latency is high",
}


@dataclass(frozen=True)
class RequestTiming:
    ttft_s: float
    itl_s: float | None
    network_s: float | None
    queue_s: float | None
    prefill_s: float | None
    decode_s: float | None
    cached_share: float | None = None
    """Share of the prompt the node said it took from its prefix cache (None: not known)."""
    expected_cached_share: float | None = None
    """Share of the prompt the gateway's prefix index expected it to hold."""


@dataclass
class NodeView:
    node_id: str
    endpoint: str
    model: str
    accelerator: str
    state: str
    rtt_ms: float | None = None
    probe_failures: int = 0
    last_probe_error: str = ""
    heartbeat_age_s: float = 0.0
    heartbeat_interval_s: float = 2.0
    utilization: float | None = None
    memory_share: float | None = None
    temperature_c: float | None = None
    clock_ratio: float | None = None
    errors: list[dict[str, Any]] = field(default_factory=list)
    """The node's error log in the window: {at, kind, message}."""
    failures: list[str] = field(default_factory=list)
    """Gateway-observed failures in the window (details)."""
    requests: list[RequestTiming] = field(default_factory=list)
    roofline_itl_s: float | None = None
    roofline_ttft_s: float | None = None
    stages: int = 1
    faults: tuple[str, ...] = ()

    def median(self, name: str) -> float | None:
        values = [getattr(r, name) for r in self.requests if getattr(r, name) is not None]
        return statistics.median(values) if values else None


@dataclass(frozen=True)
class Diagnosis:
    cause: Cause
    summary: str
    evidence: tuple[str, ...]
    next_check: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "cause": self.cause.value,
            "summary": self.summary,
            "evidence": list(self.evidence),
            "next_check": self.next_check,
        }


def _peer_median(peers: Sequence[NodeView], name: str) -> float | None:
    values = [v for v in (p.median(name) for p in peers) if v is not None]
    return statistics.median(values) if values else None


def _peer_rtt(peers: Sequence[NodeView]) -> float | None:
    values = [p.rtt_ms for p in peers if p.rtt_ms is not None]
    return statistics.median(values) if values else None


def _ms(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds * 1e3:.1f} ms"


class _Exam:
    """One node's examination: each rule adds evidence when it matches."""

    def __init__(self, view: NodeView, peers: Sequence[NodeView]) -> None:
        self.v = view
        self.peers = [p for p in peers if p.node_id != view.node_id]
        self.found: dict[Cause, list[str]] = {}
        self.ttft = view.median("ttft_s")
        self.itl = view.median("itl_s")
        self.base_ttft = _peer_median(self.peers, "ttft_s") or view.roofline_ttft_s
        self.base_itl = _peer_median(self.peers, "itl_s") or view.roofline_itl_s

    def add(self, cause: Cause, line: str) -> None:
        self.found.setdefault(cause, []).append(line)

    def slow(self, value: float | None, base: float | None) -> bool:
        return value is not None and base is not None and base > 0 and value >= SLOW * base

    def failure(self) -> None:
        v = self.v
        if v.state in ("down", "ejected"):
            self.add(Cause.NODE_FAILURE, f"the node is {v.state}")
        if v.probe_failures:
            self.add(Cause.NODE_FAILURE, f"{v.probe_failures} health probe(s) failed in a row: {v.last_probe_error}")
        total = len(v.requests) + len(v.failures)
        if v.failures and (len(v.failures) >= 2 or len(v.failures) / total >= FAILURE_SHARE):
            self.add(Cause.NODE_FAILURE, f"{len(v.failures)} of {total} recent jobs failed; last: {v.failures[0]}")
        bad = [e for e in v.errors if e.get("kind") in ("oom", "cuda", "timeout", "engine")]
        if bad and not (all(e.get("kind") == "oom" for e in bad) and self.memory_full()):
            kinds = sorted({str(e.get("kind")) for e in bad})
            self.add(
                Cause.NODE_FAILURE,
                f"{len(bad)} error(s) in its log ({', '.join(kinds)}); last: {bad[-1].get('message')}",
            )

    def memory_full(self) -> bool:
        return self.v.memory_share is not None and self.v.memory_share >= MEMORY_FULL

    def thermal(self) -> None:
        v = self.v
        if v.temperature_c is not None and v.temperature_c >= HOT_C:
            self.add(
                Cause.THERMAL_THROTTLING, f"temperature {v.temperature_c:.0f} C (throttling starts near {HOT_C:.0f} C)"
            )
        if v.clock_ratio is not None and v.clock_ratio < THROTTLED_CLOCK:
            self.add(Cause.THERMAL_THROTTLING, f"SM clock at {v.clock_ratio:.0%} of its maximum")

    def memory(self) -> None:
        if self.memory_full():
            assert self.v.memory_share is not None
            line = f"device memory {self.v.memory_share:.0%} used (>= {MEMORY_FULL:.0%})"
            oom = [e for e in self.v.errors if e.get("kind") == "oom"]
            self.add(Cause.MEMORY_PRESSURE, line + (f"; {len(oom)} out-of-memory error(s)" if oom else ""))

    def saturation(self) -> None:
        itl, base = self.itl, self.base_itl
        if itl is not None and base is not None and self.slow(itl, base):
            util = "" if self.v.utilization is None else f"; utilisation {self.v.utilization:.0%}"
            self.add(Cause.COMPUTE_SATURATION, f"ITL {_ms(itl)} is {itl / base:.1f}x the baseline {_ms(base)}{util}")

    def pipeline(self) -> None:
        v = self.v
        idle = v.utilization is not None and v.utilization < IDLE_UTILISATION
        if v.stages > 1 and idle and (self.slow(self.ttft, self.base_ttft) or self.slow(self.itl, self.base_itl)):
            self.add(
                Cause.PIPELINE_OVERHEAD,
                f"{v.stages}-stage route at {v.utilization:.0%} utilisation "
                f"with TTFT {_ms(self.ttft)} / ITL {_ms(self.itl)}",
            )

    def network(self) -> None:
        v = self.v
        if v.heartbeat_age_s > 1.5 * v.heartbeat_interval_s and v.state not in ("down",):
            self.add(
                Cause.NETWORK, f"last heartbeat {v.heartbeat_age_s:.1f} s ago (interval {v.heartbeat_interval_s:.1f} s)"
            )
        peer_rtt = _peer_rtt(self.peers)
        if (
            v.rtt_ms is not None
            and v.rtt_ms >= RTT_FLOOR_MS
            and (peer_rtt is None or v.rtt_ms >= RTT_FACTOR * max(peer_rtt, 1.0))
        ):
            self.add(
                Cause.NETWORK,
                f"probe RTT {v.rtt_ms:.1f} ms" + ("" if peer_rtt is None else f" (peers {peer_rtt:.1f} ms)"),
            )
        network = v.median("network_s")
        if self.slow(self.ttft, self.base_ttft) and not self.slow(self.itl, self.base_itl):
            share = network / self.ttft if network is not None and self.ttft else None
            if share is not None and share >= NETWORK_SHARE:
                self.add(
                    Cause.NETWORK,
                    f"TTFT {_ms(self.ttft)} vs baseline {_ms(self.base_ttft)}, {share:.0%} of it on the network "
                    f"(queue {_ms(v.median('queue_s'))}, prefill {_ms(v.median('prefill_s'))}); "
                    f"ITL normal {_ms(self.itl)}",
                )

    def prefix_cache(self) -> None:
        pairs = [
            (r.cached_share, r.expected_cached_share)
            for r in self.v.requests
            if r.cached_share is not None
            and r.expected_cached_share is not None
            and (r.cached_share > 0 or r.expected_cached_share > 0)
        ]
        if len(pairs) < REUSE_SAMPLES:
            return
        reported = statistics.fmean(p[0] for p in pairs)
        expected = statistics.fmean(p[1] for p in pairs)
        if abs(reported - expected) >= REUSE_GAP:
            self.add(
                Cause.PREFIX_CACHE,
                f"over {len(pairs)} requests with prefix reuse it reported {reported:.0%} of prompt tokens cached; "
                f"the gateway's prefix index expected {expected:.0%}",
            )

    def verdict(self) -> Diagnosis:
        order = list(Cause)
        for cause in order[:-1]:
            if cause in self.found:
                lines = tuple(self.found[cause]) + tuple(
                    f"also: {line}"
                    for other in order
                    if other != cause and other in self.found
                    for line in self.found[other]
                )
                return Diagnosis(cause, SUMMARY[cause], lines, self._next(cause))
        rtt = "n/a" if self.v.rtt_ms is None else f"{self.v.rtt_ms:.1f} ms"
        evidence = (
            f"TTFT {_ms(self.ttft)} (baseline {_ms(self.base_ttft)}), "
            f"ITL {_ms(self.itl)} (baseline {_ms(self.base_itl)})",
            f"probe RTT {rtt}, {len(self.v.requests)} recent request(s)",
        )
        return Diagnosis(Cause.HEALTHY, SUMMARY[Cause.HEALTHY], evidence, self._next(Cause.HEALTHY))

    def _next(self, cause: Cause) -> str:
        host = self.v.endpoint.split("://")[-1].split(":")[0].split("/")[0]
        return NEXT_CHECK[cause].format(endpoint=self.v.endpoint, host=host)


SUMMARY = {
    Cause.NODE_FAILURE: "node failure: it fails, stalls or times out",
    Cause.THERMAL_THROTTLING: "thermal throttling: the device is hot and its clocks are cut",
    Cause.MEMORY_PRESSURE: "memory pressure: device memory is nearly full",
    Cause.COMPUTE_SATURATION: "compute saturation: tokens come much slower than on comparable nodes",
    Cause.PIPELINE_OVERHEAD: "pipeline overhead: stages wait on each other (low utilisation, high latency)",
    Cause.NETWORK: "network lag or discovery delay: slow first token, normal decode",
    Cause.PREFIX_CACHE: "prefix cache mismatch: the node reuses far other shares of prompts than it was sent",
    Cause.HEALTHY: "healthy",
}


def diagnose(view: NodeView, peers: Sequence[NodeView]) -> Diagnosis:
    exam = _Exam(view, peers)
    exam.failure()
    exam.thermal()
    exam.memory()
    exam.saturation()
    exam.pipeline()
    exam.network()
    exam.prefix_cache()
    return exam.verdict()


__all__ = ["Cause", "Diagnosis", "NodeView", "RequestTiming", "diagnose"]
