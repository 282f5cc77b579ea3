"""Gateway overhead: streaming requests straight to an emulated node vs through the gateway.

The node is `emulated:rtx4090` with fixed timings (20 ms to first token, 10 ms between tokens, 32 tokens),
so any difference is the gateway's. Direct requests are signed with the gateway's own key, exactly as the
gateway signs them. Modes alternate round by round at each concurrency; figures are medians over rounds.
With `--transport direct outbound`, a second gateway reaches its node (the same emulated card, `--outbound-only`)
over the node's tunnel instead of HTTP, measured in the same rounds: `outbound_vs_direct_*` compare the two.
With `--tools`, every request carries two tools and tool_choice required (the node decodes the call under its
grammar, straight or through the gateway alike): the gateway streams a call from the chunk in which its name is
whole (some tokens into the answer; straight from the node, the first token counts), so the figures to compare are
the whole answer's (`e2e`), with and without `--tools`.
Prints a JSON list of rows; run: `.venv/bin/python bench/gateway_overhead.py [--rounds N] [--transport ...]
[--tools]`.
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
from gridserve.gateway.api.schemas import Message
from gridserve.gateway.api.tools import render, tool_format
from gridserve.trust import load_or_create_identity, sign_envelope
from stats import percentile

MODEL = "llama-3-8b"
TOKENS = 32
KEY = "bench-key"
PARAMS = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 8}, "days": {"type": "integer", "minimum": 1, "maximum": 9}},
    "required": ["city", "days"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "forecast", "parameters": PARAMS}},
    {"type": "function", "function": {"name": "clock", "parameters": {"type": "object", "properties": {}}}},
]
ASK = [{"role": "user", "content": "benchmark prompt"}]
WITH_TOOLS = False
"""`--tools`: every request calls a tool (set by main)."""


def _node_request() -> dict[str, object]:
    """The node's request body, as the gateway makes it (with tools: the rendered turns and the calls' grammar)."""
    sampling: dict[str, object] = {"max_tokens": TOKENS, "temperature": 0.0, "top_p": 1.0, "seed": None, "stop": []}
    if not WITH_TOOLS:
        return {"prompt": "benchmark prompt", "sampling": sampling}
    fmt, described = tool_format(TOOLS, "required", False)
    assert fmt is not None
    turns = render([Message.model_validate(m) for m in ASK], described)
    sampling |= {"max_tokens": 4 * TOKENS, "response_format": fmt.model_dump(mode="json")}
    return {"messages": [t.model_dump() for t in turns], "sampling": sampling}


async def direct_once(session: aiohttp.ClientSession, node: dict[str, str], identity: object) -> tuple[float, float]:
    """(TTFT, whole answer) in seconds, the node called straight."""
    payload = {"request_id": "bench", "model": MODEL, "node_id": node["node_id"], **_node_request()}
    body = sign_envelope(identity, payload, purpose="generate", now=time.time())  # type: ignore[arg-type]
    start = time.perf_counter()
    ttft = 0.0
    async with session.post(node["endpoint"] + "/internal/generate", data=body) as resp:
        assert resp.status == 200, await resp.text()
        async for line in resp.content:
            if ttft == 0.0 and b'"text"' in line:
                ttft = time.perf_counter() - start
    return ttft, time.perf_counter() - start


async def gateway_once(session: aiohttp.ClientSession, url: str) -> tuple[float, float]:
    """(TTFT, whole answer) in seconds through the gateway (with tools: the first chunk of the call)."""
    if WITH_TOOLS:
        path, marker = "/v1/chat/completions", b'"tool_calls":'
        body: dict[str, object] = {"model": MODEL, "messages": ASK, "tools": TOOLS, "tool_choice": "required"}
        body |= {"parallel_tool_calls": False, "max_tokens": 4 * TOKENS}
    else:
        path, marker = "/v1/completions", b'"text":"'
        body = {"model": MODEL, "prompt": "benchmark prompt", "max_tokens": TOKENS}
    body |= {"temperature": 0, "stream": True}
    start = time.perf_counter()
    ttft = 0.0
    async with session.post(url + path, json=body, headers={"Authorization": f"Bearer {KEY}"}) as resp:
        assert resp.status == 200, await resp.text()
        async for line in resp.content:
            if ttft == 0.0 and line.startswith(b"data: {") and marker in line:
                ttft = time.perf_counter() - start
    assert ttft > 0.0, "no answer chunk"
    return ttft, time.perf_counter() - start


async def run_batch(make: object, concurrency: int, requests: int) -> tuple[list[float], list[float], float]:
    """(TTFTs, whole-answer times, requests per second)."""
    ttfts: list[float] = []
    wholes: list[float] = []
    queue = list(range(requests))

    async def worker() -> None:
        while queue:
            queue.pop()
            ttft, whole = await make()  # type: ignore[operator]
            ttfts.append(ttft)
            wholes.append(whole)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return ttfts, wholes, requests / (time.perf_counter() - start)


async def measure(
    grids: dict[str, LocalGrid], identity: object, levels: list[int], rounds: int
) -> list[dict[str, float]]:
    """Per concurrency: the node called straight (the direct grid's node, as its gateway would call it) and each
    gateway in `grids` (by transport), modes alternating in a rotating order round by round."""
    node = grids["direct"].nodes()[0]
    connector = aiohttp.TCPConnector(limit=0)
    rows = []
    async with aiohttp.ClientSession(connector=connector) as session:

        def once_for(mode: str) -> object:
            if mode == "node":
                return lambda: direct_once(session, node, identity)
            return lambda: gateway_once(session, grids[mode].url)

        modes = ["node", *grids]
        for _ in range(3):  # warm up every path (connections, caches)
            for mode in modes:
                await once_for(mode)()  # type: ignore[operator]
        for concurrency in levels:
            requests = max(32, concurrency * 4)
            seen: dict[str, dict[str, list[float]]] = {m: {"ttft": [], "e2e": [], "rps": []} for m in modes}
            for r in range(rounds):
                for mode in modes[r % len(modes) :] + modes[: r % len(modes)]:
                    ttfts, wholes, rps = await run_batch(once_for(mode), concurrency, requests)
                    seen[mode]["ttft"].extend(ttfts)
                    seen[mode]["e2e"].extend(wholes)
                    seen[mode]["rps"].append(rps)
            rows.append(_row(concurrency, requests * rounds, seen))
    return rows


def _row(concurrency: int, requests: int, seen: dict[str, dict[str, list[float]]]) -> dict[str, float]:
    d50, d99 = percentile(seen["node"]["ttft"], 0.5) * 1e3, percentile(seen["node"]["ttft"], 0.99) * 1e3
    drps = statistics.median(seen["node"]["rps"])
    e50 = percentile(seen["node"]["e2e"], 0.5) * 1e3
    row: dict[str, float] = {
        "concurrency": concurrency,
        "tools": WITH_TOOLS,
        "direct_e2e_p50_ms": round(e50, 3),
        "direct_ttft_p50_ms": round(d50, 3),
        "direct_ttft_p99_ms": round(d99, 3),
        "direct_rps": round(drps, 2),
        "requests_per_mode": requests,
    }
    for mode in seen:
        if mode == "node":
            continue
        g50, g99 = percentile(seen[mode]["ttft"], 0.5) * 1e3, percentile(seen[mode]["ttft"], 0.99) * 1e3
        grps = statistics.median(seen[mode]["rps"])
        prefix = "gateway" if mode == "direct" else f"{mode}_gateway"
        w50 = percentile(seen[mode]["e2e"], 0.5) * 1e3
        row |= {
            f"{prefix}_e2e_p50_ms": round(w50, 3),
            f"{prefix}_added_e2e_p50_ms": round(w50 - e50, 3),
            f"{prefix}_ttft_p50_ms": round(g50, 3),
            f"{prefix}_ttft_p99_ms": round(g99, 3),
            f"{prefix}_added_ttft_p50_ms": round(g50 - d50, 3),
            f"{prefix}_added_ttft_p99_ms": round(g99 - d99, 3),
            f"{prefix}_rps": round(grps, 2),
            f"{prefix}_rps_share": round(grps / drps, 3),
        }
    if "direct" in seen and "outbound" in seen:  # the tunnel against the direct transport, side by side
        row["outbound_vs_direct_added_ttft_p50_ms"] = round(
            row["outbound_gateway_ttft_p50_ms"] - row["gateway_ttft_p50_ms"], 3
        )
        row["outbound_vs_direct_share_points"] = round(
            100 * (row["outbound_gateway_rps_share"] - row["gateway_rps_share"]), 1
        )
    return row


def _grid(tmp: Path, transport: str) -> LocalGrid:
    return LocalGrid(
        data_dir=tmp,
        port=free_port_block(4),
        api_key=KEY,
        admin_token="bench-admin",
        engines=["emulated:rtx4090"],
        threads=1,
        extra_node_args=["--fixed-ttft-ms", "20", "--fixed-itl-ms", "10", "--log-level", "warning"],
        extra_gateway_args=["--log-level", "warning"],
        outbound_only=transport == "outbound",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--concurrency", type=int, nargs="*", default=[1, 16, 64])
    parser.add_argument(
        "--transport",
        nargs="+",
        choices=["direct", "outbound"],
        default=["direct"],
        help="gateway-to-node transports to measure side by side (each its own gateway and node; the node called "
        "straight is the direct one's)",
    )
    parser.add_argument("--tools", action="store_true", help="every request calls a tool (see the module's doc)")
    args = parser.parse_args()
    global WITH_TOOLS
    WITH_TOOLS = args.tools
    transports = ["direct", *[t for t in args.transport if t != "direct"]]
    with tempfile.TemporaryDirectory() as tmp:
        grids = {t: _grid(Path(tmp) / t, t) for t in transports}
        try:
            for grid in grids.values():
                grid.start(timeout_s=120)
            identity = load_or_create_identity(Path(tmp) / "direct" / "gateway.key")
            rows = asyncio.run(measure(grids, identity, args.concurrency, args.rounds))
        finally:
            for grid in grids.values():
                grid.stop()
    print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
