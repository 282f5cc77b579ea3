"""Failover and hedging, measured on a local grid of emulated nodes (fixed 40 ms TTFT, 20 ms ITL).

1. Failover gap: streams run on three nodes; the node serving the most of them is killed with SIGKILL while
   they are mid-answer. For each stream it was serving, the gap is the time from the kill to the client's
   next token (the stream continues on another node). The node is restarted and this repeats `--rounds`
   times. For scale: without a failure the next token comes after one ITL (20 ms).
2. Hedging: a grid of two nodes: a fast one (40 ms TTFT) that is an intermittent straggler (`delay_ms` on a
   `delay_share` of its answers: fault injection), so it gets most of the traffic, and a steady slower one
   (80 ms TTFT). Requests alternate between hedging on and off (`gridserve.hedge`), at
   `--concurrency`, side by side in one run; the client's TTFT p99 is reported for each, over `--runs` runs
   (the medians of the runs' p99s, and every run's figures).

Prints JSON: {"failover_gap_p50_ms", "failover_gap_p99_ms", "ttft_p99_no_hedge_ms", "ttft_p99_hedge_ms", ...}.
Run: `.venv/bin/python bench/failover.py` (about 2 minutes).
"""

import argparse
import asyncio
import json
import os
import signal
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import httpx
from rich.console import Console
from rich.progress import Progress

from gridserve.cli.grid import LocalGrid, free_port_block
from stats import percentile

MODEL = "llama-3-8b"
KEY = "bench-key"
ADMIN = "bench-admin"
FIXED = ["--fixed-ttft-ms", "40", "--fixed-itl-ms", "20", "--allow-faults"]


def grid_of(tmp: Path, nodes: int) -> LocalGrid:
    engines = ["emulated:rtx4090"] * nodes
    port = free_port_block(nodes + 4)
    return LocalGrid(tmp, port, KEY, ADMIN, engines, threads=1, extra_node_args=FIXED)


def hedging_grid(tmp: Path) -> LocalGrid:
    """Node 0: fast (40 ms TTFT, the straggler); node 1: steady, 80 ms TTFT."""
    grid = LocalGrid(tmp, free_port_block(6), KEY, ADMIN, ["emulated:rtx4090"] * 2, threads=1)
    grid.start_gateway()
    grid.start_node(0, grid.engines[0], FIXED)
    grid.start_node(1, grid.engines[1], ["--fixed-ttft-ms", "80", "--fixed-itl-ms", "20"])
    grid.wait_nodes(2, 120)
    return grid


class Stream:
    def __init__(self) -> None:
        self.node = ""
        self.decision = ""
        self.token_times: list[float] = []
        self.opened = asyncio.Event()
        self.under_way = asyncio.Event()
        """Set once 5 tokens have arrived (or the stream ended)."""


async def stream(session: aiohttp.ClientSession, url: str, prompt: str, tokens: int, out: Stream) -> None:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": tokens, "temperature": 0, "stream": True}
    try:
        headers = {"Authorization": f"Bearer {KEY}"}
        async with session.post(url + "/v1/completions", json=body, headers=headers) as resp:
            assert resp.status == 200, await resp.text()
            out.node, out.decision = resp.headers["x-gridserve-node"], resp.headers["x-gridserve-decision"]
            out.opened.set()
            async for line in resp.content:
                if line.startswith(b"data: {") and b'"text":"' in line and b'"text":""' not in line:
                    out.token_times.append(time.monotonic())
                    if len(out.token_times) >= 5:
                        out.under_way.set()
    finally:
        out.under_way.set()  # (an answer may end before 5 tokens)


def admin(grid: LocalGrid, path: str) -> Any:
    return httpx.get(grid.url + path, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=10).json()


def node_index(grid: LocalGrid, node_id: str) -> int:
    node = next(n for n in grid.nodes() if n["node_id"] == node_id)
    return next(i for i in range(len(grid.engines)) if node["endpoint"].endswith(f":{grid.node_port(i)}"))


async def failover_round(grid: LocalGrid, session: aiohttp.ClientSession, streams_n: int, r: int) -> list[float]:
    streams = [Stream() for _ in range(streams_n)]
    tasks = [
        asyncio.create_task(stream(session, grid.url, f"round {r} stream {i}: keep going", 80, s))
        for i, s in enumerate(streams)
    ]
    await asyncio.wait_for(asyncio.gather(*(s.opened.wait() for s in streams)), 30)
    counts: dict[str, int] = {}
    for s in streams:
        counts[s.node] = counts.get(s.node, 0) + 1
    victim = max(counts, key=lambda n: counts[n])
    on_victim = [s for s in streams if s.node == victim]
    await asyncio.wait_for(asyncio.gather(*(s.under_way.wait() for s in on_victim)), 30)
    index = node_index(grid, victim)
    proc = grid.procs[f"node-{index}"]
    killed = time.monotonic()
    os.kill(proc.pid, signal.SIGKILL)
    await asyncio.gather(*tasks)
    proc.wait()
    gaps = []
    for s in on_victim:
        route = admin(grid, f"/v1/decisions/{s.decision}")["route"]
        if len(route) > 1:  # it was mid-answer when the node died: the new node's first token is number k
            k = route[-1]["resumed_from"]  # (tiny text: one printable character per token, one chunk each)
            gaps.append((s.token_times[k] - killed) * 1e3)
    grid.start_node(index, grid.engines[index])
    grid.wait_nodes(len(grid.engines), 60)
    await asyncio.sleep(1.0)  # let it leave probation
    return gaps


