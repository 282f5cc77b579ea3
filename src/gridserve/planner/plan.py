"""The pipeline planner: an ordered chain of nodes and contiguous, half-open layer ranges for a model.

Objective `latency` (interactive): per-token decode latency = gateway to the first stage + every stage's time
+ every hop between stages + the last stage's logits back to the gateway. Objective `throughput` (batch): the
slowest stage or hop (the pipeline's steady-state token interval). Each stage must hold its layers' weights and
KV cache in the node's memory.

For a given chain, dynamic programming over layer cuts is exact (O(stages x layers^2)). Chains are searched
exhaustively over ordered subsets of the best `candidates` nodes (ranked by how fast each would run the whole
model) up to `max_stages` long: exact when every node is a candidate, bounded otherwise.
"""

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from gridserve.planner.costs import (
    LayerCosts,
    Network,
    PlanNode,
    Workload,
    edge_time,
    hop_time,
    stage_memory,
    stage_time,
)

OBJECTIVES = ("latency", "throughput")
FIT_TOLERANCE = 1 + 1e-9
"""A stage fits when its bytes are within this factor of the node's memory (sums in different orders differ in
the last bits)."""


class PlanError(ValueError):
    pass


@dataclass(frozen=True)
class Stage:
    node_id: str
    start: int
    end: int
    """Layers [start, end)."""
    time_s: float
    memory_bytes: float
    hop_s: float
    """Time to send this stage's output onward (to the next stage, or logits to the gateway)."""


@dataclass(frozen=True)
class Plan:
    model: str
    objective: str
    stages: tuple[Stage, ...]
    cost_s: float
    """Per-token latency (objective latency) or slowest stage/hop (throughput), seconds."""
    chains_considered: int = 0
    runner_up_s: float | None = None
    method: str = "planner"

    def explain(self) -> str:
        parts = [
            f"{s.node_id}: layers [{s.start}, {s.end}) {s.time_s * 1e3:.2f} ms, {s.memory_bytes / 2**30:.2f} GiB"
            for s in self.stages
        ]
        why = f"{self.method}: {self.objective} {self.cost_s * 1e3:.2f} ms per token"
        if self.chains_considered:
            why += f", best of {self.chains_considered} chains"
        if self.runner_up_s is not None and math.isfinite(self.runner_up_s):
            why += f" (next best {self.runner_up_s * 1e3:.2f} ms)"
        return why + "; " + "; ".join(parts)


def _combine(objective: str) -> Callable[[float, float], float]:
    return (lambda a, b: a + b) if objective == "latency" else max


def evaluate(
    model: LayerCosts,
    chain: Sequence[PlanNode],
    cuts: Sequence[int],
    net: Network,
    work: Workload,
    objective: str,
    method: str = "planner",
) -> Plan | None:
    """The plan for `chain` with stage i holding layers [cuts[i], cuts[i+1]); None if a stage does not fit or
    holds no layer. `cuts` starts at 0 and ends at model.layers."""
    if len(cuts) != len(chain) + 1 or cuts[0] != 0 or cuts[-1] != model.layers:
        raise PlanError("cuts must run from 0 to the model's layer count, one more than the stages")
    stages = []
    combine = _combine(objective)
    cost = edge_time(net, chain[0].node_id, 4.0)  # token id in
    for i, node in enumerate(chain):
        start, end = cuts[i], cuts[i + 1]
        if end <= start:
            return None
        memory = stage_memory(model, start, end, work)
        if memory > node.memory_bytes * FIT_TOLERANCE:
            return None
        last = i == len(chain) - 1
        hop = (
            edge_time(net, node.node_id, model.logits_bytes)
            if last
            else hop_time(net, node.node_id, chain[i + 1].node_id, model.activation_bytes)
        )
        t = stage_time(model, node, start, end, work)
        stages.append(Stage(node.node_id, start, end, t, memory, hop))
        cost = combine(combine(cost, t), hop)
    return Plan(model.name, objective, tuple(stages), cost, method=method)


