"""Tenants on one grid: per-key limits across gateways, fairness between keys, priority under a flood, overhead.

Emulated `rtx4090` nodes with fixed timings and `--fifo-slots` (at most 8 requests run at once on a node, later ones
wait there in order), so what changes between runs is the gateway's.

- `rate`: three gateways on one PostgreSQL schema, one node (20 ms to the first token, 10 ms between tokens), one key
  limited to `--rpm` requests per minute, one-token requests sent round robin over the gateways at twice that rate
  for exactly one of the limiter's minute windows (from its start): admitted / rpm.
- `fairness`: one gateway, two nodes (16 slots; 200 ms to the first token, so a 4-token answer holds its slot about
  240 ms and the slots, not this machine's two cores, are what runs out); two keys of one class at 2x overload:
  equal (16 and 16 clients, closed loop), then skewed (24 and 8): answers served per key, Jain's fairness index.
- `priority`: the same grid; an interactive key's TTFT (streamed, one request at a time) alone, then while a batch
  key's 48 clients (three times the grid's slots; in a process of their own) keep it saturated: p50/p99, the ratio.
- `overhead`: the gateway's key check, limits and queue in-process (authenticate, admit, wait for room, close) for a
  key with every limit vs a `--api-key` key (neither: p50 per request, microseconds); and end to end, one gateway,
  requests alternating between the two keys: p50 latency of each.

Prints one JSON object; progress on stderr. Run: `.venv/bin/python bench/tenants.py [--parts rate fairness ...]`.
"""

import argparse
import asyncio
import contextlib
import json
import math
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa

from gridserve.cli.grid import LocalGrid, free_port_block
from gridserve.gateway.tenancy import Tenancy
from gridserve.gateway.tenancy.keys import KeyPolicy
from gridserve.store import Store
from stats import percentile as pct

PG = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
MODEL = "llama-3-8b"
KEY, ADMIN = "bench-key", "bench-admin"
NODE_ARGS = ["--fixed-ttft-ms", "20", "--fixed-itl-ms", "10", "--fifo-slots", "--log-level", "warning"]
SLOW_FIRST = ["--fixed-ttft-ms", "200", "--fixed-itl-ms", "10", "--fifo-slots", "--log-level", "warning"]
"""Fairness and priority: answers that hold a slot ~240 ms for 4 tokens, so the nodes' slots are what runs out, not
this machine's two cores relaying tokens."""
TOKENS = 4
SETTINGS = {"temperature": 0.0}
"""Requests ask for greedy answers: an emulated node writes the text of a greedy request once (its tiny model, real
CPU work) and answers it from its cache after, so the nodes' processes, which on a grid run on other machines, do not
take this machine's two cores from the gateway under a flood (with sampled requests they do: `--sampled`)."""
ASK = [{"role": "user", "content": "benchmark prompt"}]


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


@contextmanager
def pg_schema() -> Iterator[str]:
    name = "gs_bench_" + uuid.uuid4().hex[:12]
    engine = sa.create_engine(PG, poolclass=sa.NullPool)
    with engine.begin() as conn:
        conn.exec_driver_sql(f'CREATE SCHEMA "{name}"')
    try:
        yield f"{PG}?options=-csearch_path%3D{name}"
    finally:
        with engine.begin() as conn:
            conn.exec_driver_sql(f'DROP SCHEMA "{name}" CASCADE')
        engine.dispose()


def new_key(url: str, **policy: Any) -> str:
    made = httpx.post(
        url + "/admin/keys",
        json={"name": f"bench-{uuid.uuid4().hex[:6]}", **policy},
        headers={"Authorization": f"Bearer {ADMIN}"},
        timeout=10,
    )
    made.raise_for_status()
    return str(made.json()["key"])


async def chat(
    client: httpx.AsyncClient, url: str, key: str, max_tokens: int, stream: bool = False
) -> tuple[int, float]:
    """(status, seconds to the first token, or to the whole answer when not streamed)."""
    status, first, _ = await chat_decided(client, url, key, max_tokens, stream)
    return status, first


