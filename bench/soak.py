"""Load and soak: an open-loop load at a fixed request rate, for `--duration` seconds, through a real gateway
(embedded SQLite store) to emulated nodes of mixed cards, all on 127.0.0.1.

- Arrivals are open-loop: request i is due at a time drawn in advance (Poisson arrivals at `--rate` req/s,
  seeded; `--arrivals uniform` for a fixed spacing) and is sent at that time whether or not earlier requests have
  answered. At most `--max-in-flight` requests are open at once (far above the expected concurrency, rate x
  latency); an arrival that finds the cap full is not sent and counts as an error (`dropped_at_cap`).
- Each request is a streamed chat completion (`max_tokens` `--max-tokens`, greedy, one of `--prompts` fixed
  prompts, so the nodes' tiny text source answers from its cache and the nodes spend little CPU on text).
  TTFT is measured by the client from the request's *due* time (so a late send counts against it: no
  coordinated omission) to the first chunk with non-empty `delta.content`. A request is an error unless it
  answers 200, streams content, has no error event and ends with `data: [DONE]`; errors are counted by kind.
- Before the measured run, `--warmup` seconds of the same load (not counted) warm connections, the nodes'
  text caches and the gateway's per-node calibration.
- The gateway process's RSS is sampled every `--sample-interval` seconds (psutil, on `procs["gateway"].pid`).
  `rss_growth_pct` = (RSS at the end - baseline) / baseline x 100, where the baseline is the *median* of the
  samples taken in the measured run's first minute (the first minute counts as warm-up for memory) and the
  end is the sample taken once the last request has finished.
- `ttft_p99_first_min_ms` / `ttft_p99_last_min_ms`: TTFT p99 of the successful requests due in [0, 60) s and in
  [duration - 60, duration) s of the measured run (null when none of them succeeded).
- `duration_s`: wall time of the measured run, from its start to the last answer (`load_s` of arrivals, then
  the stragglers, waited for at most `--request-timeout` + 5 s and then counted as `unfinished`).

Prints JSON: {"duration_s", "requests", "errors", "ttft_p99_first_min_ms", "ttft_p99_last_min_ms",
"rss_growth_pct", ...} and: per-minute rows (requests, errors, TTFT p50/p99, gateway RSS, CPU and open fds,
load average), errors by kind, RSS baseline/start/end/max, gateway open fds, the generator's send lag, CPU cores
used by the gateway / all nodes / this client, the gateway's hedge/retry/failover counters, requests served per
node, and each node at the end (state, requests the gateway still has open on it, generations it still runs).
`--plot PATH` also writes a PNG: TTFT p50/p99 (and errors) per minute, gateway RSS over time. `--keep DIR` keeps
the grid's logs and SQLite store. Everything listens on 127.0.0.1; Ctrl-C or SIGTERM stops the grid.
Run: `.venv/bin/python bench/soak.py [--duration 600] [--rate 10] [--plot soak.png] > soak.json`.
"""

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import orjson
import psutil
from rich.console import Console
from rich.progress import Progress

from gridserve.cli.grid import LocalGrid, free_port_block
from stats import percentile_or_none as percentile

MODEL = "llama-3-8b"
KEY = "bench-key"
ADMIN = "bench-admin"
CARDS = "rtx4090,h100-sxm,a100-80g,l40s,rtx3090"
MIB = 2**20
MINUTE = 60.0


def ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1e3, 1)


@dataclass
class Result:
    due_s: float
    """When the request was due, seconds from the start of its phase."""
    ttft_s: float | None = None
    error: str | None = None
    node: str = ""


@dataclass
class Sample:
    at_s: float
    rss: int
    cpu_s: float
    loadavg: float
    fds: int


@dataclass
class Phase:
    results: list[Result] = field(default_factory=list)
    lags: list[float] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    wall_s: float = 0.0


def prompts(count: int) -> list[str]:
    topics = ("rivers", "bridges", "compilers", "tides", "orchards", "glaciers", "lighthouses", "printing")
    return [f"Soak request {i}: write two sentences about {topics[i % len(topics)]}." for i in range(count)]


