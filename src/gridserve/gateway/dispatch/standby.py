"""Pre-warmed fallbacks: per model, keep warm (model resident) nodes for the load now, the load coming, and
`standby_per_model` spares; ask nodes that have the model on disk to load it before they are needed.

Every second, for each model in demand (requested in the last `standby_idle_s`):

    in flight  = requests running on the model's warm nodes
    forecast   = in flight x (arrival rate of the last 10 s / rate of the 20 s before), when that rises
    target     = ceil(max(in flight, forecast, 1) / standby_node_concurrency) + standby_per_model

When warm nodes plus nodes already loading fall short of the target, the nodes that could load the model
are ranked by the scheduler itself (the same filters and scores a request would see) and the best are
asked to load it (`POST /internal/load`, signed by the gateway). A node announces the loaded model by
registering again; a load that does not finish within `standby_load_timeout_s` is forgotten.
"""

import asyncio
import itertools
import logging
import math
import random
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from gridserve.catalog.tiers import DEFAULT_TIER
from gridserve.gateway.config import GatewayConfig
from gridserve.gateway.dispatch.dispatcher import Dispatcher
from gridserve.gateway.registry.membership import Membership
from gridserve.scheduler import Profile, schedule
from gridserve.types.scheduling import ScheduleRequest

log = logging.getLogger("gridserve.gateway")
RECENT_S, BEFORE_S = 10.0, 20.0
RISING = 1.2
"""Arrival-rate ratio (last 10 s over the 20 s before) above which demand counts as rising."""


@dataclass
class ModelPlan:
    model: str
    warm: list[str]
    loading: list[str]
    in_flight: int
    rate_per_s: float
    forecast: float
    target: int
    asked: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "rate_per_s": round(self.rate_per_s, 3), "forecast": round(self.forecast, 2)}


class StandbyKeeper:
    def __init__(self, config: GatewayConfig, membership: Membership, dispatcher: Dispatcher, profile: Profile) -> None:
        self.config = config
        self.membership = membership
        self.dispatcher = dispatcher
        self.profile = profile
        self.arrivals: dict[str, deque[float]] = {}
        self.loading: dict[tuple[str, str], float] = {}
        """(node, model) -> when the load was asked for."""
        self.plans: dict[str, ModelPlan] = {}

    def note_request(self, model: str, now: float | None = None) -> None:
        times = self.arrivals.setdefault(model, deque())
        times.append(time.monotonic() if now is None else now)

    # -- planning (pure given the membership) -------------------------------------------------------
    def plan(self, now: float) -> list[ModelPlan]:
        plans = []
        for model, times in list(self.arrivals.items()):
            while times and times[0] < now - max(self.config.standby_idle_s, RECENT_S + BEFORE_S):
                times.popleft()
            if not times:
                del self.arrivals[model]
                continue
            plans.append(self._plan_model(model, times, now))
        self.plans = {p.model: p for p in plans}
        return plans

    def _plan_model(self, model: str, times: deque[float], now: float) -> ModelPlan:
        live = [r for r in self.membership.nodes.values() if self.membership.can_serve(r.capability.node_id)]
        warm = [r for r in live if any(o.name == model and o.layers is None for o in r.capability.models)]
        for key, asked in list(self.loading.items()):
            done = any(r.capability.node_id == key[0] for r in warm) and key[1] == model
            if done or now - asked > self.config.standby_load_timeout_s:
                del self.loading[key]
        loading = [node for node, m in self.loading if m == model]
        in_flight = sum(r.outstanding for r in warm)
        recent = sum(1 for t in times if t >= now - RECENT_S) / RECENT_S
        before = sum(1 for t in times if now - RECENT_S - BEFORE_S <= t < now - RECENT_S) / BEFORE_S
        growth = recent / before if before > 0 else (2.0 if recent > 0 else 1.0)
        forecast = in_flight * growth if growth > RISING else float(in_flight)
        need = math.ceil(max(in_flight, forecast, 1) / self.config.standby_node_concurrency)
        return ModelPlan(
            model=model,
            warm=[r.capability.node_id for r in warm],
            loading=loading,
            in_flight=in_flight,
            rate_per_s=recent,
            forecast=forecast,
            target=need + self.config.standby_per_model,
        )

    def pick(self, plan: ModelPlan, now: float) -> list[str]:
        """Nodes to ask, best first (ranked by the scheduler for a typical request of this model)."""
        deficit = plan.target - len(plan.warm) - len(plan.loading)
        if deficit <= 0:
            return []
        able = {
            r.capability.node_id
            for r in self.membership.nodes.values()
            if plan.model in r.capability.loadable_models and self.membership.can_serve(r.capability.node_id)
        } - set(plan.loading)
        if not able:
            return []
        request = ScheduleRequest(
            request_id="standby", model=plan.model, prompt_tokens=256, max_tokens=256, tier=DEFAULT_TIER
        )
        snapshots = [s for s in self.membership.snapshots() if s.node_id in able]
        decision = schedule(request, snapshots, self.profile, random.Random(0), time.time())
        return [str(c.node_id) for c in itertools.islice(decision.evidence.ranked(), deficit)]

    # -- acting ---------------------------------------------------------------------------------------
    async def tick(self) -> None:
        now = time.monotonic()
        for plan in self.plan(now):
            for node_id in self.pick(plan, now):
                if await self._ask(node_id, plan):
                    self.loading[(node_id, plan.model)] = now
                    plan.asked.append(node_id)
                    plan.loading.append(node_id)

    async def _ask(self, node_id: str, plan: ModelPlan) -> bool:
        ok = await self.dispatcher.ask_to_load(node_id, {"model": plan.model})
        if ok is None:  # not reached
            return False
        reason = (
            f"{len(plan.warm)} warm + {len(plan.loading)} loading < target {plan.target} "
            f"(in flight {plan.in_flight}, forecast {plan.forecast:.1f}, {plan.rate_per_s:.2f} req/s)"
        )
        log.info("asked %s to pre-load %s: %s", node_id, plan.model, reason)
        self.dispatcher.metrics.preloads.labels(model=plan.model).inc()
        writer = self.membership.writer
        writer.submit(
            writer.store.record_event,
            kind="preload",
            severity="minor",
            node_id=node_id,
            detail={"model": plan.model, "reason": reason, "accepted": ok},
            at=time.time(),
        )
        return ok

    async def run_forever(self) -> None:
        while True:
            try:
                await self.tick()
            except Exception:  # a planning bug must not stop the keeper; it is logged with its traceback
                log.exception("standby keeper")
            await asyncio.sleep(self.config.standby_interval_s)

    def status(self) -> dict[str, Any]:
        return {
            "standby_per_model": self.config.standby_per_model,
            "node_concurrency": self.config.standby_node_concurrency,
            "models": [p.as_dict() for p in self.plans.values()],
        }
