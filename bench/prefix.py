"""Prefix-aware routing on a real grid: multi-turn chats through the gateway with the official OpenAI SDK, the
same workload on the same kind of grid with prefix routing on and off, side by side in one run.

Each mode starts its own grid (fresh nodes, empty caches): a gateway and `--nodes` nodes of `--engine`
(default gemma-270m, the real model; `tiny` for a quick check). `--chats` conversations of `--turns` turns each
run at once, as users do (each user's turns one after the other, the users' first turns `--stagger-s` apart): a
prefix-blind gateway spreads the turns by load and its other signals, a prefix-aware one weighs where each
chat's history is cached.
Every chat has its own long system prompt; each turn adds a question and the answer (greedy, `--max-tokens`).

Per mode: client TTFT (time to the first streamed content) p50 and p99 over all turns and over turns >= 2, and
each answer's whole time (e2e: the scheduler weighs it, since a node shared by more streams decodes each slower); the
prompt tokens nodes reported cached (`usage.prompt_tokens_details.cached_tokens`) against those the gateway's
prefix index expected (its decision record, as a share of the prompt in the node's own tokens); and which node
served each turn. JSON on stdout, progress on stderr.

Run: `.venv/bin/python bench/prefix.py [--engine gemma-270m] [--nodes 3] [--chats 6] [--turns 4]`
"""

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
from openai import OpenAI

from gridserve.cli.grid import LocalGrid, free_port_block
from stats import percentile_or_none as percentile

KEY, ADMIN = "bench-key", "bench-admin"
TOPICS = ("rivers", "bridges", "markets", "gardens", "engines", "libraries", "harbours", "forests")
FILLER = (
    "the grid keeps each answer close to the data it needs and the nodes that hold it cached answer first "
    "while others wait for their turn in the queue of work that arrives from every side of the network"
)
WORDS = FILLER.split()


def system_prompt(topic: str, chars: int, rng: random.Random) -> str:
    words = [f"You are a guide to {topic}."]
    while sum(len(w) + 1 for w in words) < chars:
        words.append(rng.choice(WORDS))
    return " ".join(words)


def one_turn(client: OpenAI, engine_model: str, messages: list[dict[str, str]], max_tokens: int) -> dict[str, Any]:
    start = time.perf_counter()
    ttft = None
    text, usage, headers = "", None, {}
    with client.chat.completions.with_streaming_response.create(
        model=engine_model,
        messages=messages,  # type: ignore[arg-type]
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    ) as response:
        headers = dict(response.headers)
        for chunk in response.parse():
            if chunk.choices and chunk.choices[0].delta.content:
                if ttft is None:
                    ttft = time.perf_counter() - start
                text += chunk.choices[0].delta.content
            if chunk.usage is not None:
                usage = chunk.usage
    assert usage is not None, "no usage chunk"
    details = usage.prompt_tokens_details
    return {
        "e2e_s": time.perf_counter() - start,
        "ttft_s": ttft if ttft is not None else time.perf_counter() - start,
        "text": text,
        "prompt_tokens": usage.prompt_tokens,
        "cached_tokens": (details.cached_tokens or 0) if details is not None else 0,
        "node": headers.get("x-gridserve-node", ""),
        "decision": headers.get("x-gridserve-decision", ""),
    }


def decision_record(grid: LocalGrid, decision_id: str) -> dict[str, Any]:
    return dict(
        httpx.get(
            f"{grid.url}/v1/decisions/{decision_id}", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=10
        ).json()
    )


def expected_share(record: dict[str, Any], node: str) -> float:
    """The share of the prompt the gateway's prefix index expected `node` to hold."""
    candidate = next((c for c in record["candidates"] if c["node_id"] == node), None)
    estimate = record["requirements"]["prompt_tokens_estimate"]
    return float((candidate or {}).get("cached_tokens", 0) / estimate) if estimate else 0.0


def candidate_brief(record: dict[str, Any], node: str) -> dict[str, Any] | None:
    """One candidate's total score, its per-scorer contributions (raw figure in brackets), its predicted TTFT
    and what the index expected it to hold: enough to see why a turn left (or kept) the node with its prefix."""
    c = next((c for c in record["candidates"] if c["node_id"] == node), None)
    if c is None:
        return None
    return {
        "node": node[:10],
        "score": c["score"],
        "predicted_ttft_s": c["predicted_ttft_s"],
        "cached_tokens": c.get("cached_tokens", 0),
        "prefill_saved_s": c.get("prefill_saved_s"),
        "scores": {d["scorer"]: f"{d['contribution']:.4f} ({d['raw']:.3g})" for d in c["scores"]},
    }


