"""Scheduler latency: one `schedule()` decision with the default profile over 10 to 10,000 candidate nodes.

The grid is a realistic mix: catalogue hardware (consumer cards, data-centre GPUs, Apple silicon, CPUs), most
nodes serving the requested model at the placement an emulated node would advertise, some down, stale,
quarantined, banned, ejected or new; reliability summaries read from one ReliabilityBook fed with each node's
history; telemetry (clock ratio, temperature, memory, queue) and calibration on every node. Snapshots are built
once, outside the timed region, as the gateway keeps them. Each repetition times one decision (fresh rng) with
time.perf_counter; p50/p99 are over repetitions (then again with the garbage collector off, `*_gc_off`).

Prints a JSON list of rows; run: `.venv/bin/python bench/scheduler.py [--nodes 10 100 1000 10000] [--reps N]`.
`--profile 25` also prints (to stderr) the top functions of the timed decisions under cProfile.
Targets (issue): p99 under 1 ms at 100 nodes, under 20 ms at 10,000. The default profile decides over a sample
of 256 nodes on larger pools; `--sample 0` times scoring every node.
"""

import argparse
import cProfile
import dataclasses
import gc
import io
import json
import math
import platform
import pstats
import random
import statistics
import sys
import time
from typing import Any

from gridserve.catalog import HARDWARE, MODELS
from gridserve.perfmodel import Calibration
from gridserve.reliability import EventKind, NodeEvent, ReliabilityBook, Severity
from gridserve.scheduler import NodeSnapshot, default_profile, schedule
from gridserve.types import Capability, HardwareInfo, ModelOffer, NodeId, NodeState, RuntimeInfo, Telemetry
from gridserve.types.scheduling import ScheduleRequest

NOW = 1_700_000_000.0
GIB = 2**30
MODEL = "llama-3-8b"
HARDWARE_MIX = {
    "rtx4090": 20,
    "rtx3090": 15,
    "cpu": 12,
    "a10g": 8,
    "t4": 8,
    "l40s": 6,
    "apple-m2-max": 5,
    "apple-m2-pro": 4,
    "apple-m2-ultra": 3,
    "apple-m2": 3,
    "a100-40g": 5,
    "a100-80g": 5,
    "h100-pcie": 3,
    "h100-sxm": 3,
}
PLACEMENTS = (("float16", "none"), ("float16", "q8_0"), ("float16", "q4_k_m"))
OTHER_MODELS = ("mistral-7b", "qwen2.5-7b", "llama-3-70b")


def placement(model: str, accelerator: str) -> tuple[str, str]:
    """The widest placement whose weights fit with a 10% reserve (as `emulated:<hw>` nodes choose), at a 16-bit
    dtype the hardware runs (bfloat16 on CPUs)."""
    hw = HARDWARE[accelerator]
    budget = hw.memory_gib * GIB * 0.9
    spec = MODELS[model]
    dtype, quant = next((p for p in PLACEMENTS if spec.weight_bytes(*p) <= budget), PLACEMENTS[-1])
    return (dtype if dtype in hw.dtypes else "bfloat16"), quant


