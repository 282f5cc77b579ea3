"""Predicted TTFT and ITL from the roofline: decode is bandwidth-bound, prefill compute-bound."""

from gridserve.perfmodel.roofline import Prediction, predict

__all__ = ["Prediction", "predict"]
