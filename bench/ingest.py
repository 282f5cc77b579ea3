"""Heartbeat ingestion at grid scale: a real gateway (embedded SQLite store) takes signed heartbeats from many
simulated nodes, each heartbeating every `--interval` seconds (phases spread evenly), over HTTP on 127.0.0.1.

The simulated nodes are Ed25519 identities in this process: each registers once (signed capability), then
sends signed heartbeats with fresh telemetry and a rising sequence number. Their `/health` (the gateway probes
nodes) is answered by one small server here. Measured over `--duration` seconds of heartbeats:
- heartbeats_per_s: heartbeats the gateway acknowledged per second;
- ingest_p50_ms / ingest_p99_ms: request to acknowledgement, as the node sees it;
- gateway_cpu_cores: the gateway process's CPU time over the wall time (1.0 = one core busy);
- lag_p99_ms: how late this load generator sent heartbeats against their schedule (if it cannot keep up, the
  offered rate is lower than nominal: reported, not hidden).

Prints JSON: {"runs": [{"nodes", "heartbeats_per_s", "ingest_p99_ms", "gateway_cpu_cores", ...}]}.
Run: `.venv/bin/python bench/ingest.py [--nodes 1000,10000] [--duration 30]`.
"""

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import psutil
from aiohttp import web
from rich.progress import Progress

from gridserve.cli.grid import LocalGrid, free_port_block
from gridserve.trust import Identity, sign_envelope

CARDS = ("rtx4090", "rtx3090", "a10g", "l40s", "a100-80g", "t4")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def capability(ident: Identity, i: int, health_port: int) -> dict[str, Any]:
    card = CARDS[i % len(CARDS)]
    return {
        "node_id": ident.node_id,
        "public_key": ident.public_key,
        "endpoint": f"http://127.0.0.1:{health_port}/n{i}",
        "engine": f"emulated:{card}",
        "models": [
            {
                "name": "llama-3-8b",
                "dtype": "float16",
                "quantization": "none",
                "max_context": 8192,
                "weights_digest": "emulated:llama-3-8b",
            }
        ],
        "hardware": {"accelerator": card, "emulated": True},
        "runtime": {"gridserve": "bench", "python": "bench", "engine": f"emulated:{card}"},
    }


def telemetry(i: int, k: int) -> dict[str, Any]:
    return {
        "utilization": ((i + k) % 10) / 10,
        "memory_used_bytes": 8 * 2**30,
        "memory_total_bytes": 24 * 2**30,
        "active_requests": (i + k) % 4,
        "tokens_per_s": 40.0 + (i % 7),
    }


async def health_server(port: int) -> web.AppRunner:
    async def ok(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    app = web.Application()
    app.router.add_get("/{tail:.*}", ok)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner


async def register_all(
    session: aiohttp.ClientSession, url: str, idents: list[Identity], health_port: int, progress: Progress
) -> None:
    task = progress.add_task(f"registering {len(idents):,} nodes", total=len(idents))
    gate = asyncio.Semaphore(32)

    async def one(i: int, ident: Identity) -> None:
        body = sign_envelope(
            ident, {"capability": capability(ident, i, health_port)}, purpose="register", now=time.time()
        )
        async with gate, session.post(url + "/nodes/register", data=body, headers=_JSON) as resp:
            if resp.status != 200:
                raise RuntimeError(f"registration refused: {resp.status} {await resp.text()}")
            await resp.read()
        progress.advance(task)

    await asyncio.gather(*(one(i, ident) for i, ident in enumerate(idents)))


_JSON = {"content-type": "application/json"}


async def heartbeats(
    session: aiohttp.ClientSession,
    url: str,
    idents: list[Identity],
    interval: float,
    duration: float,
    progress: Progress,
) -> tuple[list[float], list[float], int]:
    """Send every node's heartbeats on schedule for `duration` s: (latencies s, lags s, errors)."""
    n = len(idents)
    latencies: list[float] = []
    lags: list[float] = []
    errors = 0
    seq = [0] * n
    start = time.monotonic() + 0.5
    schedule = [
        (start + (i / n) * interval + k * interval, i) for k in range(int(duration / interval)) for i in range(n)
    ]
    schedule.sort()
    task = progress.add_task(f"{n:,} nodes heartbeating", total=len(schedule))
    pending: set[asyncio.Task[None]] = set()

    async def beat(i: int, due: float) -> None:
        nonlocal errors
        seq[i] += 1
        payload = {"node_id": idents[i].node_id, "seq": seq[i], "telemetry": telemetry(i, seq[i])}
        body = sign_envelope(idents[i], payload, purpose="heartbeat", now=time.time())
        sent = time.monotonic()
        lags.append(sent - due)
        try:
            async with session.post(url + "/nodes/heartbeat", data=body, headers=_JSON) as resp:
                await resp.read()
                if resp.status != 200:
                    errors += 1
                    return
        except (aiohttp.ClientError, TimeoutError):
            errors += 1
            return
        latencies.append(time.monotonic() - sent)
        progress.advance(task)

    for due, i in schedule:
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        t = asyncio.create_task(beat(i, due))
        pending.add(t)
        t.add_done_callback(pending.discard)
    await asyncio.gather(*pending)
    return latencies, lags, errors


async def one_run(nodes: int, interval: float, duration: float, progress: Progress) -> dict[str, Any]:
    port = free_port_block(2)
    with tempfile.TemporaryDirectory() as tmp:
        grid = LocalGrid(
            data_dir=Path(tmp), port=port, api_key="k", admin_token="a", engines=[], heartbeat_interval_s=interval
        )
        grid.start_gateway()
        runner = await health_server(port + 1)
        try:
            idents = [Identity.generate() for _ in range(nodes)]
            connector = aiohttp.TCPConnector(limit=256)
            async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30)) as session:
                await register_all(session, grid.url, idents, port + 1, progress)
                gateway = psutil.Process(grid.procs["gateway"].pid)
                cpu0, wall0 = sum(gateway.cpu_times()[:2]), time.monotonic()
                latencies, lags, errors = await heartbeats(session, grid.url, idents, interval, duration, progress)
                cpu = sum(gateway.cpu_times()[:2]) - cpu0
                wall = time.monotonic() - wall0
        finally:
            await runner.cleanup()
            grid.stop()
    return {
        "nodes": nodes,
        "interval_s": interval,
        "nominal_heartbeats_per_s": round(nodes / interval, 1),
        "heartbeats_per_s": round(len(latencies) / wall, 1),
        "ingest_p50_ms": round(statistics.median(latencies) * 1e3, 2) if latencies else None,
        "ingest_p99_ms": round(percentile(latencies, 0.99) * 1e3, 2) if latencies else None,
        "gateway_cpu_cores": round(cpu / wall, 3),
        "lag_p99_ms": round(percentile(lags, 0.99) * 1e3, 2) if lags else None,
        "errors": errors,
        "duration_s": round(wall, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nodes", default="1000,10000", help="comma-separated grid sizes")
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between a node's heartbeats")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of heartbeats per grid size")
    args = parser.parse_args()
    runs = []
    with Progress(transient=True) as progress:
        for n in (int(x) for x in args.nodes.split(",")):
            runs.append(asyncio.run(one_run(n, args.interval, args.duration, progress)))
    json.dump({"bench": "ingest", "target": "10,000 nodes: p99 < 50 ms", "runs": runs}, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