def feed_history(book: ReliabilityBook, node_id: str, rng: random.Random) -> None:
    """A plausible recent history: heartbeats and jobs; a few nodes fail in a row, misbehave, or are new."""
    roll = rng.random()
    jobs = rng.randint(0, 3) if roll < 0.10 else rng.randint(20, 120)
    at = NOW - 3600.0 + rng.uniform(0, 60)
    fail_rate = rng.choice((0.0, 0.01, 0.02, 0.05, 0.15))
    for _ in range(jobs):
        at += rng.uniform(5, 25)
        kept = rng.random() > 0.02
        book.record(
            NodeEvent(node_id=node_id, kind=EventKind.HEARTBEAT_KEPT if kept else EventKind.HEARTBEAT_MISSED, at=at)
        )
        if rng.random() < fail_rate:
            book.record(
                NodeEvent(node_id=node_id, kind=rng.choice((EventKind.JOB_FAILED, EventKind.JOB_TIMED_OUT)), at=at)
            )
        else:
            book.record(NodeEvent(node_id=node_id, kind=EventKind.JOB_COMPLETED, at=at, within_slo=rng.random() > 0.1))
    if 0.10 <= roll < 0.13:  # a run of failures just now: ejected (while the pool's 10% limit allows)
        for i in range(5):
            book.record(NodeEvent(node_id=node_id, kind=EventKind.JOB_FAILED, at=NOW - 10 + i))
    elif 0.13 <= roll < 0.15:  # one severe incident: quarantined
        book.record(NodeEvent(node_id=node_id, kind=EventKind.INCIDENT, at=NOW - 100, severity=Severity.SEVERE))
    elif 0.15 <= roll < 0.153:  # two: banned
        for at in (NOW - 300, NOW - 200):
            book.record(NodeEvent(node_id=node_id, kind=EventKind.INCIDENT, at=at, severity=Severity.SEVERE))
    elif 0.153 <= roll < 0.17:
        book.record(NodeEvent(node_id=node_id, kind=EventKind.PROTOCOL_ERROR, at=NOW - 50, detail="bad signature"))


def build_grid(n: int, seed: int = 1) -> list[NodeSnapshot]:
    rng = random.Random(seed)
    book = ReliabilityBook()
    keys, weights = zip(*HARDWARE_MIX.items(), strict=True)
    snapshots = []
    for i in range(n):
        accelerator = rng.choices(keys, weights)[0]
        hw = HARDWARE[accelerator]
        node_id = NodeId(f"{i:08x}{rng.getrandbits(224):056x}")
        if rng.random() < 0.85:  # most serve the requested model, some a second 7B model beside it
            served = [MODEL] + ([rng.choice(OTHER_MODELS[:2])] if rng.random() < 0.3 else [])
        else:
            served = [rng.choice(OTHER_MODELS)]
        offers = tuple(
            ModelOffer(
                name=m,
                dtype=placement(m, accelerator)[0],
                quantization=placement(m, accelerator)[1],
                max_context=MODELS[m].max_context,
                weights_digest=f"emulated:{m}",
            )
            for m in served
        )
        engine = f"emulated:{accelerator}"
        total = int(hw.memory_gib * GIB)
        capability = Capability(
            node_id=node_id,
            public_key=f"pk{i}",
            endpoint=f"http://10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}:8000",
            engine=engine,
            models=offers,
            hardware=HardwareInfo(accelerator=accelerator, emulated=True, memory_bytes=total),
            runtime=RuntimeInfo(gridserve="0.1.0", python="3.11.9", engine=engine),
            price_per_mtok=0.0 if rng.random() < 0.8 else rng.uniform(0.01, 2.0),
        )
        weights_bytes = sum(MODELS[o.name].weight_bytes(o.dtype, o.quantization) for o in offers)
        if weights_bytes > 0.9 * total:  # two models do not fit side by side: serve the first only
            offers = offers[:1]
            capability = capability.model_copy(update={"models": offers})
            weights_bytes = MODELS[offers[0].name].weight_bytes(offers[0].dtype, offers[0].quantization)
        active = rng.choice((0, 0, 1, 2, 3, 5, 8))
        hot = rng.random() < 0.05
        telemetry = Telemetry(
            utilization=min(1.0, active / hw.batch_slots),
            memory_used_bytes=min(total, int(weights_bytes + active * 0.2 * GIB)),
            memory_total_bytes=total,
            temperature_c=rng.uniform(88, 95) if hot else rng.uniform(35, 80),
            clock_ratio=rng.uniform(0.6, 0.95) if hot and rng.random() < 0.5 else None,
            queue_depth=rng.choice((0, 0, 0, 1, 2, 4)),
            active_requests=active,
            tokens_per_s=rng.uniform(0, 100),
        )
        book.add_node(node_id, NOW - 3600)
        feed_history(book, node_id, rng)
        roll = rng.random()
        state = NodeState.DOWN if roll < 0.05 else NodeState.SUSPECT if roll < 0.08 else NodeState.UP
        snapshots.append(
            NodeSnapshot(
                node_id=node_id,
                state=state,
                capability=capability,
                last_heartbeat=NOW - (rng.uniform(10, 60) if rng.random() < 0.03 else rng.uniform(0, 5)),
                telemetry=telemetry,
                outstanding=max(0, active + rng.randint(-1, 1)),
                reliability=book.summary(node_id, NOW),
                calibration=Calibration(
                    ttft_factor=rng.uniform(0.8, 1.6), itl_factor=rng.uniform(0.9, 1.4), samples=20
                ),
            )
        )
    return snapshots


