"""Placing a model's layers on stage nodes: the planner's chain and cuts, carried out.

Nodes started with `--layers auto` offer to run any layer range of a model (`Capability.stage_models`). When
a request comes for such a model and no live node holds it whole and no chain of stage nodes covers it, the
gateway plans the split (planner/plan.py: exact over layer cuts, bounded over chains; each node's card,
advertised memory and round trip) and asks each planned node to load its range (`POST /internal/load` with
`layers`, gateway-signed). The nodes register again with their ranges; the request then runs over the chain.
Every placement is kept, with the planner's explanation, for `GET /admin/pipelines`.
"""

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from gridserve.catalog.models import MODELS
from gridserve.gateway.api.errors import APIError
from gridserve.gateway.dispatch.dispatcher import Dispatcher
from gridserve.gateway.pipeline.candidate import UNKNOWN_CARD
from gridserve.gateway.registry.membership import Membership, NodeRecord
from gridserve.planner import LayerCosts, Network, Plan, PlanError, PlanNode, plan

log = logging.getLogger("gridserve.gateway")
USABLE_MEMORY = 0.9
"""Share of a node's advertised memory the planner fills (room for activations and the runtime)."""


class Placement:
    def __init__(
        self,
        membership: Membership,
        dispatcher: Dispatcher,
        covered: Callable[[str], bool],
        timeout_s: float = 180.0,
        keep: int = 50,
    ) -> None:
        self.membership, self.dispatcher, self.covered = membership, dispatcher, covered
        self.timeout_s = timeout_s
        self.recent: deque[dict[str, Any]] = deque(maxlen=keep)
        self._locks: dict[str, asyncio.Lock] = {}

    def stage_nodes(self, model: str) -> list[NodeRecord]:
        """Nodes that may serve (membership.can_serve) and take layer assignments for `model`."""
        can_serve = self.membership.can_serve
        return [
            r
            for r in self.membership.nodes.values()
            if model in r.capability.stage_models and can_serve(r.capability.node_id)
        ]

    def needed(self, model: str) -> bool:
        """Nodes could run `model` split, but nothing serves it yet: no whole node, no chain."""
        if model not in MODELS or not self.stage_nodes(model) or model in self.membership.live_models():
            return False
        return not self.covered(model)

    async def place(self, model: str) -> Plan:
        """Plan the split over the stage nodes, assign each its range and wait until a chain covers the model;
        APIError (503) if no plan fits or the nodes do not take their ranges in time."""
        lock = self._locks.setdefault(model, asyncio.Lock())
        async with lock:  # one placement per model at a time; requests meanwhile wait for it
            nodes = self.stage_nodes(model)
            best = self._plan(model, nodes)
            if self.covered(model):
                return best
            by_id: dict[str, NodeRecord] = {r.capability.node_id: r for r in nodes}
            sent = await asyncio.gather(*(self._assign(by_id[s.node_id], model, s.start, s.end) for s in best.stages))
            started = time.time()
            entry: dict[str, Any] = {
                "model": model,
                "at": started,
                "stages": [{"node_id": s.node_id, "layers": [s.start, s.end]} for s in best.stages],
                "explanation": best.explain(),
                "status": "assigning",
            }
            self.recent.append(entry)
            if not all(sent):
                entry["status"] = "failed"
                raise APIError(503, f"could not assign the layers of {model}", type_="api_error", code="no_capacity")
            deadline = time.monotonic() + self.timeout_s
            while not self.covered(model):
                if time.monotonic() > deadline:
                    entry["status"] = "timed out"
                    raise APIError(
                        503, f"stage nodes did not load {model} in time", type_="api_error", code="no_capacity"
                    )
                await asyncio.sleep(0.1)
            entry["status"] = "placed"
            entry["took_s"] = round(time.time() - started, 3)
            log.info("placed %s: %s", model, best.explain())
            return best

    def _plan(self, model: str, nodes: list[NodeRecord]) -> Plan:
        spec = MODELS[model]
        rtt: dict[str, float] = {str(r.capability.node_id): (r.rtt_ms or 1.0) / 1e3 for r in nodes}
        plan_nodes = []
        for r in nodes:
            hw = r.static.hw or UNKNOWN_CARD
            memory = r.capability.hardware.memory_bytes
            plan_nodes.append(
                PlanNode.of(r.capability.node_id, hw, memory_bytes=memory * USABLE_MEMORY if memory else None)
            )
        # every hop goes through the gateway, which drives each stage: stage to stage = both halves of their trips
        pairs = {frozenset((a, b)): rtt[a] + rtt[b] for a in rtt for b in rtt if a != b}
        net = Network(rtt_s=pairs, gateway_rtt_s=rtt)
        try:
            return plan(LayerCosts.of(spec), plan_nodes, net, objective="latency")
        except PlanError as exc:
            raise APIError(503, f"cannot place {model}: {exc}", type_="api_error", code="no_capacity") from exc

    async def _assign(self, record: NodeRecord, model: str, start: int, end: int) -> bool:
        took = await self.dispatcher.ask_to_load(record.capability.node_id, {"model": model, "layers": [start, end]})
        return bool(took)
