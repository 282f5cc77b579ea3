"""Faithfulness: replay a trace against a real grid on 127.0.0.1 (gateway + emulated nodes, streaming over
HTTP), simulate the same requests on the same cards, and compare the TTFT and TPOT distributions.

The real figures are the gateway's own record of each request (`GET /v1/decisions/{id}`): TTFT from dispatch to
the first token, TPOT as (last token - first token) / (tokens - 1) on the node that finished. That is what a
client next to the gateway sees, less the client's own time: the replaying client here shares a small machine
with the grid (and, in the test suite, with other tests), and a client starved of CPU reads its streams late,
which the simulator does not model and should not. The client's own wall-clock figures are kept beside them
(`client_ttft_s`, `client_tpot_s`) and reported. The simulation replays the same arrival times with the prompt and
output token counts the real run reported (`usage`), on nodes with the same cards, loopback round trips, and
nothing left to chance (no churn, throttling, dishonest nodes, stragglers or noise).
"""

import asyncio
import json
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from gridserve.engines.tokencount import count_tokens
from gridserve.scheduler import named_profile
from gridserve.sim.engine import Outcome, Simulation
from gridserve.sim.grid import SimConfig
from gridserve.sim.trace import TraceRequest

CALM: dict[str, Any] = {
    "churn": False,
    "thermal_per_hour": 0.0,
    "dishonest_share": 0.0,
    "straggler_share": 0.0,
    "noise_sigma": 0.0,
    "rtt_s": 0.001,
}
WORDS = ["grid", "node", "token", "cache", "batch", "prefill", "decode", "route", "score", "queue", "slot", "stream"]


@dataclass(frozen=True)
class Measured:
    at_s: float
    prompt_tokens: int
    output_tokens: int
    ttft_s: float
    """As the gateway measured it (its decision record)."""
    tpot_s: float
    client_ttft_s: float
    """As the replaying client measured it, from sending the request to reading the first token."""
    client_tpot_s: float


@dataclass(frozen=True)
class _Streamed:
    """One request as the client saw it, and the gateway's decision id for it."""

    at_s: float
    decision_id: str
    ttft_s: float
    tpot_s: float


def synthetic(n: int, rate: float, seed: int = 0) -> list[TraceRequest]:
    """Poisson arrivals; prompts of 500-4000 tokens (as an emulated node counts them: `prompt_of`), outputs of
    20-200 tokens asked for."""
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        out.append(TraceRequest(t, rng.randint(500, 4000), rng.randint(20, 200)))
        t += rng.expovariate(rate)
    return out


def prompt_of(tokens: int, rng: random.Random) -> str:
    """Words that make about `tokens` tokens as an emulated node counts them (engines/tokencount.py: each word
    is a piece of its own, so the text's count is the sum of its words')."""
    words: list[str] = []
    counted = 0
    while counted < tokens:
        words.append(rng.choice(WORDS))
        counted += count_tokens(" " + words[-1])
    return " ".join(words)


async def _one(client: httpx.AsyncClient, model: str, req: TraceRequest, start: float, seed: int) -> _Streamed | str:
    """The request streamed as the client saw it, or why it did not complete (one line)."""
    await asyncio.sleep(max(0.0, start + req.at_s - time.monotonic()))
    body = {
        "model": model,
        "prompt": prompt_of(req.prompt_tokens, random.Random(seed)),
        "max_tokens": req.output_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "gridserve": {"hedge": False},
    }
    sent = time.monotonic()
    first = last = None
    tokens = 0
    async with client.stream("POST", "/v1/completions", json=body) as resp:
        if resp.status_code != 200:
            return f"HTTP {resp.status_code}: {(await resp.aread()).decode(errors='replace')[:300]}"
        decision_id = resp.headers.get("x-gridserve-decision", "")
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices"):
                now = time.monotonic()
                first = now if first is None else first
                last = now
            if chunk.get("usage"):
                tokens = int(chunk["usage"]["completion_tokens"])
    if first is None or last is None or not tokens or not decision_id:
        return f"incomplete stream (first token read: {first is not None}, usage: {tokens}, decision: {decision_id!r})"
    tpot = (last - first) / (tokens - 1) if tokens > 1 else math.nan
    return _Streamed(sent - start, decision_id, first - sent, tpot)