async def chat_decided(
    client: httpx.AsyncClient, url: str, key: str, max_tokens: int, stream: bool = False
) -> tuple[int, float, str]:
    """`chat`'s (status, seconds) and the request's decision id."""
    body = {"model": MODEL, "messages": ASK, "max_tokens": max_tokens, "stream": stream, **SETTINGS}
    headers = {"Authorization": f"Bearer {key}"}
    started = time.perf_counter()
    if not stream:
        reply = await client.post(url + "/v1/chat/completions", json=body, headers=headers)
        return reply.status_code, time.perf_counter() - started, reply.headers.get("x-gridserve-decision", "")
    async with client.stream("POST", url + "/v1/chat/completions", json=body, headers=headers) as reply:
        first = math.nan
        async for line in reply.aiter_lines():
            if line.startswith("data: {") and '"content":"' in line and math.isnan(first):
                first = time.perf_counter() - started
        return reply.status_code, first, reply.headers.get("x-gridserve-decision", "")


# -- rate: one key's requests-per-minute limit over three gateways ---------------------------------------------------
def rate(tmp: Path, rpm: int) -> dict[str, Any]:
    base = free_port_block(8)
    urls = ",".join(f"http://127.0.0.1:{base + 2 * i}" for i in range(3))
    with pg_schema() as db:
        grids = [
            LocalGrid(
                data_dir=tmp / f"gw{i}",
                port=base + 2 * i,
                api_key=KEY,
                admin_token=ADMIN,
                engines=["emulated:rtx4090"] if i == 0 else [],
                threads=1,
                extra_node_args=NODE_ARGS,
                extra_gateway_args=[
                    "--db",
                    db,
                    "--key",
                    str(tmp / "grid.key"),
                    "--gateway-id",
                    f"gw{i}",
                    "--canary-interval",
                    "0",
                    "--vetting-checks",
                    "0",
                    "--log-level",
                    "warning",
                ],
                node_gateways=urls,
            )
            for i in range(3)
        ]
        try:
            for g in grids:
                g.start_gateway()
            grids[0].start_node(0, "emulated:rtx4090")
            for g in grids:
                g.wait_nodes(1, 120)
            key = new_key(grids[0].url, rpm=rpm)
            return asyncio.run(_rate(grids, key, rpm))
        finally:
            for g in grids:
                g.stop()


async def _rate(grids: list[LocalGrid], key: str, rpm: int) -> dict[str, Any]:
    start = (math.floor(time.time() / 60) + 1) * 60 + 0.5  # the next window's start, and half a second
    say(f"rate: waiting {start - time.time():.0f} s for a window to start")
    await asyncio.sleep(start - time.time())
    interval = 60.0 / (2 * rpm)
    codes: dict[int, int] = {}
    per_gateway = [0, 0, 0]
    async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=200)) as client:

        async def one(i: int) -> None:
            status, _ = await chat(client, grids[i % 3].url, key, 1)
            codes[status] = codes.get(status, 0) + 1
            if status == 200:
                per_gateway[i % 3] += 1

        tasks, sent = [], 0
        while time.time() < start + 59.0:  # inside the window
            tasks.append(asyncio.create_task(one(sent)))
            sent += 1
            await asyncio.sleep(max(0.0, start + sent * interval - time.time()))
        await asyncio.gather(*tasks)
    admitted = codes.get(200, 0)
    return {
        "rpm": rpm,
        "sent": sent,
        "admitted": admitted,
        "admitted_over_rpm": round(admitted / rpm, 4),
        "refused_429": codes.get(429, 0),
        "other": {str(k): v for k, v in codes.items() if k not in (200, 429)},
        "admitted_per_gateway": per_gateway,
    }


# -- fairness and priority: one gateway, two nodes -------------------------------------------------------------------
def one_gateway(tmp: Path, nodes: int, node_args: list[str]) -> LocalGrid:
    grid = LocalGrid(
        data_dir=tmp,
        port=free_port_block(nodes + 4),
        api_key=KEY,
        admin_token=ADMIN,
        engines=["emulated:rtx4090"] * nodes,
        threads=1,
        extra_node_args=node_args,
        extra_gateway_args=["--canary-interval", "0", "--vetting-checks", "0", "--log-level", "warning"],
    )
    grid.start(timeout_s=120)
    return grid


