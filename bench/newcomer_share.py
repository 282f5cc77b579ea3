"""The share of traffic a flood of new identities gets while unvetted, vetting on and off side by side in one run.

Each mode starts a fresh local grid: a gateway and two honest nodes serving `gridserve-tiny` (a model the gateway
re-executes, so audits and canaries can vet a node). Then:

1. **Warm-up**: chats until both honest nodes are vetted (passed `--vetting-checks` audits or canaries), at most
   `--warmup` chats.
2. **Flood**: `--sybils` new node processes join, serving the same model as well as the honest ones do, at a low
   price. A newcomer's reliability starts at the prior (0.75), below a good record: on a quiet grid it ranks below
   the established nodes anyway; the case that matters is a busy grid, where idle newcomers outscore busy nodes.
3. **Traffic**: `--chats` chats, `--concurrency` at a time (the honest nodes busy); who served each, in windows of
   `--window` chats, and how many of the newcomers were vetted by the end.

Modes: `vetting` (the gateway's default: 3 checks) and `open` (`--vetting-checks 0`: every identity is established
at once, as before vetting); `open` warms up with as many chats as `vetting` needed. Prints JSON; run:
`.venv/bin/python bench/newcomer_share.py` (a few minutes).
"""

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.progress import Progress

from gridserve.cli.grid import LocalGrid, free_port_block

MODEL = "gridserve-tiny"
KEY = "bench-key"
ADMIN = "bench-admin"
MODES = {"vetting": [], "open": ["--vetting-checks", "0"]}


def nodes(grid: LocalGrid) -> dict[str, dict[str, Any]]:
    return {n["node_id"]: n for n in grid.nodes()}


def chat(client: httpx.Client, i: int) -> tuple[str, float]:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": f"{i} is a number; tell me about it"}],
        "max_tokens": 8,
    }
    started = time.perf_counter()
    resp = client.post("/v1/chat/completions", json=body)
    took = (time.perf_counter() - started) * 1e3
    return (resp.headers.get("x-gridserve-node", "") if resp.status_code == 200 else str(resp.status_code)), took


def warm_up(grid: LocalGrid, client: httpx.Client, honest: set[str], limit: int, until_vetted: bool) -> int:
    """Chats until every honest node is vetted (`until_vetted`, at most `limit`), else `limit` chats; how many."""
    for i in range(limit):
        if until_vetted and all(nodes(grid)[n]["reliability"]["vetted"] for n in honest):
            return i
        chat(client, -1 - i)
    if until_vetted:
        raise RuntimeError(f"the honest nodes were not vetted after {limit} chats")
    return limit


def traffic(grid: LocalGrid, args: argparse.Namespace, tick: Callable[[], None]) -> tuple[list[str], list[float]]:
    """`args.chats` chats, `args.concurrency` at a time (enough to keep the honest nodes busy: idle newcomers then
    score higher than busy established nodes); who served each, in the order they were sent, and their latencies."""
    out: list[tuple[str, float]] = [("", 0.0)] * args.chats

    def one(i: int, client: httpx.Client) -> None:
        out[i] = chat(client, i)
        tick()

    clients = [httpx.Client(base_url=grid.url, timeout=120, headers={"Authorization": f"Bearer {KEY}"})]
    clients += [
        httpx.Client(base_url=grid.url, timeout=120, headers=clients[0].headers) for _ in range(1, args.concurrency)
    ]
    try:
        with ThreadPoolExecutor(args.concurrency) as pool:
            list(pool.map(lambda i: one(i, clients[i % args.concurrency]), range(args.chats)))
    finally:
        for client in clients:
            client.close()
    return [node for node, _ in out], [took for _, took in out]


def one_mode(mode: str, args: argparse.Namespace, progress: Progress, task: Any, warm: int | None) -> dict[str, Any]:
    """One mode's run; `warm`: warm-up chats (None: until the honest nodes are vetted)."""
    with tempfile.TemporaryDirectory() as tmp:
        grid = LocalGrid(
            Path(tmp),
            free_port_block(3 + args.sybils),
            KEY,
            ADMIN,
            ["tiny"] * 2,
            threads=1,
            extra_gateway_args=MODES[mode],
        )
        client = httpx.Client(base_url=grid.url, timeout=120, headers={"Authorization": f"Bearer {KEY}"})
        try:
            grid.start(timeout_s=180)
            honest = set(nodes(grid))
            warmed = warm_up(grid, client, honest, warm or args.warmup, until_vetted=warm is None)
            honest_vetted = sum(1 for n in honest if nodes(grid)[n]["reliability"]["vetted"])
            for i in range(args.sybils):
                grid.start_node(2 + i, "tiny", ["--price", "0.001"])
            grid.wait_nodes(2 + args.sybils, 180)
            progress.advance(task)
            served, latencies = traffic(grid, args, lambda: progress.advance(task))
            final = nodes(grid)
        finally:
            client.close()
            grid.stop()
    newcomers = set(final) - honest
    by_window = [
        sum(1 for s in served[k : k + args.window] if s in newcomers) for k in range(0, len(served), args.window)
    ]
    to_newcomers = sum(by_window)
    return {
        "warmup_chats": warmed,
        "honest_vetted_after_warmup": honest_vetted,
        "newcomers": len(newcomers),
        "chats": len(served),
        "served_by_newcomers": to_newcomers,
        "newcomer_share": round(to_newcomers / len(served), 3),
        f"served_by_newcomers_per_{args.window}_chats": by_window,
        "failed": sum(1 for s in served if s.isdigit()),
        "newcomers_vetted_at_end": sum(1 for n in newcomers if final[n]["reliability"]["vetted"]),
        "chat_ms_median": round(statistics.median(latencies), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sybils", type=int, default=4, help="new node processes that join")
    parser.add_argument("--chats", type=int, default=200)
    parser.add_argument("--window", type=int, default=50)
    parser.add_argument("--concurrency", type=int, default=8, help="chats in flight at once")
    parser.add_argument("--warmup", type=int, default=200, help="most chats to vet the honest nodes")
    args = parser.parse_args()
    report: dict[str, Any] = {"model": MODEL, "sybils": args.sybils}
    with Progress(console=Console(stderr=True)) as progress:
        task = progress.add_task("newcomer share: vetting on, then off", total=len(MODES) * (args.chats + 1))
        report["vetting"] = one_mode("vetting", args, progress, task, None)
        report["open"] = one_mode("open", args, progress, task, report["vetting"]["warmup_chats"])
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