def best_cuts(
    model: LayerCosts, chain: Sequence[PlanNode], net: Network, work: Workload, objective: str
) -> Plan | None:
    """The exact optimum over layer cuts for this chain (every node gets at least one layer)."""
    n, k = model.layers, len(chain)
    if k > n:
        return None
    combine = _combine(objective)
    inf = math.inf
    weights = list(itertools.accumulate(model.weight_bytes, initial=0.0))
    read = list(itertools.accumulate(model.streamed, initial=0.0)) if model.streamed_bytes else weights
    flops = list(itertools.accumulate(model.flops_per_token, initial=0.0))
    ctx, sessions = work.context_tokens, work.sessions
    # prefix sums of a sequence's KV (LayerCosts.kv_bytes): the full-attention layers' bytes a token (x ctx), and
    # what the sliding layers keep of it (their window)
    kv, kept = [0.0], [0.0]
    for per_token, window in zip(model.kv_bytes_per_token, model.kv_window or (0,) * n, strict=True):
        kv.append(kv[-1] + (0.0 if window else per_token))
        kept.append(kept[-1] + (per_token * min(ctx, window) if window else 0.0))

    def sequence_kv(s: int, j: int) -> float:
        return (kv[j] - kv[s]) * ctx + (kept[j] - kept[s])

    def memory(s: int, j: int) -> float:  # stage_memory over prefix sums
        return weights[j] - weights[s] + sequence_kv(s, j) * sessions

    def time(node: PlanNode, s: int, j: int) -> float:  # stage_time over prefix sums
        streamed = read[j] - read[s] + sequence_kv(s, j)
        return max(streamed / node.bytes_per_s, (flops[j] - flops[s]) / node.flops_per_s) * node.slowness

    # best[i][j]: best cost with chain[:i+1] holding layers [0, j), chain[i] ending at j (hops to i+1 not yet)
    best = [[inf] * (n + 1) for _ in range(k)]
    back = [[-1] * (n + 1) for _ in range(k)]
    entry = edge_time(net, chain[0].node_id, 4.0)
    for j in range(1, n - k + 2):
        if memory(0, j) <= chain[0].memory_bytes * FIT_TOLERANCE:
            best[0][j] = combine(entry, time(chain[0], 0, j))
    for i in range(1, k):
        hop = hop_time(net, chain[i - 1].node_id, chain[i].node_id, model.activation_bytes)
        for j in range(i + 1, n - (k - i - 1) + 1):
            for s in range(i, j):
                if best[i - 1][s] == inf or memory(s, j) > chain[i].memory_bytes * FIT_TOLERANCE:
                    continue
                c = combine(combine(best[i - 1][s], hop), time(chain[i], s, j))
                if c < best[i][j]:
                    best[i][j], back[i][j] = c, s
    if best[k - 1][n] == inf:
        return None
    cuts = [n]
    for i in range(k - 1, 0, -1):
        cuts.append(back[i][cuts[-1]])
    cuts.append(0)
    return evaluate(model, chain, cuts[::-1], net, work, objective)


def _solo_time(model: LayerCosts, node: PlanNode, work: Workload) -> float:
    return stage_time(model, node, 0, model.layers, work)


def plan(
    model: LayerCosts,
    nodes: Sequence[PlanNode],
    net: Network | None = None,
    work: Workload | None = None,
    *,
    objective: str = "latency",
    max_stages: int = 4,
    candidates: int = 6,
) -> Plan:
    """The best chain and cuts (see the module docstring); PlanError if no chain can hold the model."""
    if objective not in OBJECTIVES:
        raise PlanError(f"objective must be one of {', '.join(OBJECTIVES)}, not {objective!r}")
    net, work = net or Network(), work or Workload()
    fastest = sorted(nodes, key=lambda n: _solo_time(model, n, work))[: max(1, candidates)]
    roomiest = sorted(nodes, key=lambda n: -n.memory_bytes)[: max(1, candidates) // 2]
    pool = list(dict.fromkeys([*fastest, *roomiest]))  # fast nodes, and the largest memories to hold the model
    found: list[Plan] = []
    considered = 0
    for size in range(1, min(max_stages, len(pool), model.layers) + 1):
        for chain in itertools.permutations(pool, size):
            considered += 1
            p = best_cuts(model, chain, net, work, objective)
            if p is not None:
                found.append(p)
    if not found:
        raise PlanError(
            f"no chain of up to {max_stages} of {len(nodes)} nodes holds {model.name} "
            f"({sum(model.weight_bytes) / 2**30:.1f} GiB of weights)"
        )
    found.sort(key=lambda p: (p.cost_s, len(p.stages)))
    runner = found[1].cost_s if len(found) > 1 else None
    best = found[0]
    return Plan(best.model, objective, best.stages, best.cost_s, considered, runner)


# baselines, on the same cost model: every given node, in the given order


def _split(weights: Sequence[float], layers: int) -> list[int]:
    """Cuts giving each node a share of the layers proportional to its weight, at least one each."""
    total = sum(weights)
    k = len(weights)
    cuts, acc = [0], 0.0
    for i, w in enumerate(weights[:-1]):
        acc += w
        cut = round(layers * acc / total)
        cuts.append(min(max(cut, cuts[-1] + 1), layers - (k - i - 1)))
    cuts.append(layers)
    return cuts


def _baseline(
    model: LayerCosts,
    nodes: Sequence[PlanNode],
    weights: Sequence[float],
    net: Network | None,
    work: Workload | None,
    objective: str,
    method: str,
) -> Plan | None:
    if len(nodes) > model.layers:
        return None
    cuts = _split(weights, model.layers)
    return evaluate(model, nodes, cuts, net or Network(), work or Workload(), objective, method)


def fixed_blocks(
    model: LayerCosts,
    nodes: Sequence[PlanNode],
    net: Network | None = None,
    work: Workload | None = None,
    objective: str = "latency",
) -> Plan | None:
    """Equal blocks of layers (None: a block does not fit its node)."""
    return _baseline(model, nodes, [1.0] * len(nodes), net, work, objective, "fixed equal blocks")


def memory_proportional(
    model: LayerCosts,
    nodes: Sequence[PlanNode],
    net: Network | None = None,
    work: Workload | None = None,
    objective: str = "latency",
) -> Plan | None:
    """Layers in proportion to each node's memory (exo's ring partitioning)."""
    return _baseline(model, nodes, [n.memory_bytes for n in nodes], net, work, objective, "memory-proportional")


def throughput_balanced(
    model: LayerCosts,
    nodes: Sequence[PlanNode],
    net: Network | None = None,
    work: Workload | None = None,
    objective: str = "latency",
) -> Plan | None:
    """Layers in proportion to each node's speed (Petals balances spans by server throughput)."""
    speeds = [1.0 / _solo_time(model, n, work or Workload()) for n in nodes]
    return _baseline(model, nodes, speeds, net, work, objective, "throughput-balanced")
