"""Predicted TTFT, ITL and tokens/s for (model, node, load): the roofline (decode bandwidth-bound, prefill
compute-bound) with throttling and queueing from telemetry, and per-node calibration from observed timings."""

from gridserve.perfmodel.calibration import Calibration
from gridserve.perfmodel.pricing import derived_price_per_mtok, effective_price_per_mtok
from gridserve.perfmodel.roofline import Load, Prediction, predict

__all__ = ["Calibration", "Load", "Prediction", "derived_price_per_mtok", "effective_price_per_mtok", "predict"]
