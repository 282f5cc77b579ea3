"""Scheduler latency: one decision with the default profile over 10 to 10,000 candidate nodes, on the path the
gateway takes, beside the paths it took before.

The grid is a realistic mix: catalogue hardware (consumer cards, data-centre GPUs, Apple silicon, CPUs), most
nodes serving the requested model at the placement an emulated node would advertise, some down, stale,
quarantined, banned, ejected or new; reliability from one ReliabilityBook fed with each node's history;
telemetry (clock ratio, temperature, memory, queue), calibration and requests in flight on every node. The grid is
built as the gateway builds it: events applied to its node registry (gateway/registry/registry.py: registered,
heartbeat, jobs observed, requests started, state changes), which keeps the scheduler's snapshot table as they
arrive. Each repetition times one decision (fresh rng) with time.perf_counter; p50/p99 are over repetitions:

- `p50_ms`, `p99_ms`: the gateway's path: `schedule()` over the registry's table (`membership.snapshots()`: a view
  of the table; snapshot objects are built only for the nodes the decision reads); then again with the garbage
  collector off (`*_gc_off`);
- `dispatch_p50_ms`, `dispatch_p99_ms`: the gateway's path as far as its first attempt: the decision over the table,
  then the candidates dispatch reads from it (`Decision.ranked_for_dispatch`, the policy's `dispatch_attempts`:
  each built as it is read; building every eligible one, as dispatch once did, took longer than the decision);
- `rebuild_p50_ms`, `rebuild_p99_ms`: the gateway's path before the registry kept the table: a snapshot of every
  node built per decision (`NodeRecord.snapshot`), then `schedule()` over the list;
- `prebuilt_p50_ms`, `prebuilt_p99_ms`: `schedule()` over a list of snapshots built once, outside the timed region
  (what this benchmark timed before: the scheduler alone, a path no gateway took);
- `same_choice`: the share of repetitions in which the table path and the rebuild path chose the same node (the
  table's reliability columns are as of each node's latest event, the rebuild's as of the decision).

- `prefix_p50_ms`, `prefix_p99_ms`: the gateway's path with the prefix index live: the prompt's blocks hashed and
  looked up (`PrefixAffinity.lookup`, a ~3,000-token chat whose system prompt and history other requests sent to
  some nodes before), then `schedule()` with the hits (the column path: the kernel leaves hits to the columns);
  `lookup_p50_ms` is the lookup alone. The index holds `--prefix-prompts` earlier prompts (~100 blocks each)
  spread over the nodes; `index_bytes_per_holding` is its memory (tracemalloc, while filling it) per (block,
  node) it holds.

Decisions are made as the gateway makes them: by one `Scheduler` for the profile, its compiled kernel warmed before
timing (`--no-kernel`: the column path, numpy plugin by plugin; `kernel` in each row says which).

Prints a JSON list of rows; run: `.venv/bin/python bench/scheduler.py [--nodes 10 100 1000 10000] [--reps N]`.
`--profile 25` also prints (to stderr) the top functions of the timed table-path decisions under cProfile.
Targets (issue): p99 under 1 ms at 100 nodes, under 20 ms at 10,000. The default profile decides over a sample
of 256 nodes on larger pools; `--sample 0` times scoring every node.
"""

import argparse
import cProfile
import dataclasses
import gc
import io
import itertools
import json
import platform
import pstats
import random
import statistics
import sys
import time
import tracemalloc
from typing import Any

from gridserve.catalog import HARDWARE, MODELS
from gridserve.gateway.config import GatewayConfig
from gridserve.gateway.dispatch.prefixes import PrefixAffinity
from gridserve.gateway.lifecycle import Scope
from gridserve.gateway.registry.events import HeartbeatSeen, JobObserved, Registered, RequestStarted, StateChanged
from gridserve.gateway.registry.registry import NodeRegistry
from gridserve.policy import DispatchPolicy
from gridserve.reliability import EventKind, NodeEvent, ReliabilityBook, Severity
from gridserve.scheduler import NodeSnapshot, Profile, Scheduler, default_profile
from gridserve.types import (
    Capability,
    ChatMessage,
    GenerateRequest,
    HardwareInfo,
    ModelOffer,
    NodeId,
    NodeState,
    RuntimeInfo,
    SamplingParams,
    Telemetry,
)
from gridserve.types.scheduling import ScheduleRequest
from stats import percentile

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