def run_mode(args: argparse.Namespace, routing: bool) -> dict[str, Any]:
    mode = "prefix routing on" if routing else "prefix routing off"
    with tempfile.TemporaryDirectory(prefix="bench-prefix-") as tmp:
        data = Path(tmp) if args.keep is None else args.keep / ("on" if routing else "off")
        grid = LocalGrid(
            data_dir=data,
            port=free_port_block(args.nodes + 4),
            api_key=KEY,
            admin_token=ADMIN,
            engines=[args.engine] * args.nodes,
            threads=args.threads,
            # Every node established from the start (--vetting-checks 0): this measures routing among a grid's
            # established nodes; on a fresh grid the first node vetted would hold the others back until they pass
            # their checks (docs/operators.md, "A new node earns its traffic"), whatever they hold in cache.
            extra_gateway_args=["--vetting-checks", "0", *([] if routing else ["--no-prefix-routing"])],
        )
        try:
            print(f"{mode}: starting {args.nodes} x {args.engine} ...", file=sys.stderr)
            grid.start(timeout_s=900)
            model = grid.nodes()[0]["models"][0]["name"]
            rng = random.Random(args.seed)
            systems = [system_prompt(TOPICS[i % len(TOPICS)], args.system_chars, rng) for i in range(args.chats)]
            turns: list[dict[str, Any]] = []
            with ThreadPoolExecutor(max_workers=args.chats) as pool:
                for chat_turns in pool.map(lambda i: chat(grid, args, model, i, systems[i], mode), range(args.chats)):
                    turns.extend(chat_turns)
        finally:
            grid.stop()
    return summarize(mode, turns)


def chat(grid: LocalGrid, args: argparse.Namespace, model: str, i: int, system: str, mode: str) -> list[dict[str, Any]]:
    """One user's conversation, turn after turn (the users run at once, each starting a little later)."""
    time.sleep(i * args.stagger_s)
    client = OpenAI(base_url=grid.url + "/v1", api_key=KEY, max_retries=0, timeout=600)
    messages = [{"role": "system", "content": system}]
    out = []
    for turn in range(args.turns):
        messages.append({"role": "user", "content": f"Question {turn + 1}: tell me one more thing."})
        result = one_turn(client, model, messages, args.max_tokens)
        messages.append({"role": "assistant", "content": result["text"]})
        record = decision_record(grid, result["decision"])
        share, why = expected_share(record, result["node"]), str(record.get("explanation", ""))
        previous = out[-1]["node"] if out else None
        result.update(chat=i, turn=turn + 1, expected_cached=round(share * result["prompt_tokens"]), why=why)
        if previous is not None and previous != result["node"]:
            result["moved"] = {
                "picked_by": record.get("picked_by"),
                "chosen": candidate_brief(record, result["node"]),
                "previous": candidate_brief(record, previous),
            }
        out.append(result)
        print(
            f"{mode}: chat {i} turn {turn + 1}: ttft {result['ttft_s'] * 1e3:.0f} ms on {result['node'][:10]},"
            f" cached {result['cached_tokens']}/{result['prompt_tokens']} (index expected {result['expected_cached']})"
            f"\n    {why}",
            file=sys.stderr,
        )
    return out


def summarize(mode: str, turns: list[dict[str, Any]]) -> dict[str, Any]:
    later = [t for t in turns if t["turn"] >= 2]
    all_ttft = [t["ttft_s"] for t in turns]
    later_ttft = [t["ttft_s"] for t in later]
    same_node = sum(
        1
        for t in later
        if t["node"] == next(u["node"] for u in turns if u["chat"] == t["chat"] and u["turn"] == t["turn"] - 1)
    )
    return {
        "mode": mode,
        "requests": len(turns),
        "ttft_p50_s": percentile(all_ttft, 0.5),
        "ttft_p99_s": percentile(all_ttft, 0.99),
        "later_turns_ttft_p50_s": percentile(later_ttft, 0.5),
        "later_turns_ttft_p99_s": percentile(later_ttft, 0.99),
        "e2e_p50_s": percentile([t["e2e_s"] for t in turns], 0.5),
        "e2e_p99_s": percentile([t["e2e_s"] for t in turns], 0.99),
        "later_turns_on_previous_node": f"{same_node}/{len(later)}",
        "requests_per_node": sorted(Counter(t["node"] for t in turns).values(), reverse=True),
        "prompt_tokens": sum(t["prompt_tokens"] for t in turns),
        "cached_tokens_reported": sum(t["cached_tokens"] for t in turns),
        "cached_tokens_expected_by_index": sum(t["expected_cached"] for t in turns),
        "cache_hit_rate": round(
            sum(t["cached_tokens"] for t in turns) / max(1, sum(t["prompt_tokens"] for t in turns)), 4
        ),
        "mean_ttft_s": statistics.fmean(all_ttft) if all_ttft else None,
        "moved_turns": [
            {"chat": t["chat"], "turn": t["turn"], "ttft_s": round(t["ttft_s"], 3), **t["moved"]}
            for t in later
            if "moved" in t
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", default="gemma-270m")
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--chats", type=int, default=6)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--system-chars", type=int, default=2400)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stagger-s", type=float, default=0.5, help="between the users' first turns")
    parser.add_argument("--keep", type=Path, default=None, help="keep each grid's logs and store under this folder")
    args = parser.parse_args()
    on = run_mode(args, routing=True)
    off = run_mode(args, routing=False)
    ratio = None
    if on["later_turns_ttft_p50_s"] and off["later_turns_ttft_p50_s"]:
        ratio = round(off["later_turns_ttft_p50_s"] / on["later_turns_ttft_p50_s"], 3)
    print(
        json.dumps(
            {"engine": args.engine, "nodes": args.nodes, "runs": [on, off], "later_turns_p50_speedup": ratio}, indent=2
        )
    )


if __name__ == "__main__":
    main()
