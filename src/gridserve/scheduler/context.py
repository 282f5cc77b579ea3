"""Per-decision context: the request, its tier, and per-node figures computed once and shared by plugins."""

import math
from dataclasses import dataclass, field

from gridserve.catalog.models import DTYPE_BYTES, MODELS, QUANT_BYTES_PER_PARAM, ModelSpec
from gridserve.catalog.tiers import DEFAULT_TIER, TIERS, Tier
from gridserve.perfmodel import Load, Prediction, predict
from gridserve.scheduler.snapshot import NodeSnapshot
from gridserve.types import ModelOffer
from gridserve.types.scheduling import ScheduleRequest


class UnknownTier(ValueError):
    pass


@dataclass
class Context:
    request: ScheduleRequest
    now: float
    tier: Tier
    model: ModelSpec | None
    _predictions: dict[str, Prediction | None] = field(default_factory=dict)

    @classmethod
    def build(cls, request: ScheduleRequest, now: float) -> "Context":
        tier = TIERS.get(request.tier or DEFAULT_TIER)
        if tier is None:
            raise UnknownTier(f"unknown tier {request.tier!r}; tiers: {', '.join(TIERS)}")
        return cls(request=request, now=now, tier=tier, model=MODELS.get(request.model))

    @property
    def ttft_slo_s(self) -> float:
        return self.request.ttft_slo_s or self.tier.ttft_slo_s

    @property
    def tpot_slo_s(self) -> float:
        return self.request.tpot_slo_s or self.tier.tpot_slo_s

    def offer(self, node: NodeSnapshot) -> ModelOffer | None:
        return node.static.offers.get(self.request.model)

    def prediction(self, node: NodeSnapshot) -> Prediction | None:
        """Calibrated TTFT/ITL for this request on this one node under its current load (None: no spec to use);
        the roofline's single-row case, as the scheduler's columns predict it for every node of a pool."""
        key = node.node_id
        if key not in self._predictions:
            self._predictions[key] = self._predict(node)
        return self._predictions[key]

    def _predict(self, node: NodeSnapshot) -> Prediction | None:
        offer = self.offer(node)
        hw = node.static.hw
        pred = None
        if self.model is not None and hw is not None:
            tele = node.telemetry
            active = max(node.outstanding, tele.active_requests if tele else 0)
            load = Load(
                active=active,
                queued=tele.queue_depth if tele else 0,
                clock_ratio=tele.clock_ratio if tele else None,
                temperature_c=tele.temperature_c if tele else None,
                interleaved=node.static.interleaved,
            )
            pred = predict(
                self.model,
                hw,
                prompt_tokens=self.request.prompt_tokens - self.request.reused_by(node.node_id),
                dtype=offer.dtype if offer and offer.dtype in DTYPE_BYTES else "float16",
                quantization=offer.quantization if offer and offer.quantization in QUANT_BYTES_PER_PARAM else "none",
                load=load,
                calibration=node.calibration,
                resident=offer is not None,
            )
        return pred

    def price(self, node: NodeSnapshot) -> float | None:
        """USD per million generated tokens for this model on this node (operator price within bounds)."""
        price = node.static.price_per_mtok(self.request.model)
        return None if math.isnan(price) else price