async def closed_loop(url: str, key: str, clients: int, seconds: float, tokens: int, served: list[int]) -> None:
    deadline = time.monotonic() + seconds
    async with httpx.AsyncClient(timeout=180, limits=httpx.Limits(max_connections=clients + 4)) as client:

        async def worker() -> None:
            while time.monotonic() < deadline:
                status, _ = await chat(client, url, key, tokens)
                served[0 if status == 200 else 1] += 1

        await asyncio.gather(*(worker() for _ in range(clients)))


def jain(xs: list[float]) -> float:
    return sum(xs) ** 2 / (len(xs) * sum(x * x for x in xs)) if any(xs) else 0.0


async def _fairness(url: str, seconds: float, clients: tuple[int, int]) -> dict[str, Any]:
    a, b = new_key(url), new_key(url)
    served_a, served_b = [0, 0], [0, 0]
    await asyncio.gather(
        closed_loop(url, a, clients[0], seconds, TOKENS, served_a),
        closed_loop(url, b, clients[1], seconds, TOKENS, served_b),
    )
    return {
        "clients": {"a": clients[0], "b": clients[1]},
        "slots": 16,
        "served": {"a": served_a[0], "b": served_b[0]},
        "failed": {"a": served_a[1], "b": served_b[1]},
        "jain": round(jain([served_a[0], served_b[0]]), 4),
    }


async def ttfts(url: str, key: str, count: int) -> list[tuple[float, str]]:
    """(TTFT, decision id) of `count` streamed requests sent one at a time."""
    out: list[tuple[float, str]] = []
    async with httpx.AsyncClient(timeout=60) as client:
        for _ in range(count):
            status, first, decision = await chat_decided(client, url, key, 8, stream=True)
            if status == 200 and not math.isnan(first):
                out.append((first, decision))
            await asyncio.sleep(0.05)
    return out


def loop_lag(url: str) -> dict[float, float]:
    """The gateway's event-loop lag histogram as it stands: {bucket's upper bound: samples at or under it}."""
    text = httpx.get(url + "/metrics", timeout=10).text
    out: dict[float, float] = {}
    for line in text.splitlines():
        if line.startswith("gridserve_event_loop_lag_seconds_bucket{"):
            bound = line.split('le="', 1)[1].split('"', 1)[0]
            out[math.inf if bound == "+Inf" else float(bound)] = float(line.rsplit(" ", 1)[1])
    return out


def counter(url: str, name: str) -> float:
    """A counter of the gateway's /metrics, summed over its labels (0 when it has none yet)."""
    text = httpx.get(url + "/metrics", timeout=10).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name + "{") or line.startswith(name + " ")
    )


def lag_between(before: dict[float, float], after: dict[float, float]) -> dict[str, Any]:
    """The loop lag samples taken between two reads: how many, and the share of them over 5, 20 and 50 ms."""
    seen = {b: after[b] - before.get(b, 0.0) for b in after}
    total = seen.get(math.inf, 0.0)
    over = {f"over_{int(b * 1e3)}ms": round(1 - seen[b] / total, 4) if total else 0.0 for b in (0.005, 0.02, 0.05)}
    return {"samples": int(total), **over}