async def one_request(session: aiohttp.ClientSession, url: str, body: bytes, due: float, result: Result) -> None:
    """One streamed chat completion; fills `result` (TTFT from `due`, or the kind of error)."""
    headers = {"Authorization": f"Bearer {KEY}", "content-type": "application/json"}
    done = False
    try:
        async with session.post(url + "/v1/chat/completions", data=body, headers=headers) as resp:
            result.node = resp.headers.get("x-gridserve-node", "")
            if resp.status != 200:
                await resp.read()
                result.error = f"http_{resp.status}"
                return
            async for line in resp.content:
                if not line.startswith(b"data: "):
                    continue
                if line.startswith(b"data: [DONE]"):
                    done = True
                    break
                chunk = orjson.loads(line[6:])
                if "error" in chunk:
                    result.error = f"stream_error:{chunk['error'].get('code') or 'unknown'}"
                    return
                if result.ttft_s is None:
                    choices = chunk.get("choices") or [{}]
                    if (choices[0].get("delta") or {}).get("content"):
                        result.ttft_s = time.monotonic() - due
    except TimeoutError:
        result.error = "timeout"
        return
    except aiohttp.ClientError as exc:
        result.error = f"client:{type(exc).__name__}"
        return
    except ValueError:  # (orjson.JSONDecodeError)
        result.error = "bad_chunk"
        return
    if not done:
        result.error = "no_done"
    elif result.ttft_s is None:
        result.error = "no_content"


async def sampler(pid: int, start: float, out: list[Sample], stop: asyncio.Event, interval: float) -> None:
    proc = psutil.Process(pid)
    while not stop.is_set():
        times = proc.cpu_times()
        out.append(
            Sample(
                at_s=time.monotonic() - start,
                rss=proc.memory_info().rss,
                cpu_s=times.user + times.system,
                loadavg=os.getloadavg()[0],
                fds=proc.num_fds(),
            )
        )
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval)


async def run_phase(
    session: aiohttp.ClientSession,
    url: str,
    gateway_pid: int,
    args: argparse.Namespace,
    duration: float,
    seed: int,
    progress: Progress,
    label: str,
) -> Phase:
    """Offer `duration` seconds of open-loop load; wait for the stragglers (bounded); sample the gateway's RSS."""
    phase = Phase()
    rng = random.Random(seed)
    bodies = [
        orjson.dumps(
            {
                "model": MODEL,
                "messages": [{"role": "user", "content": p}],
                "max_tokens": args.max_tokens,
                "temperature": 0,
                "stream": True,
            }
        )
        for p in prompts(args.prompts)
    ]
    in_flight: dict[asyncio.Task[None], Result] = {}
    stop = asyncio.Event()
    start = time.monotonic()
    sampling = asyncio.create_task(sampler(gateway_pid, start, phase.samples, stop, args.sample_interval))
    task = progress.add_task(label, total=round(duration))
    due = start
    i = 0
    while True:
        due += rng.expovariate(args.rate) if args.arrivals == "poisson" else 1.0 / args.rate
        if due - start >= duration:
            break
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        phase.lags.append(time.monotonic() - due)
        result = Result(due_s=due - start)
        phase.results.append(result)
        if len(in_flight) >= args.max_in_flight:
            result.error = "dropped_at_cap"
            continue
        t = asyncio.create_task(one_request(session, url, bodies[i % len(bodies)], due, result))
        in_flight[t] = result
        t.add_done_callback(lambda done: _finished(done, in_flight.pop(done, None)))
        i += 1
        progress.update(task, completed=min(duration, due - start))
    progress.update(task, completed=round(duration))
    if in_flight:  # the stragglers: each has its own timeout; this bound is a second fence
        _, late = await asyncio.wait(set(in_flight), timeout=args.request_timeout + 5)
        for t in late:
            in_flight[t].error = "unfinished"
            t.cancel()
        await asyncio.gather(*late, return_exceptions=True)
    phase.wall_s = time.monotonic() - start
    stop.set()
    await sampling
    return phase


def _finished(task: asyncio.Task[None], result: Result | None) -> None:
    """A request that raised something unforeseen is an error too (never a silent success)."""
    if result is not None and not task.cancelled() and (exc := task.exception()) is not None:
        result.error = f"exception:{type(exc).__name__}"


def cores(samples: list[Sample]) -> float | None:
    """The gateway's CPU use between the first and the last sample, in cores."""
    if len(samples) < 2 or samples[-1].at_s <= samples[0].at_s:
        return None
    return round((samples[-1].cpu_s - samples[0].cpu_s) / (samples[-1].at_s - samples[0].at_s), 3)


