"""Admission under a Sybil flood, the gateway's limits on and off side by side in one run.

Each mode starts a fresh local grid (a gateway and two emulated nodes serving `llama-3-8b`) and then:

1. **Before**: `--chats` chat requests one after another; their latency and the gateway's RSS.
2. **Flood from one address**: `--identities` fresh Ed25519 identities register from 127.0.0.1 as fast as
   `--concurrency` connections allow, while the chats run again. Accepted and refused (429) registrations per
   second, the chats' latency during the flood, the gateway's RSS after.
3. **Flood from many addresses**: as many more identities, spread over `--addresses` loopback source addresses
   (127.0.0.2, ...), to show the overall limit.
4. **Traffic share**: the share of the chats sent after the floods that the flood's identities served (their
   endpoints answer nothing, as a Sybil that only registers; a flood that serves is issue 17's next slice).

Modes: `limits` (the gateway's defaults: 20 then 1/s per address, 20/s overall) and `open` (limits raised out of
reach: what the flood did before admission limits). Prints JSON; run: `.venv/bin/python bench/admission.py`
(about 2 minutes).
"""

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
from rich.console import Console
from rich.progress import Progress

from gridserve.cli.grid import LocalGrid, free_port_block
from gridserve.trust import Identity, sign_envelope
from gridserve.types import Capability, HardwareInfo, ModelOffer, NodeId, RuntimeInfo

MODEL = "llama-3-8b"
KEY = "bench-key"
ADMIN = "bench-admin"
MODES = {
    "limits": [],
    "open": ["--registration-rate", "100000", "--registration-burst", "100000", "--registration-rate-total", "100000"],
}


def registration(identity: Identity) -> bytes:
    cap = Capability(
        node_id=NodeId(identity.node_id),
        public_key=identity.public_key,
        endpoint="http://127.0.0.1:9",
        engine="sybil",
        models=(ModelOffer(name=MODEL, weights_digest=f"emulated:{MODEL}"),),
        hardware=HardwareInfo(accelerator="h100-sxm"),
        runtime=RuntimeInfo(gridserve="0", python="3.11", engine="sybil"),
    )
    return sign_envelope(identity, {"capability": cap.model_dump(mode="json")}, purpose="register", now=time.time())


async def flood(url: str, bodies: list[bytes], addresses: list[str], concurrency: int) -> dict[str, Any]:
    """Registers every body, spread over `addresses` (source addresses), `concurrency` at a time."""
    clients = [
        httpx.AsyncClient(base_url=url, transport=httpx.AsyncHTTPTransport(local_address=a), timeout=30)
        for a in addresses
    ]
    statuses: list[tuple[float, int]] = []
    queue = list(enumerate(bodies))
    started = time.monotonic()

    async def worker() -> None:
        while queue:
            i, body = queue.pop()
            client = clients[i % len(clients)]
            resp = await client.post("/nodes/register", content=body, headers={"content-type": "application/json"})
            statuses.append((time.monotonic() - started, resp.status_code))

    try:
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    finally:
        await asyncio.gather(*(c.aclose() for c in clients))
    took = time.monotonic() - started
    accepted = sum(1 for _, s in statuses if s == 200)
    return {
        "identities": len(bodies),
        "addresses": len(addresses),
        "seconds": round(took, 2),
        "accepted": accepted,
        "refused_429": sum(1 for _, s in statuses if s == 429),
        "other": sum(1 for _, s in statuses if s not in (200, 429)),
        "accepted_per_s": round(accepted / took, 1),
    }


async def chats(url: str, count: int) -> tuple[list[float], list[str]]:
    """`count` chats one after another: their latencies (ms) and the nodes that served them."""
    latencies, served = [], []
    async with httpx.AsyncClient(base_url=url, timeout=60, headers={"Authorization": f"Bearer {KEY}"}) as client:
        for i in range(count):
            body = {"model": MODEL, "messages": [{"role": "user", "content": f"hello {i}"}], "max_tokens": 8}
            started = time.perf_counter()
            resp = await client.post("/v1/chat/completions", json=body)
            latencies.append((time.perf_counter() - started) * 1e3)
            served.append(
                resp.headers.get("x-gridserve-node", "") if resp.status_code == 200 else f"{resp.status_code}"
            )
    return latencies, served


