"""Pipeline planner vs its baselines: predicted per-token decode latency of the plan for a model on several
heterogeneous node sets from the catalogue (the same cost model for all four; baselines use every node of the
set in the order given, the planner chooses its chain).

Prints one JSON object: {"model", "quantization", "planner": [{"node_set", "stages", "planner_ms_per_token",
"fixed_ms_per_token", "memory_prop_ms_per_token", "throughput_bal_ms_per_token", "vs_fixed_pct", "plan_s"}]}.
A baseline whose split does not fit in memory reports null. Run: `.venv/bin/python bench/planner.py`.
"""

import argparse
import json
import sys
import time
from typing import Any

from gridserve.catalog import hardware_spec, model_spec
from gridserve.planner import (
    LayerCosts,
    Network,
    Plan,
    PlanNode,
    fixed_blocks,
    memory_proportional,
    plan,
    throughput_balanced,
)

NODE_SETS = {
    "consumer+datacentre": ["rtx3090", "h100-sxm", "t4", "a100-80g"],
    "consumer only": ["rtx4090", "rtx3090", "rtx4090", "t4"],
    "mixed 6": ["t4", "rtx4090", "l40s", "a10g", "a100-80g", "rtx3090"],
    "datacentre": ["a100-80g", "h100-sxm", "l40s"],
}


def _ms(p: Plan | None) -> float | None:
    return round(p.cost_s * 1e3, 3) if p is not None else None


def row(name: str, cards: list[str], model: LayerCosts, rtt_s: float) -> dict[str, Any]:
    nodes = [PlanNode.of(f"{card}-{i}", hardware_spec(card)) for i, card in enumerate(cards)]
    net = Network(default_rtt_s=rtt_s)
    t0 = time.perf_counter()
    best = plan(model, nodes, net)
    took = time.perf_counter() - t0
    fixed = fixed_blocks(model, nodes, net)
    return {
        "node_set": f"{name}: {', '.join(cards)}",
        "stages": [f"{s.node_id}[{s.start}:{s.end})" for s in best.stages],
        "planner_ms_per_token": _ms(best),
        "fixed_ms_per_token": _ms(fixed),
        "memory_prop_ms_per_token": _ms(memory_proportional(model, nodes, net)),
        "throughput_bal_ms_per_token": _ms(throughput_balanced(model, nodes, net)),
        "vs_fixed_pct": round((best.cost_s / fixed.cost_s - 1) * 100, 1) if fixed is not None else None,
        "plan_s": round(took, 3),
    }


def rows(model_name: str = "llama-3-70b", quantization: str = "q4_k_m", rtt_s: float = 0.004) -> list[dict[str, Any]]:
    """One row per node set (bench/pipeline.py reports these too)."""
    model = LayerCosts.of(model_spec(model_name), "float16", quantization)
    return [row(name, cards, model, rtt_s) for name, cards in NODE_SETS.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="llama-3-70b")
    parser.add_argument("--quantization", default="q4_k_m")
    parser.add_argument("--rtt-ms", type=float, default=4.0, help="round trip between any two nodes")
    args = parser.parse_args()
    found = rows(args.model, args.quantization, args.rtt_ms / 1e3)
    json.dump({"model": args.model, "quantization": args.quantization, "planner": found}, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
