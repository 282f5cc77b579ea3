"""Pipeline planning: which nodes, in which order, hold which layers of a model (issue: split a model)."""

from gridserve.planner.costs import LayerCosts, Network, PlanNode, Workload
from gridserve.planner.plan import (
    Plan,
    PlanError,
    Stage,
    best_cuts,
    evaluate,
    fixed_blocks,
    memory_proportional,
    plan,
    throughput_balanced,
)

__all__ = [
    "LayerCosts",
    "Network",
    "Plan",
    "PlanError",
    "PlanNode",
    "Stage",
    "Workload",
    "best_cuts",
    "evaluate",
    "fixed_blocks",
    "memory_proportional",
    "plan",
    "throughput_balanced",
]