async def breakdown(url: str, measured: list[tuple[float, str]], low: float, high: float) -> dict[str, Any]:
    """Where the TTFT of the requests ranked between quantiles `low` and `high` went, from their decisions (medians,
    ms): the wait in the gateway's queue, the node's own time to its first token (as it reports it), the dispatch's
    time to the first event at the gateway, and the rest (the gateway before dispatch, relaying the first token, the
    client)."""
    ranked = sorted(measured)
    slowest = ranked[int(low * len(ranked)) : max(int(low * len(ranked)) + 1, int(high * len(ranked)))]
    extra: dict[str, Any] = {}
    parts: dict[str, list[float]] = {"client_ttft": [], "queue_wait": [], "dispatch_ttft": [], "node_prefill": []}
    parts |= {"node_queue": [], "network": [], "rest": []}
    async with httpx.AsyncClient(timeout=10, headers={"Authorization": f"Bearer {ADMIN}"}) as client:
        for ttft, decision_id in slowest:
            found = (await client.get(f"{url}/v1/decisions/{decision_id}")).json()
            wait, dispatch = float(found.get("queue_wait_s") or 0.0), float(found.get("ttft_s") or 0.0)
            timing = found.get("timing") or {}
            for name, value in (("client_ttft", ttft), ("queue_wait", wait), ("dispatch_ttft", dispatch)):
                parts[name].append(value)
            for name in ("prefill", "queue"):
                parts[f"node_{name}"].append(float(timing.get(f"{name}_s") or 0.0))
            parts["network"].append(float(timing.get("network_s") or 0.0))
            if len(slowest) == 1:
                candidates = [
                    {
                        "node": c["node_id"][:10],
                        "queue_ms": round((c.get("predicted_queue_s") or 0.0) * 1e3, 1),
                        "load": next((d.get("raw") for d in c.get("scores", []) if d.get("scorer") == "load"), None),
                    }
                    for c in found.get("candidates", [])
                ]
                extra = {"chosen": str(found.get("chosen"))[:10], "candidates": candidates}
            parts["rest"].append(ttft - wait - dispatch)
    medians = {f"{k}_ms": round(pct(v, 0.5) * 1e3, 2) for k, v in parts.items()}
    return {"requests": len(slowest), **medians, **extra}


async def _priority(url: str, count: int) -> dict[str, Any]:
    interactive, batch = new_key(url, priority="interactive"), new_key(url, priority="batch")
    lag_start = loop_lag(url)
    alone_measured = await ttfts(url, interactive, count)
    lag_alone = loop_lag(url)
    # the flood's clients in a process of their own, as on other machines: their event loop is not the one that
    # times the interactive requests
    flood = await asyncio.create_subprocess_exec(
        sys.executable,
        __file__,
        "--flood",
        url,
        batch,
        "48",
        *(["--sampled"] if SETTINGS["temperature"] else []),
        stdout=asyncio.subprocess.PIPE,
    )
    await asyncio.sleep(3.0)  # the flood fills the grid
    lag_flood_start = loop_lag(url)
    hedges_before = counter(url, "gridserve_hedges_total")
    loaded_measured = await ttfts(url, interactive, count)
    lag_flood = loop_lag(url)
    hedges = counter(url, "gridserve_hedges_total") - hedges_before
    flood.send_signal(signal.SIGINT)
    raw, _ = await asyncio.wait_for(flood.communicate(), 60)
    out = raw.decode()
    served = json.loads(out.strip().splitlines()[-1])
    alone, loaded = [t for t, _ in alone_measured], [t for t, _ in loaded_measured]
    row: dict[str, Any] = {
        "requests": count,
        "alone_p50_ms": pct(alone, 0.5) * 1e3,
        "alone_p99_ms": pct(alone, 0.99) * 1e3,
        "flood_p50_ms": pct(loaded, 0.5) * 1e3,
        "flood_p99_ms": pct(loaded, 0.99) * 1e3,
        "batch_served_during": served[0],
        "batch_clients": 48,
        "slots": 16,
    }
    row["p99_ratio"] = round(row["flood_p99_ms"] / row["alone_p99_ms"], 3)
    row = {k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}
    row["slowest_5pct_alone"] = await breakdown(url, alone_measured, 0.95, 1.0)
    row["slowest_5pct_flood"] = await breakdown(url, loaded_measured, 0.95, 1.0)
    row["middle_10pct_flood"] = await breakdown(url, loaded_measured, 0.45, 0.55)
    row["slowest_flood"] = [await breakdown(url, [m], 0.0, 1.0) for m in sorted(loaded_measured)[-3:]]
    row["loop_lag_alone"] = lag_between(lag_start, lag_alone)
    row["loop_lag_flood"] = lag_between(lag_flood_start, lag_flood)
    row["hedges_during_flood"] = int(hedges)
    return row