def build_grid(n: int, seed: int = 1) -> NodeRegistry:
    """The grid as a gateway's registry holds it, built by the events a gateway would have seen."""
    rng = random.Random(seed)
    book = ReliabilityBook()
    registry = NodeRegistry(GatewayConfig(), book)
    keys, weights = zip(*HARDWARE_MIX.items(), strict=True)
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
        joined = NOW - 3600
        registry.apply(Registered(capability, at=joined, registered_at=joined, capability_at=joined, last_seen=joined))
        feed_history(book, node_id, rng)
        ttft, itl = rng.uniform(0.8, 1.6), rng.uniform(0.9, 1.4)
        for _ in range(20):  # observed timings: the calibration
            registry.apply(JobObserved(node_id, 0.2 * ttft, 0.2, 0.2 * ttft, 0.02, 0.02 * itl))
        seen = NOW - (rng.uniform(10, 60) if rng.random() < 0.03 else rng.uniform(0, 5))
        registry.apply(HeartbeatSeen(node_id, at=seen, seq=1, telemetry=telemetry))
        for _ in range(max(0, active + rng.randint(-1, 1))):
            registry.apply(RequestStarted(node_id))
        roll = rng.random()
        if roll < 0.08:
            state = NodeState.DOWN if roll < 0.05 else NodeState.SUSPECT
            registry.apply(StateChanged(node_id, at=seen, state=state, reason="bench", if_live=False))
    return registry


def default_reps(n: int) -> int:
    return 200 if n <= 100 else 50 if n <= 1000 else 15


def timed(decide: Any, reps: int, profiler: cProfile.Profile | None = None) -> tuple[list[float], list[str | None]]:
    """Milliseconds per decision over `reps` repetitions (rng seeded with the repetition), and each choice."""
    times, chosen = [], []
    for i in range(reps):
        rng = random.Random(i)
        if profiler is not None:
            profiler.enable()
        start = time.perf_counter()
        decision = decide(rng)
        elapsed = time.perf_counter() - start
        if profiler is not None:
            profiler.disable()
        times.append(elapsed * 1e3)
        chosen.append(decision.chosen)
    return times, chosen


def summary(prefix: str, times: list[float]) -> dict[str, float]:
    return {f"{prefix}p50_ms": round(statistics.median(times), 3), f"{prefix}p99_ms": round(percentile(times, 0.99), 3)}


def filled_affinity(node_ids: list[str], prompts: int, rng: random.Random) -> tuple[PrefixAffinity, list[str], float]:
    """A prefix affinity that sent `prompts` chats (one of 200 system prompts, then their own turns) to random
    nodes; the system prompts; bytes per holding it took."""
    affinity = PrefixAffinity()
    systems = [f"System {i}: " + "you are a careful assistant for a grid of nodes. " * 60 for i in range(200)]
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for i in range(prompts):
        scope = Scope("chat")
        job = _chat(rng.choice(systems), f"user {i} asks " + "about the cache " * rng.randint(20, 200))
        affinity.lookup(scope, job, 3000)
        affinity.prefilled(scope, rng.choice(node_ids))
    used = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    return affinity, systems, used / max(1, affinity.index.stats().holdings)


def _chat(system: str, user: str) -> GenerateRequest:
    messages = (ChatMessage(role="system", content=system), ChatMessage(role="user", content=user))
    return GenerateRequest(request_id="bench", model=MODEL, messages=messages, sampling=SamplingParams(max_tokens=256))


def prefix_run(registry: NodeRegistry, scheduler: Scheduler, reps: int, prompts: int) -> dict[str, Any]:
    rng = random.Random(7)
    node_ids = [r.capability.node_id for r in registry.nodes.values()]
    affinity, systems, per_holding = filled_affinity(node_ids, prompts, rng)
    lookups: list[float] = []

    def decide(rng: random.Random) -> Any:
        job = _chat(rng.choice(systems), "a new question " * 40)
        start = time.perf_counter()
        cached = affinity.lookup(Scope("chat"), job, 3000)
        lookups.append((time.perf_counter() - start) * 1e3)
        req = ScheduleRequest(
            request_id="bench", model=MODEL, prompt_tokens=3000, max_tokens=256, tier="standard", cached_tokens=cached
        )
        return scheduler.schedule(req, registry.table.view(), rng, NOW, decision_id="bench")

    for i in range(min(3, reps)):
        decide(random.Random(-1 - i))
    gc.collect()
    lookups.clear()
    times, _ = timed(decide, reps)
    stats = affinity.index.stats()
    return {
        **summary("prefix_", times),
        "lookup_p50_ms": round(statistics.median(lookups), 3),
        "index_prompts": prompts,
        "index_blocks": stats.blocks,
        "index_holdings": stats.holdings,
        "index_bytes_per_holding": round(per_holding, 1),
    }