async def _measured(client: httpx.AsyncClient, streamed: _Streamed, headers: dict[str, str]) -> Measured | str:
    """The gateway's record of a streamed request, or why it has none that ended ok with a measured TTFT."""
    resp = await client.get(f"/v1/decisions/{streamed.decision_id}", headers=headers)
    if resp.status_code != 200:
        return f"decision {streamed.decision_id}: HTTP {resp.status_code}"
    record = resp.json()
    timing, usage = record.get("timing") or {}, record.get("usage") or {}
    if record.get("status") != "ok" or timing.get("ttft_s") is None:
        route = [(r.get("node_id", "")[:10], r.get("outcome"), r.get("detail")) for r in record.get("route") or []]
        return f"decision {streamed.decision_id}: status {record.get('status')}, ttft {timing.get('ttft_s')}, {route}"
    tokens = int(usage["completion_tokens"])
    itl = timing.get("itl_s")
    return Measured(
        at_s=streamed.at_s,
        prompt_tokens=int(usage["prompt_tokens"]),
        output_tokens=tokens,
        ttft_s=float(timing["ttft_s"]),
        tpot_s=float(itl) if itl is not None else math.nan,
        client_ttft_s=streamed.ttft_s,
        client_tpot_s=streamed.tpot_s,
    )


async def _replay(
    url: str, api_key: str, model: str, trace: Sequence[TraceRequest], admin_token: str | None
) -> list[Measured | str]:
    headers = {"Authorization": f"Bearer {api_key}"}
    limits = httpx.Limits(max_connections=len(trace), max_keepalive_connections=32)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=120, limits=limits) as client:
        start = time.monotonic() + 0.5
        streamed = await asyncio.gather(*(_one(client, model, r, start, i) for i, r in enumerate(trace)))
        admin = {"Authorization": f"Bearer {admin_token or api_key}"}
        return [s if isinstance(s, str) else await _measured(client, s, admin) for s in streamed]


@dataclass(frozen=True)
class Replayed:
    measured: list[Measured]
    """The requests that completed, as the gateway recorded them."""
    failed: list[str]
    """Why each of the others did not (one line each, the trace's index first)."""


def replay(
    url: str, api_key: str, model: str, trace: Sequence[TraceRequest], admin_token: str | None = None
) -> Replayed:
    """Send each request at its arrival time (streaming), then read the gateway's record of each. The decision
    records are read with `admin_token` (the API key if None)."""
    results = asyncio.run(_replay(url, api_key, model, trace, admin_token))
    measured = [r for r in results if isinstance(r, Measured)]
    failed = [f"#{i}: {r}" for i, r in enumerate(results) if isinstance(r, str)]
    return Replayed(measured, failed)


def simulate(measured: Sequence[Measured], cards: Sequence[str], model: str, seed: int = 0) -> list[Outcome]:
    """The same arrivals and token counts on a simulated grid of the same cards."""
    if not measured:
        raise ValueError("nothing measured to simulate")
    config = SimConfig(nodes=len(cards), cards=tuple(cards), model=model, seed=seed, **CALM)
    ordered = sorted(measured, key=lambda m: m.at_s)
    t0 = ordered[0].at_s
    trace = [TraceRequest(m.at_s - t0, max(1, m.prompt_tokens), max(1, m.output_tokens)) for m in ordered]
    return Simulation(config, named_profile("default")).run(trace)


def _quantile(values: Sequence[float], q: float) -> float:
    finite = sorted(v for v in values if math.isfinite(v))
    return finite[min(len(finite) - 1, int(q * len(finite)))]


def compare(measured: Sequence[Measured], simulated: Sequence[Outcome]) -> dict[str, Any]:
    """p50 and p90 of TTFT and TPOT, real vs simulated, with the relative difference (sim / real - 1).
    TPOT only over answers of two tokens or more."""
    out: dict[str, Any] = {"requests": len(measured)}
    columns = {
        "ttft": ([m.ttft_s for m in measured], [o.ttft_s for o in simulated]),
        "tpot": (
            [m.tpot_s for m in measured if m.output_tokens > 1],
            [o.tpot_s for o in simulated if o.output_tokens > 1],
        ),
    }
    client = {
        "ttft": [m.client_ttft_s for m in measured],
        "tpot": [m.client_tpot_s for m in measured if m.output_tokens > 1],
    }
    for name, (real, sim) in columns.items():
        for q in (0.5, 0.9):
            r, s, c = _quantile(real, q), _quantile(sim, q), _quantile(client[name], q)
            out[f"{name}_p{int(q * 100)}"] = {
                "real_s": round(r, 4),
                "sim_s": round(s, 4),
                "diff": round(s / r - 1, 4),
                "client_s": round(c, 4),
            }
    return out
