"""Gateway overhead: streaming requests straight to an emulated node vs through the gateway.

The node is `emulated:rtx4090` with fixed timings (20 ms to first token, 10 ms between tokens, 32 tokens),
so any difference is the gateway's. Direct requests are signed with the gateway's own key, exactly as the
gateway signs them. Modes alternate round by round at each concurrency; figures are medians over rounds.
Prints a JSON list of rows; run: `.venv/bin/python bench/gateway_overhead.py [--rounds N]`.
"""

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

import aiohttp

from gridserve.cli.grid import LocalGrid, free_port_block
from gridserve.trust import load_or_create_identity, sign_envelope

MODEL = "llama-3-8b"
TOKENS = 32
KEY = "bench-key"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def direct_once(session: aiohttp.ClientSession, node: dict[str, str], identity: object) -> float:
    payload = {
        "request_id": "bench",
        "model": MODEL,
        "prompt": "benchmark prompt",
        "node_id": node["node_id"],
        "sampling": {"max_tokens": TOKENS, "temperature": 0.0, "top_p": 1.0, "seed": None, "stop": []},
    }
    body = sign_envelope(identity, payload, purpose="generate", now=time.time())  # type: ignore[arg-type]
    start = time.perf_counter()
    ttft = 0.0
    async with session.post(node["endpoint"] + "/internal/generate", data=body) as resp:
        assert resp.status == 200, await resp.text()
        async for line in resp.content:
            if ttft == 0.0 and b'"text"' in line:
                ttft = time.perf_counter() - start
    return ttft


async def gateway_once(session: aiohttp.ClientSession, url: str) -> float:
    body = {"model": MODEL, "prompt": "benchmark prompt", "max_tokens": TOKENS, "temperature": 0, "stream": True}
    start = time.perf_counter()
    ttft = 0.0
    async with session.post(url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}) as resp:
        assert resp.status == 200, await resp.text()
        async for line in resp.content:
            if ttft == 0.0 and line.startswith(b"data: {") and b'"text":"' in line:
                ttft = time.perf_counter() - start
    return ttft


async def run_batch(make: object, concurrency: int, requests: int) -> tuple[list[float], float]:
    ttfts: list[float] = []
    queue = list(range(requests))

    async def worker() -> None:
        while queue:
            queue.pop()
            ttfts.append(await make())  # type: ignore[operator]

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return ttfts, requests / (time.perf_counter() - start)


async def measure(grid: LocalGrid, identity: object, levels: list[int], rounds: int) -> list[dict[str, float]]:
    node = grid.nodes()[0]
    connector = aiohttp.TCPConnector(limit=0)
    rows = []
    async with aiohttp.ClientSession(connector=connector) as session:
        for _ in range(3):  # warm up both paths (connections, caches)
            await direct_once(session, node, identity)
            await gateway_once(session, grid.url)
        for concurrency in levels:
            requests = max(32, concurrency * 4)
            direct: dict[str, list[float]] = {"ttft": [], "rps": []}
            via: dict[str, list[float]] = {"ttft": [], "rps": []}
            for r in range(rounds):
                order = [("direct", direct), ("gateway", via)]
                for name, sink in order if r % 2 == 0 else order[::-1]:
                    if name == "direct":
                        once = lambda: direct_once(session, node, identity)  # noqa: E731
                    else:
                        once = lambda: gateway_once(session, grid.url)  # noqa: E731
                    ttfts, rps = await run_batch(once, concurrency, requests)
                    sink["ttft"].extend(ttfts)
                    sink["rps"].append(rps)
            d50, d99 = percentile(direct["ttft"], 0.5) * 1e3, percentile(direct["ttft"], 0.99) * 1e3
            g50, g99 = percentile(via["ttft"], 0.5) * 1e3, percentile(via["ttft"], 0.99) * 1e3
            drps, grps = statistics.median(direct["rps"]), statistics.median(via["rps"])
            rows.append(
                {
                    "concurrency": concurrency,
                    "direct_ttft_p50_ms": round(d50, 3),
                    "direct_ttft_p99_ms": round(d99, 3),
                    "gateway_ttft_p50_ms": round(g50, 3),
                    "gateway_ttft_p99_ms": round(g99, 3),
                    "added_ttft_p50_ms": round(g50 - d50, 3),
                    "added_ttft_p99_ms": round(g99 - d99, 3),
                    "direct_rps": round(drps, 2),
                    "gateway_rps": round(grps, 2),
                    "gateway_rps_share": round(grps / drps, 3),
                    "requests_per_mode": requests * rounds,
                }
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--concurrency", type=int, nargs="*", default=[1, 16, 64])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        grid = LocalGrid(
            data_dir=Path(tmp),
            port=free_port_block(4),
            api_key=KEY,
            admin_token="bench-admin",
            engines=["emulated:rtx4090"],
            threads=1,
            extra_node_args=["--fixed-ttft-ms", "20", "--fixed-itl-ms", "10", "--log-level", "warning"],
            extra_gateway_args=["--log-level", "warning"],
        )
        try:
            grid.start(timeout_s=120)
            identity = load_or_create_identity(Path(tmp) / "gateway.key")
            rows = asyncio.run(measure(grid, identity, args.concurrency, args.rounds))
        finally:
            grid.stop()
    print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