def minute_rows(phase: Phase, duration: float) -> list[dict[str, Any]]:
    rows = []
    for m in range(max(1, int(duration // MINUTE))):
        lo, hi = m * MINUTE, (m + 1) * MINUTE
        rs = [r for r in phase.results if lo <= r.due_s < hi]
        ttfts = [r.ttft_s for r in rs if r.error is None and r.ttft_s is not None]
        samples = [s for s in phase.samples if lo <= s.at_s < hi]
        rows.append(
            {
                "minute": m,
                "requests": len(rs),
                "errors": sum(r.error is not None for r in rs),
                "ttft_p50_ms": ms(percentile(ttfts, 0.5)),
                "ttft_p99_ms": ms(percentile(ttfts, 0.99)),
                "rss_mib": round(statistics.median(s.rss for s in samples) / MIB, 1) if samples else None,
                "loadavg_1m": round(statistics.median(s.loadavg for s in samples), 2) if samples else None,
                "gateway_fds_max": max((s.fds for s in samples), default=None),
                "gateway_cpu_cores": cores(samples),
            }
        )
    return rows


def window_p99(phase: Phase, lo: float, hi: float) -> float | None:
    ttfts = [r.ttft_s for r in phase.results if r.error is None and r.ttft_s is not None and lo <= r.due_s < hi]
    return ms(percentile(ttfts, 0.99))


def node_at_end(node: dict[str, Any]) -> dict[str, Any]:
    """A node once the load is over: its state, what the gateway still has open on it, and the generations the
    node itself still runs (its `gridserve_node_active_requests`; non-zero means work nobody waits for)."""
    active = None
    try:
        for line in httpx.get(node["endpoint"] + "/metrics", timeout=5).text.splitlines():
            if line.startswith("gridserve_node_active_requests "):
                active = float(line.split()[-1])
    except httpx.HTTPError:
        pass
    return {
        "engine": node.get("engine", ""),
        "state_at_end": node.get("state", ""),
        "gateway_outstanding_at_end": node.get("outstanding"),
        "node_active_at_end": active,
    }


def gateway_counters(url: str) -> dict[str, float]:
    wanted = {
        "gridserve_hedges_total": "hedges",
        "gridserve_dispatch_retries_total": "retries",
        "gridserve_failovers_total": "failovers",
    }
    found = dict.fromkeys(wanted.values(), 0.0)
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        name = line.split(" ")[0]
        if name in wanted:
            found[wanted[name]] = float(line.split()[-1])
    return found


def summarise(phase: Phase, args: argparse.Namespace, grid: LocalGrid, nodes: list[dict[str, Any]]) -> dict[str, Any]:
    duration = args.duration
    ok = [r.ttft_s for r in phase.results if r.error is None and r.ttft_s is not None]
    kinds: dict[str, int] = {}
    served: dict[str, int] = {}
    for r in phase.results:
        if r.error is not None:
            kinds[r.error] = kinds.get(r.error, 0) + 1
        if r.node:
            served[r.node] = served.get(r.node, 0) + 1
    samples = phase.samples
    first = [s.rss for s in samples if s.at_s < MINUTE] or [samples[0].rss]
    base, end = statistics.median(first), samples[-1].rss
    engines = {n["node_id"]: n.get("engine", "") for n in nodes}
    return {
        "duration_s": round(phase.wall_s, 1),
        "load_s": duration,
        "requests": len(phase.results),
        "errors": sum(kinds.values()),
        "ttft_p99_first_min_ms": window_p99(phase, 0.0, MINUTE),
        "ttft_p99_last_min_ms": window_p99(phase, duration - MINUTE, duration),
        "rss_growth_pct": round((end - base) / base * 100, 2),
        "rate_req_s": args.rate,
        "arrivals": args.arrivals,
        "offered_req_s": round(len(phase.results) / duration, 2),
        "ttft_p50_ms": ms(percentile(ok, 0.5)),
        "ttft_p99_ms": ms(percentile(ok, 0.99)),
        "ttft_max_ms": ms(max(ok, default=None)),
        "errors_by_kind": kinds,
        "per_minute": minute_rows(phase, duration),
        "rss_mib": {
            "baseline_first_min_median": round(base / MIB, 1),
            "start": round(samples[0].rss / MIB, 1),
            "end": round(end / MIB, 1),
            "max": round(max(s.rss for s in samples) / MIB, 1),
            "samples": len(samples),
            "interval_s": args.sample_interval,
        },
        "gateway_open_fds": {"start": samples[0].fds, "end": samples[-1].fds, "max": max(s.fds for s in samples)},
        "send_lag_p99_ms": ms(percentile(phase.lags, 0.99)),
        "send_lag_max_ms": ms(max(phase.lags, default=None)),
        "loadavg_1m": {"start": round(samples[0].loadavg, 2), "end": round(samples[-1].loadavg, 2)},
        "gateway": gateway_counters(grid.url),
        "served_by_node": {f"{engines.get(k, '?')} {k[:12]}": v for k, v in sorted(served.items())},
        "nodes": [node_at_end(n) for n in nodes],
        "max_tokens": args.max_tokens,
        "max_in_flight": args.max_in_flight,
        "warmup_s": args.warmup,
        "machine": {"cpus": os.cpu_count(), "memory_gib": round(psutil.virtual_memory().total / 2**30, 1)},
    }


def plot(out: dict[str, Any], phase: Phase, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6.5))
    rows = out["per_minute"]
    minutes = [r["minute"] + 1 for r in rows]
    top.plot(minutes, [r["ttft_p50_ms"] for r in rows], "o-", label="TTFT p50")
    top.plot(minutes, [r["ttft_p99_ms"] for r in rows], "s-", label="TTFT p99")
    top.set(xlabel="minute of the run", ylabel="client TTFT (ms)", ylim=(0, None), xticks=minutes)
    top.set_title(f"{out['rate_req_s']} req/s for {out['load_s']:.0f} s, {len(out['nodes'])} emulated nodes")
    top.grid(alpha=0.3)
    if out["errors"]:
        share = top.twinx()
        share.bar(minutes, [100 * r["errors"] / max(1, r["requests"]) for r in rows], alpha=0.2, color="red")
        share.set(ylabel="errors (% of the minute's requests)", ylim=(0, 100))
    top.legend(loc="upper left")
    bottom.plot([s.at_s for s in phase.samples], [s.rss / MIB for s in phase.samples], "-", label="gateway RSS")
    bottom.axhline(out["rss_mib"]["baseline_first_min_median"], color="grey", ls="--", label="baseline")
    bottom.set(xlabel="seconds", ylabel="RSS (MiB)")
    bottom.set_title(f"gateway RSS: {out['rss_growth_pct']:+.1f}% from the first minute's median to the end")
    bottom.legend()
    bottom.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def cpu_by_role(grid: LocalGrid) -> dict[str, float]:
    """CPU seconds used so far by the gateway, all nodes together, and this load generator."""

    def used(pid: int) -> float:
        times = psutil.Process(pid).cpu_times()
        return times.user + times.system

    nodes = sum(used(p.pid) for name, p in grid.procs.items() if name.startswith("node-"))
    return {"gateway": used(grid.procs["gateway"].pid), "nodes": nodes, "client": used(os.getpid())}


async def soak(grid: LocalGrid, args: argparse.Namespace) -> dict[str, Any]:
    pid = grid.procs["gateway"].pid
    connector = aiohttp.TCPConnector(limit=args.max_in_flight)
    timeout = aiohttp.ClientTimeout(total=args.request_timeout)
    with Progress(transient=True, console=Console(stderr=True)) as progress:  # stdout: the JSON only
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            if args.warmup > 0:
                await run_phase(session, grid.url, pid, args, args.warmup, args.seed + 1, progress, "warm-up")
            cpu0, wall0 = cpu_by_role(grid), time.monotonic()
            phase = await run_phase(session, grid.url, pid, args, args.duration, args.seed, progress, "soak")
            cpu1, wall = cpu_by_role(grid), time.monotonic() - wall0
    out = summarise(phase, args, grid, grid.nodes())
    out["cpu_cores"] = {role: round((cpu1[role] - cpu0[role]) / wall, 3) for role in cpu0}
    if args.plot is not None:
        plot(out, phase, args.plot)
    return out


def _terminate(signum: int, _: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through `finally`: the grid is stopped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of measured load")
    parser.add_argument("--rate", type=float, default=10.0, help="requests per second offered")
    parser.add_argument("--arrivals", choices=("poisson", "uniform"), default="poisson")
    parser.add_argument("--cards", default=CARDS, help="comma-separated emulated cards, one node each")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--prompts", type=int, default=32, help="distinct prompts (greedy: cached by the nodes)")
    parser.add_argument("--max-in-flight", type=int, default=256, help="cap on open requests (drops are errors)")
    parser.add_argument("--request-timeout", type=float, default=60.0, help="seconds, whole request")
    parser.add_argument("--warmup", type=float, default=30.0, help="seconds of uncounted load first")
    parser.add_argument("--sample-interval", type=float, default=2.0, help="seconds between RSS samples")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--log-level", default="warning", help="gateway and nodes")
    parser.add_argument("--plot", type=Path, default=None, help="write a PNG: TTFT per minute, RSS over time")
    parser.add_argument("--keep", type=Path, default=None, help="grid data dir to keep (logs, SQLite store)")
    args = parser.parse_args()
    if args.duration <= 0 or args.rate <= 0:
        parser.error("--duration and --rate must be positive")
    cards = [c.strip() for c in args.cards.split(",") if c.strip()]
    signal.signal(signal.SIGTERM, _terminate)
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp) if args.keep is None else args.keep
        if args.keep is not None and args.keep.exists() and any(args.keep.iterdir()):
            parser.error(f"--keep {args.keep}: not empty")
        grid = LocalGrid(
            data_dir=data_dir,
            port=free_port_block(len(cards) + 4),
            api_key=KEY,
            admin_token=ADMIN,
            engines=[f"emulated:{c}" for c in cards],
            threads=1,
            extra_node_args=["--log-level", args.log_level],
            extra_gateway_args=["--log-level", args.log_level],
        )
        try:
            grid.start(timeout_s=180)
            out = asyncio.run(soak(grid, args))
        finally:
            grid.stop()
    json.dump(out, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
