"""Simulator speed: (1) the Azure conversation trace over 100 nodes, one policy run (target < 30 s); (2) one
million requests over 10,000 nodes (target < 5 min). Default profile, load 0.8, churn, thermal episodes,
stragglers and 5% dishonest nodes on (the simulator's defaults).

The million requests are the conversation trace repeated end to end (each copy shifted by the trace's length),
then time-scaled to 80% of the 10,000-node grid's capacity. Without ../shared/data, a synthetic trace with the
same size and a similar mix stands in (and the JSON says so).

Prints one JSON object; run: `.venv/bin/python bench/sim_scale.py [--requests 1000000] [--nodes 10000]
[--small-runs 3]`. Wall times are time.perf_counter around `Simulation.run` (building the grid and reading the
trace are reported apart).
"""

import argparse
import json
import platform
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import Progress

from gridserve.scheduler import named_profile
from gridserve.sim.engine import Simulation
from gridserve.sim.grid import SimConfig, grid_capacity_rps
from gridserve.sim.report import metrics
from gridserve.sim.trace import TraceRequest, load_trace, scaled

CONV = Path(__file__).resolve().parents[2] / "shared/data/azure-llm-2023/AzureLLMInferenceTrace_conv.csv"


def conversation_trace() -> tuple[list[TraceRequest], str]:
    if CONV.is_file():
        return load_trace(CONV), str(CONV)
    rng = random.Random(0)
    t, out = 0.0, []
    for _ in range(19_366):  # the conversation trace's size and rate (5.4 req/s), prompt ~1.1k, output ~230
        t += rng.expovariate(5.4)
        out.append(TraceRequest(t, int(rng.lognormvariate(6.6, 0.9)) + 1, int(rng.lognormvariate(5.0, 0.9)) + 1))
    return out, "synthetic (shared/data missing)"


def repeated(trace: list[TraceRequest], n: int) -> list[TraceRequest]:
    span = trace[-1].at_s + (trace[-1].at_s / len(trace))
    out: list[TraceRequest] = []
    copy = 0
    while len(out) < n:
        out.extend(TraceRequest(r.at_s + copy * span, r.prompt_tokens, r.output_tokens) for r in trace)
        copy += 1
    return out[:n]


def at_load(sim: Simulation, config: SimConfig, trace: list[TraceRequest], load: float) -> list[TraceRequest]:
    n = len(trace)
    capacity = grid_capacity_rps(
        sim.nodes,
        sim.model,
        config,
        sum(r.prompt_tokens for r in trace) / n,
        sum(r.output_tokens for r in trace) / n,
    )
    return scaled(trace, load * capacity / (n / trace[-1].at_s))


def one_run(trace: list[TraceRequest], nodes: int, seed: int, progress: Progress | None = None) -> dict[str, Any]:
    config = SimConfig(nodes=nodes, seed=seed)
    t0 = time.perf_counter()
    sim = Simulation(config, named_profile("default"))
    timed = at_load(sim, config, trace, 0.8)
    built = time.perf_counter() - t0
    task = progress.add_task(f"{len(trace):,} requests, {nodes:,} nodes", total=len(trace)) if progress else None

    def advance(k: int) -> None:
        if progress is not None and task is not None:
            progress.advance(task, k)

    t1 = time.perf_counter()
    out = sim.run(timed, advance)
    wall = time.perf_counter() - t1
    m = metrics(out, config)
    return {
        "nodes": nodes,
        "requests": len(trace),
        "setup_s": round(built, 2),
        "run_s": round(wall, 2),
        "us_per_request": round(wall / len(trace) * 1e6, 1),
        "simulated_s": round(timed[-1].at_s, 1),
        "slo_attainment": m["slo_attainment"],
        "failed": m["failed"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=1_000_000)
    parser.add_argument("--nodes", type=int, default=10_000)
    parser.add_argument("--small-runs", type=int, default=3, help="runs of the conversation trace on 100 nodes")
    args = parser.parse_args()
    trace, source = conversation_trace()
    with Progress(transient=True, console=Console(stderr=True)) as progress:
        small = [one_run(trace, 100, seed, progress) for seed in range(args.small_runs)]
        big = one_run(repeated(trace, args.requests), args.nodes, 0, progress) if args.requests else None
    result = {
        "bench": "sim_scale",
        "trace": source,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "conversation_100_nodes": {
            "runs": small,
            "run_s_median": statistics.median(r["run_s"] for r in small) if small else None,
            "target_s": 30,
        },
        "large": {**big, "target_s": 300} if big else None,
    }
    json.dump(result, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
