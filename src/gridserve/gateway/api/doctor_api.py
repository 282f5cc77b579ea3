"""`GET /admin/doctor`: the latency doctor's report, built from what the gateway knows of each node."""

import time
from collections.abc import Callable, Iterable
from typing import Any

from fastapi import FastAPI, Request

from gridserve.catalog import model_spec
from gridserve.catalog.models import UnknownModel
from gridserve.diagnostics.doctor import NodeView, RequestTiming, diagnose
from gridserve.gateway.api.errors import APIError, bad_request
from gridserve.gateway.ops.outcomes import RequestTrace, Traces
from gridserve.gateway.registry.membership import Membership, NodeRecord
from gridserve.perfmodel import predict
from gridserve.reliability import JOB_FAILURES

RECENT = 10
"""Requests listed per node with their time split."""


def _roofline(record: NodeRecord, model: str) -> tuple[float | None, float | None]:
    """Uncalibrated (TTFT, ITL) of a 128-token prompt on the node's hardware, when the catalogue knows both."""
    offer = next((o for o in record.capability.models if o.name == model), None)
    try:
        spec, hw = model_spec(model), record.static.hw
    except UnknownModel:
        return None, None
    if offer is None or hw is None:
        return None, None
    pred = predict(spec, hw, prompt_tokens=128, dtype=offer.dtype, quantization=offer.quantization)
    return pred.ttft_s, pred.itl_s


def _timing(t: RequestTrace) -> RequestTiming:
    return RequestTiming(
        t.ttft_s,
        t.itl_s,
        t.network_s,
        t.queue_s,
        t.prefill_s,
        t.decode_s,
        cached_share=t.cached_tokens / t.prompt_tokens if t.prompt_tokens else None,
        expected_cached_share=t.expected_cached_tokens / t.prompt_estimate if t.prompt_estimate else None,
    )


def node_view(membership: Membership, traces: Traces, record: NodeRecord, since: float) -> NodeView:
    cap, tel = record.capability, record.telemetry
    model = cap.models[0].name if cap.models else ""
    ttft, itl = _roofline(record, model)
    failures = [
        e.detail for e in membership.book.events(cap.node_id, kinds=set(JOB_FAILURES), limit=200) if e.at >= since
    ]
    memory = tel.memory_used_bytes / tel.memory_total_bytes if tel and tel.memory_total_bytes else None
    return NodeView(
        node_id=cap.node_id,
        endpoint=cap.endpoint,
        model=model,
        accelerator=cap.hardware.accelerator,
        state=record.state.value,
        rtt_ms=record.rtt_ms,
        probe_failures=record.probe_failures,
        last_probe_error=record.last_probe_error,
        heartbeat_age_s=membership.clock() - record.last_heartbeat,
        heartbeat_interval_s=membership.config.heartbeat_interval_s,
        utilization=tel.utilization if tel else None,
        memory_share=memory,
        temperature_c=tel.temperature_c if tel else None,
        clock_ratio=tel.clock_ratio if tel else None,
        errors=[e.model_dump() for e in (tel.errors if tel else ()) if e.at >= since],
        failures=failures,
        requests=[_timing(t) for t in traces.for_node(cap.node_id, since) if t.status == "ok"],
        roofline_ttft_s=ttft,
        roofline_itl_s=itl,
        stages=1,
        faults=tel.faults if tel else (),
    )


def report(membership: Membership, traces: Traces, *, node_id: str | None, window_s: float) -> dict[str, Any]:
    now = membership.clock()
    since = now - window_s
    views = {nid: node_view(membership, traces, r, since) for nid, r in membership.nodes.items()}
    out = []
    for nid, view in views.items():
        if node_id is not None and nid != node_id:
            continue
        peers = [p for p in views.values() if p.model == view.model and p.accelerator == view.accelerator]
        diagnosis = diagnose(view, peers)
        recent = [t for t in traces.for_node(nid, since)][-RECENT:]
        out.append(
            {
                "node_id": nid,
                "endpoint": view.endpoint,
                "model": view.model,
                "state": view.state,
                "rtt_ms": None if view.rtt_ms is None else round(view.rtt_ms, 3),
                "health": {
                    "probe_failures": view.probe_failures,
                    "last_probe_error": view.last_probe_error,
                    "heartbeat_age_s": round(view.heartbeat_age_s, 3),
                },
                "telemetry": {
                    "utilization": view.utilization,
                    "memory_pct": None if view.memory_share is None else round(100 * view.memory_share, 1),
                    "temperature_c": view.temperature_c,
                    "clock_ratio": view.clock_ratio,
                    "throttled": view.clock_ratio is not None and view.clock_ratio < 0.8,
                    "faults": list(view.faults),
                },
                "errors": view.errors,
                "failures": view.failures[:RECENT],
                "latency": {
                    "requests": len(view.requests),
                    **{
                        f"{k}_p50_s": view.median(f"{k}_s")
                        for k in ("ttft", "itl", "network", "queue", "prefill", "decode")
                    },
                },
                "requests": [t.as_dict() for t in recent],
                "diagnosis": diagnosis.as_dict(),
            }
        )
    return {"generated_at": time.time(), "window_s": window_s, "nodes": out}


def pipeline_report(runs: Iterable[dict[str, Any]], since: float) -> list[dict[str, Any]]:
    """The recent pipeline runs' diagnoses: where each token's time went, stage by stage."""
    return [
        {
            "session": run["session"],
            "model": run["model"],
            "chain": run["chain"],
            "stages": run["stages"],
            "replans": run["replans"],
            "diagnosis": run["diagnosis"],
        }
        for run in runs
        if run.get("finished_at", 0.0) >= since
    ][-RECENT:]


def add_doctor_routes(
    app: FastAPI,
    membership: Membership,
    traces: Traces,
    require_admin: Any,
    pipeline_runs: Callable[[], Iterable[dict[str, Any]]] = list,
) -> None:
    @app.get("/admin/doctor")
    async def doctor(request: Request, node_id: str | None = None, window_s: float = 120.0) -> dict[str, Any]:
        require_admin(request)
        if not 0 < window_s <= 86_400:
            raise bad_request("window_s must be in (0, 86400]", param="window_s")
        if node_id is not None and node_id not in membership.nodes:
            raise APIError(404, f"No node {node_id}.", code="not_found")
        found = report(membership, traces, node_id=node_id, window_s=window_s)
        runs = pipeline_report(pipeline_runs(), time.time() - window_s)
        if node_id is not None:
            runs = [r for r in runs if any(c["node_id"] == node_id for c in r["chain"])]
        return {**found, "pipelines": runs}