def run(
    n: int,
    reps: int,
    profiler: cProfile.Profile | None,
    sample: int | None = None,
    kernel: bool = True,
    prefix_prompts: int = 20_000,
) -> dict[str, Any]:
    t0 = time.perf_counter()
    registry = build_grid(n)
    build_s = time.perf_counter() - t0
    profile: Profile = default_profile()
    if sample is not None:
        profile = dataclasses.replace(profile, sample=sample)
    scheduler = Scheduler(profile, compiled=kernel)  # as the gateway holds one (kernel: warmed before traffic)
    schedule = scheduler.schedule
    req = ScheduleRequest(request_id="bench", model=MODEL, prompt_tokens=512, max_tokens=256, tier="standard")
    records, book = list(registry.nodes.values()), registry.book

    def from_table(rng: random.Random) -> Any:  # the gateway now: membership.snapshots() is a view of the table
        return schedule(req, registry.table.view(), rng, NOW, decision_id="bench")

    def rebuilt(rng: random.Random) -> Any:  # the gateway before: a snapshot of every node per decision
        return schedule(req, [r.snapshot(book, NOW) for r in records], rng, NOW, decision_id="bench")

    attempts = DispatchPolicy().dispatch_attempts

    def dispatched(rng: random.Random) -> Any:  # the decision and the candidates the dispatcher reads from it
        decision = from_table(rng)
        list(itertools.islice(decision.ranked_for_dispatch(), attempts))
        return decision

    prebuilt_list: list[NodeSnapshot] = registry.table.snapshots()

    def prebuilt(rng: random.Random) -> Any:  # the scheduler alone (what this benchmark timed before)
        return schedule(req, prebuilt_list, rng, NOW, decision_id="bench")

    for i in range(min(3, reps)):  # warm-up: imports, caches
        for decide in (from_table, dispatched, rebuilt, prebuilt):
            decide(random.Random(-1 - i))
    gc.collect()
    times, chosen = timed(from_table, reps, profiler)
    dispatch_times, _ = timed(dispatched, reps)
    rebuild_times, rebuild_chosen = timed(rebuilt, reps)
    prebuilt_times, _ = timed(prebuilt, reps)
    gc.disable()  # the same decisions with the collector off: how much of the time is garbage collection
    try:
        no_gc, _ = timed(from_table, reps)
    finally:
        gc.enable()
    decision = from_table(random.Random(0))
    rejected: dict[str, int] = {}
    for v in decision.rejections:
        rejected[v.filter] = rejected.get(v.filter, 0) + 1
    return {
        "nodes": n,
        "sample": profile.sample,
        "kernel": scheduler.compiled,
        "p50_ms": round(statistics.median(times), 3),
        "p99_ms": round(percentile(times, 0.99), 3),
        "mean_ms": round(statistics.fmean(times), 3),
        "min_ms": round(min(times), 3),
        "max_ms": round(max(times), 3),
        "p50_ms_gc_off": round(statistics.median(no_gc), 3),
        "p99_ms_gc_off": round(percentile(no_gc, 0.99), 3),
        **summary("dispatch_", dispatch_times),
        **summary("rebuild_", rebuild_times),
        **summary("prebuilt_", prebuilt_times),
        "same_choice": round(sum(a == b for a, b in zip(chosen, rebuild_chosen, strict=True)) / reps, 3),
        "samples": reps,
        "eligible": len(decision.candidates),
        "rejected": dict(sorted(rejected.items(), key=lambda kv: -kv[1])),
        **(prefix_run(registry, scheduler, reps, prefix_prompts) if prefix_prompts else {}),
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
    parser.add_argument("--no-kernel", action="store_true", help="decide on the column path (no compiled kernel)")
    parser.add_argument("--prefix-prompts", type=int, default=20_000, help="earlier prompts in the index (0: none)")
    args = parser.parse_args()
    rows = []
    for n in args.nodes:
        profiler = cProfile.Profile() if args.profile else None
        reps = args.reps or default_reps(n)
        rows.append(run(n, reps, profiler, args.sample, kernel=not args.no_kernel, prefix_prompts=args.prefix_prompts))
        if profiler is not None:
            for key in ("cumulative", "tottime"):
                out = io.StringIO()
                pstats.Stats(profiler, stream=out).strip_dirs().sort_stats(key).print_stats(args.profile)
                print(f"== {n} nodes, by {key} ==\n{out.getvalue()}", file=sys.stderr)
    print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
