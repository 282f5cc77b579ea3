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
at once, as before vetting); `open` warms up with as many chats as `vetting` needed. With `--minutes M` the traffic
runs for M minutes after the flood joins (instead of `--chats`), and the report adds each minute's share: issue 17
asks for the share the flood's identities get in their first 10 minutes (`--minutes 10 --modes vetting`).
Prints JSON; run: `.venv/bin/python bench/newcomer_share.py` (a few minutes).
"""

import argparse
import json
import statistics
import tempfile
import threading
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
AUDIT_WAIT_S = 120.0


def nodes(grid: LocalGrid) -> dict[str, dict[str, Any]]:
    return {n["node_id"]: n for n in grid.nodes()}


def chat(client: httpx.Client, i: int) -> tuple[str, float, str]:
    """(who served it, or the error status; milliseconds; the decision's id)"""
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": f"{i} is a number; tell me about it"}],
        "max_tokens": 8,
    }
    started = time.perf_counter()
    resp = client.post("/v1/chat/completions", json=body)
    took = (time.perf_counter() - started) * 1e3
    node = resp.headers.get("x-gridserve-node", "") if resp.status_code == 200 else str(resp.status_code)
    return node, took, resp.headers.get("x-gridserve-decision", "")


def warm_up(grid: LocalGrid, client: httpx.Client, honest: set[str], limit: int, until_vetted: bool) -> int:
    """Chats until every honest node is vetted (`until_vetted`, at most `limit`), else `limit` chats; how many. The
    audits that vet a node run after its answers (the verifier's first one loads the model): after `limit` chats,
    up to AUDIT_WAIT_S more for them."""

    def vetted() -> bool:
        return all(nodes(grid)[n]["reliability"]["vetted"] for n in honest)

    for i in range(limit):
        if until_vetted and vetted():
            return i
        chat(client, -1 - i)
    deadline = time.monotonic() + AUDIT_WAIT_S
    while until_vetted and not vetted():
        if time.monotonic() > deadline:
            raise RuntimeError(f"the honest nodes were not vetted after {limit} chats and {AUDIT_WAIT_S:.0f} s")
        time.sleep(0.5)
    return limit


def traffic(
    grid: LocalGrid, args: argparse.Namespace, tick: Callable[[], None]
) -> tuple[list[str], list[float], list[float], list[str]]:
    """`args.chats` chats (or as many as `args.minutes` allow), `args.concurrency` at a time (enough to keep the
    honest nodes busy: idle newcomers then score higher than busy established nodes); who served each, in the order
    they were sent, their latencies, when each was sent (seconds from the start) and their decisions' ids."""
    out: list[tuple[str, float, float, str]] = []
    started = time.monotonic()
    deadline = started + args.minutes * 60 if args.minutes else None
    numbers = iter(range(10**9 if deadline else args.chats))
    lock = threading.Lock()

    def worker(client: httpx.Client) -> None:
        while deadline is None or time.monotonic() < deadline:
            with lock:
                i = next(numbers, None)
            if i is None:
                return
            sent = time.monotonic() - started
            node, took, decision = chat(client, i)
            with lock:
                out.append((node, took, sent, decision))
            tick()

    headers = {"Authorization": f"Bearer {KEY}"}
    clients = [httpx.Client(base_url=grid.url, timeout=120, headers=headers) for _ in range(args.concurrency)]
    try:
        with ThreadPoolExecutor(args.concurrency) as pool:
            list(pool.map(worker, clients))
    finally:
        for client in clients:
            client.close()
    out.sort(key=lambda row: row[2])
    return [r[0] for r in out], [r[1] for r in out], [r[2] for r in out], [r[3] for r in out]


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
            with _VettingClock(grid, honest) as clock:
                served, latencies, sent, decisions = traffic(grid, args, lambda: progress.advance(task))
            final = nodes(grid)
            unvetted_picks = _picked_by(grid, served, sent, decisions, clock.vetted_at, set(final) - honest)
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
        "newcomer_share": _share(to_newcomers, served),
        f"served_by_newcomers_per_{args.window}_chats": by_window,
        "failed": sum(1 for s in served if s.isdigit()),
        "newcomers_vetted_at_end": sum(1 for n in newcomers if final[n]["reliability"]["vetted"]),
        **({"per_minute": _per_minute(served, sent, newcomers)} if args.minutes else {}),
        **_before_vetting(served, sent, clock.vetted_at, newcomers),
        "unvetted_picked_by": unvetted_picks,
        "chat_ms_median": round(statistics.median(latencies), 1) if latencies else None,
    }