async def ttft_once(session: aiohttp.ClientSession, url: str, prompt: str, hedge: bool) -> float:
    body = {
        "model": MODEL,
        "prompt": prompt,
        "max_tokens": 4,
        "temperature": 0,
        "stream": True,
        "gridserve": {"hedge": hedge},
    }
    start = time.monotonic()
    ttft = None
    async with session.post(url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}) as resp:
        assert resp.status == 200, await resp.text()
        async for line in resp.content:  # read to the end: an abandoned stream would teach the gateway nothing
            if ttft is None and line.startswith(b"data: {"):  # the first chunk (text, or the end of an empty answer)
                ttft = (time.monotonic() - start) * 1e3
    assert ttft is not None, "no token"
    return ttft


async def hedging_run(url: str, requests: int, concurrency: int, progress: Progress, task: Any) -> dict[str, float]:
    results: dict[bool, list[float]] = {True: [], False: []}
    queue = list(range(requests * 2))
    async with aiohttp.ClientSession() as session:

        async def worker() -> None:
            while queue:
                i = queue.pop()
                hedge = i % 2 == 0  # interleaved: both modes see the same grid at the same time
                results[hedge].append(await ttft_once(session, url, f"hedge bench {i}", hedge))
                progress.advance(task)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return {
        "ttft_p99_no_hedge_ms": percentile(results[False], 0.99),
        "ttft_p99_hedge_ms": percentile(results[True], 0.99),
        "ttft_p50_no_hedge_ms": percentile(results[False], 0.5),
        "ttft_p50_hedge_ms": percentile(results[True], 0.5),
    }


def straggler(grid: LocalGrid, delay_ms: float, share: float) -> str:
    node = next(n for n in grid.nodes() if n["endpoint"].endswith(f":{grid.node_port(0)}"))
    fault = {"delay_ms": delay_ms, "delay_share": share}
    httpx.post(node["endpoint"] + "/faults", json=fault, timeout=5).raise_for_status()
    return str(node["node_id"])


def metric(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics", timeout=5).text.splitlines():
        if line.split(" ")[0] == name:
            return float(line.split()[-1])
    return 0.0


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5, help="failover rounds (one node killed per round)")
    parser.add_argument("--streams", type=int, default=12, help="concurrent streams per failover round")
    parser.add_argument("--requests", type=int, default=300, help="hedging: requests per mode per run")
    parser.add_argument("--runs", type=int, default=3, help="hedging runs")
    parser.add_argument("--concurrency", type=int, default=6)
    parser.add_argument("--straggler-delay-ms", type=float, default=400.0)
    parser.add_argument("--straggler-share", type=float, default=0.03, help="below 5%%: its p95 stays normal")
    args = parser.parse_args()
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp, Progress(console=Console(stderr=True)) as progress:
        grid = grid_of(Path(tmp) / "failover", 3)
        grid.start(timeout_s=120)
        try:
            gaps: list[float] = []
            task = progress.add_task("failover rounds", total=args.rounds)
            async with aiohttp.ClientSession() as session:
                for r in range(args.rounds):
                    gaps += await failover_round(grid, session, args.streams, r)
                    progress.advance(task)
            out |= {
                "failover_gap_p50_ms": round(percentile(gaps, 0.5), 1),
                "failover_gap_p99_ms": round(percentile(gaps, 0.99), 1),
                "failover_samples": len(gaps),
                "failovers_counted": metric(grid.url, "gridserve_failovers_total"),
                "itl_ms": 20.0,
            }
        finally:
            grid.stop()
        grid = hedging_grid(Path(tmp) / "hedging")
        try:
            straggler(grid, args.straggler_delay_ms, args.straggler_share)
            runs = []
            task = progress.add_task("hedging runs", total=args.runs * args.requests * 2)
            for _ in range(args.runs):
                runs.append(await hedging_run(grid.url, args.requests, args.concurrency, progress, task))
            for key in ("ttft_p99_no_hedge_ms", "ttft_p99_hedge_ms", "ttft_p50_no_hedge_ms", "ttft_p50_hedge_ms"):
                out[key] = round(statistics.median(r[key] for r in runs), 1)
            out["hedging_runs"] = [{k: round(v, 1) for k, v in r.items()} for r in runs]
            out["hedges_sent"] = metric(grid.url, "gridserve_hedges_total")
            out["straggler"] = {"delay_ms": args.straggler_delay_ms, "share": args.straggler_share}
        finally:
            grid.stop()
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
