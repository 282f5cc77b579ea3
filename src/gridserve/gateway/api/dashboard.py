"""The operator dashboard: `GET /dashboard` (a static page that asks for the admin token) and
`GET /admin/series` (request rate, TTFT and ITL per model and hardware class, in time buckets, from the
gateway's recent request traces)."""

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from starlette.responses import Response

from gridserve.catalog.hardware import HARDWARE
from gridserve.gateway.api.errors import APIError, bad_request
from gridserve.gateway.ops.outcomes import RequestTrace
from gridserve.types import NodeId

if TYPE_CHECKING:
    from gridserve.gateway.app import Gateway

MAX_WINDOW_S = 86_400.0
MAX_BUCKETS = 720
UNKNOWN = "unknown"

STATIC: dict[str, str] = {
    "dashboard.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
}
HEADERS = {
    "cache-control": "no-store",
    "x-content-type-options": "nosniff",
    # Everything comes from this gateway; no inline script, no third party.
    "content-security-policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
}


@dataclass(frozen=True)
class Hardware:
    """What the charts group by besides the model: the card (catalogue key) and its class."""

    accelerator: str
    hw_class: str


def hardware_of(accelerator: str | None) -> Hardware:
    if accelerator is None:
        return Hardware(UNKNOWN, UNKNOWN)
    spec = HARDWARE.get(accelerator)
    return Hardware(accelerator, spec.hw_class if spec else UNKNOWN)


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in [0, 1]) of the values; None when there are none."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q * len(ordered)))
    return ordered[rank - 1]


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 6)


def _bucket(start: float, bucket_s: float, traces: list[RequestTrace]) -> dict[str, Any]:
    ok = [t for t in traces if t.status == "ok"]
    ttft = [t.ttft_s for t in ok]
    itl = [t.itl_s for t in ok if t.itl_s is not None]
    return {
        "t": start,
        "requests": len(traces),
        "rate": round(len(traces) / bucket_s, 6),
        "errors": len(traces) - len(ok),
        "ttft_p50_s": _round(percentile(ttft, 0.5)),
        "ttft_p95_s": _round(percentile(ttft, 0.95)),
        "itl_p50_s": _round(percentile(itl, 0.5)),
        "itl_p95_s": _round(percentile(itl, 0.95)),
    }


def bucket_edges(now: float, window_s: float, bucket_s: float) -> tuple[float, int]:
    """(start, count): buckets aligned to multiples of bucket_s, the last one holding `now`."""
    count = max(1, math.ceil(window_s / bucket_s))
    end = (math.floor(now / bucket_s) + 1) * bucket_s
    return end - count * bucket_s, count


def series(
    traces: Iterable[RequestTrace],
    hardware: Callable[[str], Hardware],
    *,
    now: float,
    window_s: float,
    bucket_s: float,
) -> list[dict[str, Any]]:
    """Per (model, card) series of `window_s / bucket_s` buckets (oldest first, empty ones included):
    requests, rate (req/s), errors, TTFT and ITL p50/p95 of the successful requests."""
    start, count = bucket_edges(now, window_s, bucket_s)
    grouped: dict[tuple[str, Hardware], list[list[RequestTrace]]] = {}
    for trace in traces:
        index = math.floor((trace.at - start) / bucket_s)
        if not 0 <= index < count:
            continue
        key = (trace.model, hardware(trace.node_id))
        grouped.setdefault(key, [[] for _ in range(count)])[index].append(trace)
    out = []
    for (model, hw), buckets in sorted(grouped.items(), key=lambda kv: (kv[0][0], kv[0][1].accelerator)):
        out.append(
            {
                "model": model,
                "hardware": hw.accelerator,
                "hw_class": hw.hw_class,
                "requests": sum(len(b) for b in buckets),
                "buckets": [_bucket(start + i * bucket_s, bucket_s, b) for i, b in enumerate(buckets)],
            }
        )
    return out


def check_window(window_s: float, bucket_s: float) -> None:
    """Raise an OpenAI-format 400 for a window or bucket the series cannot be built from."""
    if not 0 < window_s <= MAX_WINDOW_S:
        raise bad_request(f"window_s must be in (0, {MAX_WINDOW_S:.0f}]", param="window_s")
    if not 0 < bucket_s <= window_s:
        raise bad_request("bucket_s must be in (0, window_s]", param="bucket_s")
    if window_s / bucket_s > MAX_BUCKETS:
        raise bad_request(f"window_s / bucket_s must be at most {MAX_BUCKETS}", param="bucket_s")


def _static(name: str) -> bytes:
    return resources.files("gridserve.gateway").joinpath("static").joinpath(name).read_bytes()


def add_dashboard_routes(app: FastAPI, gw: "Gateway") -> None:
    def node_hardware(node_id: str) -> Hardware:
        record = gw.membership.nodes.get(NodeId(node_id))
        if record is None:
            return hardware_of(None)
        return Hardware(record.capability.hardware.accelerator, record.static.hw_class)

    @app.get("/dashboard", include_in_schema=False)
    async def dashboard() -> Response:
        """The page itself holds no data: it asks for the admin token and calls the admin API with it."""
        return Response(_static("dashboard.html"), media_type="text/html; charset=utf-8", headers=HEADERS)

    @app.get("/dashboard/{name}", include_in_schema=False)
    async def asset(name: str) -> Response:
        if name not in STATIC:
            raise APIError(404, f"No dashboard asset {name}.", code="not_found")
        return Response(_static(name), media_type=STATIC[name], headers=HEADERS)

    @app.get("/admin/series")
    async def admin_series(request: Request, window_s: float = 600.0, bucket_s: float = 10.0) -> dict[str, Any]:
        gw.require_admin(request)
        check_window(window_s, bucket_s)
        now = time.time()
        found = series(list(gw.traces.items), node_hardware, now=now, window_s=window_s, bucket_s=bucket_s)
        return {"generated_at": now, "window_s": window_s, "bucket_s": bucket_s, "series": found}