# -- overhead -------------------------------------------------------------------------------------------------------
def overhead_in_process(tmp: Path, count: int) -> dict[str, Any]:
    store = Store(f"sqlite:///{tmp}/overhead.sqlite")
    store.migrate()
    tenancy = Tenancy(store, [KEY], gateway_id="bench", sync_interval_s=1.0, capacity=lambda model: 64)
    policy = KeyPolicy(rpm=10**7, tpm=10**9, max_concurrency=10**5, budget_usd=1e9, models=(MODEL,))
    limited = asyncio.run(tenancy.create("limited", policy))["key"]

    async def run(token: str) -> list[float]:
        times = []
        for _ in range(count):
            started = time.perf_counter()
            key = tenancy.authenticate(token)
            assert key is not None
            await tenancy.reserve(key)  # a budget's lease: a store round trip on one request in several
            admission = tenancy.admit(key, model=MODEL, tier=None, tokens=100)
            await tenancy.wait_for_room(admission, MODEL)
            admission.charge(100, 1e-6, failed=False)
            admission.close()
            times.append(time.perf_counter() - started)
        return times

    async def both() -> tuple[list[float], list[float]]:
        a, b = [], []
        for _ in range(10):  # interleaved rounds
            a += await run(limited)
            b += await run(KEY)
        return a, b

    lim, static = asyncio.run(both())
    store.close()
    return {
        "per_request_us_limited_p50": round(pct(lim, 0.5) * 1e6, 2),
        "per_request_us_static_p50": round(pct(static, 0.5) * 1e6, 2),
        "per_request_us_limited_p99": round(pct(lim, 0.99) * 1e6, 2),
        "samples": len(lim),
    }


async def _overhead_e2e(url: str, rounds: int, per_round: int) -> dict[str, Any]:
    limited = new_key(url, rpm=10**6, tpm=10**9, max_concurrency=10**4, budget_usd=1e6)
    seen: dict[str, list[float]] = {"limited": [], "static": []}
    async with httpx.AsyncClient(timeout=30) as client:
        for _ in range(rounds):
            for name, key in (("limited", limited), ("static", KEY)):
                for _ in range(per_round):
                    status, took = await chat(client, url, key, 1)
                    assert status == 200, status
                    seen[name].append(took)
    lim, static = pct(seen["limited"], 0.5), pct(seen["static"], 0.5)
    return {
        "e2e_p50_ms_limited": round(lim * 1e3, 3),
        "e2e_p50_ms_static": round(static * 1e3, 3),
        "e2e_p50_difference_ms": round((lim - static) * 1e3, 3),
        "samples_each": len(seen["limited"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--parts",
        nargs="+",
        default=["overhead", "fairness", "priority", "rate"],
        choices=["overhead", "fairness", "priority", "rate"],
    )
    parser.add_argument("--rpm", type=int, default=300)
    parser.add_argument("--seconds", type=float, default=20.0, help="fairness: how long both keys send")
    parser.add_argument("--count", type=int, default=300, help="priority: interactive requests per phase")
    parser.add_argument(
        "--sampled", action="store_true", help="sampled requests (temperature 1): the nodes write every answer's text"
    )
    parser.add_argument("--flood", nargs=3, metavar=("URL", "KEY", "CLIENTS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    SETTINGS["temperature"] = 1.0 if args.sampled else 0.0
    if args.flood:
        url, key, clients = args.flood
        served = [0, 0]
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(closed_loop(url, key, int(clients), 3600, TOKENS, served))
        print(json.dumps(served))
        return
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if "overhead" in args.parts:
            say("overhead: in-process")
            out["overhead"] = overhead_in_process(root, 2000)
        if "overhead" in args.parts:
            grid = one_gateway(root / "fast", 1, NODE_ARGS)
            try:
                say("overhead: end to end")
                out["overhead"] |= asyncio.run(_overhead_e2e(grid.url, 10, 40))
            finally:
                grid.stop()
        if {"fairness", "priority"} & set(args.parts):
            grid = one_gateway(root / "slow", 2, SLOW_FIRST)
            try:
                if "fairness" in args.parts:
                    say("fairness: equal keys")
                    out["fairness_equal"] = asyncio.run(_fairness(grid.url, args.seconds, (16, 16)))
                    say("fairness: one key with three times the other's clients")
                    out["fairness_skewed"] = asyncio.run(_fairness(grid.url, args.seconds, (24, 8)))
                if "priority" in args.parts:
                    say("priority")
                    out["priority"] = asyncio.run(_priority(grid.url, args.count))
            finally:
                grid.stop()
        if "rate" in args.parts:
            out["rate"] = rate(root / "rate", args.rpm)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