POLL_S = 0.2
"""How often the vetting clock reads the node list: a newcomer's vetting is seen up to this late, and the chats it
served meanwhile count as unvetted (the `unvetted_share` is an upper bound by that much)."""


class _VettingClock:
    """While the traffic runs: when each newcomer (a node not in `honest`) was first seen vetted, in seconds from
    the start (read from the gateway's node list every POLL_S)."""

    def __init__(self, grid: LocalGrid, honest: set[str]) -> None:
        self.grid, self.honest = grid, honest
        self.vetted_at: dict[str, float] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.started = 0.0

    def __enter__(self) -> "_VettingClock":
        self.started = time.monotonic()
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()

    def _watch(self) -> None:
        while not self.stop.wait(POLL_S):
            for node_id, node in nodes(self.grid).items():
                if node_id not in self.honest and node["reliability"]["vetted"]:
                    self.vetted_at.setdefault(node_id, round(time.monotonic() - self.started, 1))


def _before_vetting(
    served: list[str], sent: list[float], vetted_at: dict[str, float], newcomers: set[str]
) -> dict[str, Any]:
    """Chats sent while some newcomer was unvetted, and the share the unvetted ones served of them."""
    until = max((vetted_at.get(n, float("inf")) for n in newcomers), default=0.0)
    window = [s for s, at in zip(served, sent, strict=True) if at < until]
    unvetted = sum(1 for s, at in zip(served, sent, strict=True) if s in newcomers and at < vetted_at.get(s, 1e18))
    return {
        "newcomers_vetted_after_s": sorted(vetted_at.values()),
        "newcomers_never_vetted": sum(1 for n in newcomers if n not in vetted_at),
        "chats_while_some_newcomer_unvetted": len(window),
        "served_by_unvetted_newcomers": unvetted,
        "unvetted_share": _share(unvetted, window),
    }


def _picked_by(
    grid: LocalGrid,
    served: list[str],
    sent: list[float],
    decisions: list[str],
    vetted_at: dict[str, float],
    newcomers: set[str],
) -> dict[str, int]:
    """Why the scheduler gave each chat an unvetted newcomer served (its decision's `picked_by`, from the log)."""
    why: dict[str, int] = {}
    admin = {"Authorization": f"Bearer {ADMIN}"}
    for node, at, decision in zip(served, sent, decisions, strict=True):
        if node in newcomers and at < vetted_at.get(node, 1e18) and decision:
            found = httpx.get(f"{grid.url}/v1/decisions/{decision}", headers=admin, timeout=30).json()
            reason = str(found.get("picked_by") or found.get("error") or "?")
            why[reason] = why.get(reason, 0) + 1
    return why


def _per_minute(served: list[str], sent: list[float], newcomers: set[str]) -> list[dict[str, float]]:
    """Per minute since the flood joined: chats sent, how many the newcomers served and their share."""
    rows = []
    for minute in range(int(max(sent, default=0.0) // 60) + 1):
        mine = [s for s, at in zip(served, sent, strict=True) if minute * 60 <= at < (minute + 1) * 60]
        theirs = sum(1 for s in mine if s in newcomers)
        rows.append({"minute": minute + 1, "chats": len(mine), "to_newcomers": theirs, "share": _share(theirs, mine)})
    return rows


def _share(part: int, whole: list[str]) -> float:
    return round(part / len(whole), 3) if whole else 0.0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sybils", type=int, default=4, help="new node processes that join")
    parser.add_argument("--chats", type=int, default=200)
    parser.add_argument("--window", type=int, default=50)
    parser.add_argument("--concurrency", type=int, default=8, help="chats in flight at once")
    parser.add_argument("--warmup", type=int, default=200, help="most chats to vet the honest nodes")
    parser.add_argument(
        "--minutes", type=float, default=0.0, help="send chats for this long after the flood joins instead of --chats"
    )
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    args = parser.parse_args()
    report: dict[str, Any] = {"model": MODEL, "sybils": args.sybils, "minutes": args.minutes or None}
    with Progress(console=Console(stderr=True)) as progress:
        total = None if args.minutes else len(args.modes) * (args.chats + 1)
        task = progress.add_task(f"newcomer share: {', then '.join(args.modes)}", total=total)
        for mode in args.modes:
            warm = None  # vetting: until the honest nodes are vetted; open: as many chats as that took, or --warmup
            if mode == "open":
                warm = report["vetting"]["warmup_chats"] if "vetting" in report else args.warmup
            report[mode] = one_mode(mode, args, progress, task, warm)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
