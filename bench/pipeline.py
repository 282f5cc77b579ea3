"""Layer-split pipelines of the real Gemma 3 270M on 127.0.0.1 against one whole-model node, and the planner
against its baselines.

Three local grids run side by side (each: a gateway and its nodes, same torch thread count): one whole-model
node; two stage nodes (layers [0, 9) and [9, 18)); three stage nodes ([0, 6), [6, 12), [12, 18)). The same
greedy streaming request goes to each grid in turn (`--reps` rounds, medians); decode tokens/s is measured by
the client between the first and the last token. Activation bytes per token: the hidden-state frames between
stages (both directions, headers and signatures included) per generated token; the last stage's logits
(vocabulary x 4 bytes) are counted apart.

Prints one JSON object: {"rows": [{"stages", "tokens_per_s_single", "tokens_per_s_pipeline", "overhead_pct",
"activation_bytes_per_token", "logits_bytes_per_token", "same_text"}], "planner": [...bench/planner.py rows]}.
Run: `.venv/bin/python bench/pipeline.py` (about 5 minutes; the first run converts the Gemma cache).
"""

import argparse
import importlib.util
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.progress import Progress

from gridserve.cli.grid import LocalGrid, free_port_block
from gridserve.engines.gemma import GEMMA_MODEL, ensure_cache

API_KEY, ADMIN = "bench-key", "bench-admin"
PROMPT = "Write a long, detailed story about a lighthouse keeper who finds a message in a bottle."
SPLITS = {1: [], 2: ["0:9", "9:18"], 3: ["0:6", "6:12", "12:18"]}


def start_grid(root: Path, stages: list[str], threads: int) -> LocalGrid:
    engines = ["gemma-270m"] * max(1, len(stages))
    port = free_port_block(len(engines) + 4)
    grid = LocalGrid(data_dir=root, port=port, api_key=API_KEY, admin_token=ADMIN, engines=engines, threads=threads)
    grid.start_gateway()
    for index, layers in enumerate(stages or [None]):
        grid.start_node(index, "gemma-270m", ["--layers", layers] if layers else [])
    grid.wait_nodes(len(engines), 600)
    return grid


def stream(grid: LocalGrid, max_tokens: int) -> tuple[str, float, int]:
    """(text, decode tokens/s between first and last token, completion tokens)."""
    body = {
        "model": GEMMA_MODEL,
        "prompt": PROMPT,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    headers = {"Authorization": f"Bearer {API_KEY}"}
    stamps: list[float] = []
    text: list[str] = []
    tokens = 0
    with httpx.stream("POST", grid.url + "/v1/completions", json=body, headers=headers, timeout=300) as resp:
        resp.raise_for_status()
        for line in resp.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = int(chunk["usage"]["completion_tokens"])
            if chunk.get("choices") and chunk["choices"][0].get("text"):
                stamps.append(time.perf_counter())
                text.append(chunk["choices"][0]["text"])
    rate = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else 0.0
    return "".join(text), rate, tokens


def frame_bytes(grid: LocalGrid) -> tuple[float, float]:
    """(hidden-state bytes per token between stages, logits bytes per token) of the grid's last pipeline run."""
    run = httpx.get(grid.url + "/admin/pipelines", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=10).json()
    last = run["runs"][-1]
    stages = sorted(last["stages"], key=lambda s: s["layers"][0])
    tokens = max(1, int(last["completion_tokens"]))
    hidden = sum(s["sent_bytes"] for s in stages[1:]) + sum(s["received_bytes"] for s in stages[:-1])
    return hidden / tokens, stages[-1]["received_bytes"] / tokens


def planner_rows() -> list[dict[str, Any]]:
    path = Path(__file__).with_name("planner.py")
    spec = importlib.util.spec_from_file_location("bench_planner", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return list(module.rows(rtt_s=0.004))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    ensure_cache()
    grids: dict[int, LocalGrid] = {}
    rates: dict[int, list[float]] = {n: [] for n in SPLITS}
    texts: dict[int, set[str]] = {n: set() for n in SPLITS}
    with tempfile.TemporaryDirectory() as tmp, Progress(transient=True, console=Console(stderr=True)) as progress:
        try:
            task = progress.add_task("starting grids", total=len(SPLITS))
            for n, split in SPLITS.items():
                grids[n] = start_grid(Path(tmp) / f"grid{n}", split, args.threads)
                progress.advance(task)
            for grid in grids.values():  # warm-up (first forward, tokenizer load)
                stream(grid, 4)
            task = progress.add_task("measuring", total=args.reps * len(SPLITS))
            for _ in range(args.reps):
                for n, grid in grids.items():
                    text, rate, _ = stream(grid, args.max_tokens)
                    rates[n].append(rate)
                    texts[n].add(text)
                    progress.advance(task)
            sizes = {n: frame_bytes(grids[n]) for n in SPLITS if n > 1}
        finally:
            for grid in grids.values():
                grid.stop()
    single = statistics.median(rates[1])
    rows = []
    for n in (2, 3):
        piped = statistics.median(rates[n])
        rows.append(
            {
                "stages": n,
                "tokens_per_s_single": round(single, 3),
                "tokens_per_s_pipeline": round(piped, 3),
                "overhead_pct": round((single / piped - 1) * 100, 1),
                "activation_bytes_per_token": round(sizes[n][0]),
                "logits_bytes_per_token": round(sizes[n][1]),
                "same_text": texts[n] == texts[1] and len(texts[1]) == 1,
                "runs_tokens_per_s": [round(r, 3) for r in rates[n]],
            }
        )
    report = {
        "model": GEMMA_MODEL,
        "threads": args.threads,
        "max_tokens": args.max_tokens,
        "reps": args.reps,
        "runs_tokens_per_s_single": [round(r, 3) for r in rates[1]],
        "rows": rows,
        "planner": planner_rows(),
    }
    json.dump(report, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