def default_reps(n: int) -> int:
    return 200 if n <= 100 else 50 if n <= 1000 else 15


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (with 15 samples, p99 is the slowest)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def run(n: int, reps: int, profiler: cProfile.Profile | None, sample: int | None = None) -> dict[str, Any]:
    t0 = time.perf_counter()
    snapshots = build_grid(n)
    build_s = time.perf_counter() - t0
    profile = default_profile()
    if sample is not None:
        profile = dataclasses.replace(profile, sample=sample)
    req = ScheduleRequest(request_id="bench", model=MODEL, prompt_tokens=512, max_tokens=256, tier="standard")
    for i in range(min(3, reps)):  # warm-up: imports, caches
        schedule(req, snapshots, profile, random.Random(-1 - i), NOW, decision_id="warm")
    gc.collect()
    times, decision = [], None
    for i in range(reps):
        rng = random.Random(i)
        if profiler is not None:
            profiler.enable()
        start = time.perf_counter()
        decision = schedule(req, snapshots, profile, rng, NOW, decision_id="bench")
        elapsed = time.perf_counter() - start
        if profiler is not None:
            profiler.disable()
        times.append(elapsed * 1e3)
    assert decision is not None
    gc.disable()  # the same decisions with the collector off: how much of the time is garbage collection
    try:
        no_gc = []
        for i in range(reps):
            start = time.perf_counter()
            schedule(req, snapshots, profile, random.Random(i), NOW, decision_id="bench")
            no_gc.append((time.perf_counter() - start) * 1e3)
    finally:
        gc.enable()
    rejected: dict[str, int] = {}
    for v in decision.rejections:
        rejected[v.filter] = rejected.get(v.filter, 0) + 1
    return {
        "nodes": n,
        "sample": profile.sample,
        "p50_ms": round(statistics.median(times), 3),
        "p99_ms": round(percentile(times, 0.99), 3),
        "mean_ms": round(statistics.fmean(times), 3),
        "min_ms": round(min(times), 3),
        "max_ms": round(max(times), 3),
        "p50_ms_gc_off": round(statistics.median(no_gc), 3),
        "p99_ms_gc_off": round(percentile(no_gc, 0.99), 3),
        "samples": reps,
        "eligible": len(decision.candidates),
        "rejected": dict(sorted(rejected.items(), key=lambda kv: -kv[1])),
        "us_per_node_p50": round(statistics.median(times) * 1e3 / n, 2),
        "build_s": round(build_s, 2),
        "python": platform.python_version(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--nodes", type=int, nargs="+", default=[10, 100, 1000, 10000])
    parser.add_argument("--reps", type=int, default=None, help="repetitions per size (default 200 / 50 / 15)")
    parser.add_argument("--profile", type=int, default=0, metavar="N", help="print the top N functions (cProfile)")
    parser.add_argument(
        "--sample",
        type=int,
        default=None,
        help="nodes sampled per decision on larger pools (0: all; default: profile's)",
    )
    args = parser.parse_args()
    rows = []
    for n in args.nodes:
        profiler = cProfile.Profile() if args.profile else None
        rows.append(run(n, args.reps or default_reps(n), profiler, args.sample))
        if profiler is not None:
            for key in ("cumulative", "tottime"):
                out = io.StringIO()
                pstats.Stats(profiler, stream=out).strip_dirs().sort_stats(key).print_stats(args.profile)
                print(f"== {n} nodes, by {key} ==\n{out.getvalue()}", file=sys.stderr)
    print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