def list_models_ms(url: str, times: int = 5) -> float:
    """Median time of `GET /v1/models` with every registered identity's offers behind it."""
    took = []
    with httpx.Client(base_url=url, timeout=60, headers={"Authorization": f"Bearer {KEY}"}) as client:
        for _ in range(times):
            started = time.perf_counter()
            client.get("/v1/models").raise_for_status()
            took.append((time.perf_counter() - started) * 1e3)
    return round(statistics.median(took), 1)


def rss_mb(grid: LocalGrid) -> float:
    return round(psutil.Process(grid.procs["gateway"].pid).memory_info().rss / 2**20, 1)


async def during(url: str, bodies: list[bytes], addresses: list[str], args: argparse.Namespace) -> tuple[Any, Any]:
    flooding = asyncio.create_task(flood(url, bodies, addresses, args.concurrency))
    latencies, _ = await chats(url, args.chats)
    return await flooding, latencies


def one_mode(mode: str, args: argparse.Namespace, progress: Progress, task: Any) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        grid = LocalGrid(
            Path(tmp),
            free_port_block(6),
            KEY,
            ADMIN,
            ["emulated:rtx4090"] * 2,
            threads=1,
            extra_node_args=["--model", MODEL, "--fixed-ttft-ms", "20", "--fixed-itl-ms", "5"],
            extra_gateway_args=["--canary-interval", "0", *MODES[mode]],
        )
        try:
            grid.start(timeout_s=120)
            honest = {n["node_id"] for n in grid.nodes()}
            before, _ = asyncio.run(chats(grid.url, args.chats))
            rss_before = rss_mb(grid)
            progress.advance(task)
            one = [registration(Identity.generate()) for _ in range(args.identities)]
            one_address, during_one = asyncio.run(during(grid.url, one, ["127.0.0.1"], args))
            progress.advance(task)
            many = [registration(Identity.generate()) for _ in range(args.identities)]
            addresses = [f"127.0.0.{2 + i}" for i in range(args.addresses)]
            many_addresses, during_many = asyncio.run(during(grid.url, many, addresses, args))
            rss_after = rss_mb(grid)
            models_ms = list_models_ms(grid.url)
            after, served = asyncio.run(chats(grid.url, args.chats))
            progress.advance(task)
            registered = len(grid.nodes())
        finally:
            grid.stop()
    sybil_served = sum(1 for s in served if s and s not in honest and not s.isdigit())
    return {
        "flood_one_address": one_address,
        "flood_many_addresses": many_addresses,
        "identities_registered": registered - len(honest),
        "chat_ms_median": {
            "before": round(statistics.median(before), 1),
            "during_one_address_flood": round(statistics.median(during_one), 1),
            "during_many_address_flood": round(statistics.median(during_many), 1),
            "after": round(statistics.median(after), 1),
        },
        "gateway_rss_mb": {"before": rss_before, "after": rss_after},
        "list_models_ms_median_after_floods": models_ms,
        "chats_after_served_by_flood_identities": f"{sybil_served}/{len(served)}",
        "chats_after_failed": sum(1 for s in served if s.isdigit()),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--identities", type=int, default=1000, help="identities per flood")
    parser.add_argument("--addresses", type=int, default=50, help="source addresses of the second flood")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--chats", type=int, default=20)
    args = parser.parse_args()
    report: dict[str, Any] = {}
    with Progress(console=Console(stderr=True)) as progress:
        task = progress.add_task("admission: limits on, then open", total=3 * len(MODES))
        for mode in MODES:
            report[mode] = one_mode(mode, args, progress, task)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
