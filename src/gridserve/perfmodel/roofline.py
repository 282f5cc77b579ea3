"""The roofline prediction for one (model, hardware) pair at a given load."""

from dataclasses import dataclass

from gridserve.catalog.hardware import HardwareSpec
from gridserve.catalog.models import ModelSpec

PREFILL_FIXED_S = 0.004
"""Per-request launch overhead (tokenisation, scheduling, kernel launches): a planning figure."""
BATCH_ITL_GROWTH = 0.02
"""Relative ITL growth per extra concurrent sequence in a continuous batch (small batches stay
bandwidth-bound, so each extra sequence adds a little KV and compute traffic)."""


@dataclass(frozen=True)
class Prediction:
    ttft_s: float
    itl_s: float

    @property
    def decode_tokens_per_s(self) -> float:
        return 1.0 / self.itl_s


def predict(
    model: ModelSpec,
    hw: HardwareSpec,
    *,
    prompt_tokens: int,
    dtype: str = "float16",
    quantization: str = "none",
    concurrent: int = 1,
) -> Prediction:
    weights = model.weight_bytes(dtype, quantization)
    itl = weights / (hw.bandwidth_gbs * 1e9 * hw.decode_efficiency)
    itl *= 1.0 + BATCH_ITL_GROWTH * max(0, concurrent - 1)
    flops = 2.0 * model.params * max(1, prompt_tokens)
    prefill = flops / (hw.fp16_tflops * 1e12 * hw.prefill_efficiency)
    return Prediction(ttft_s=PREFILL_FIXED_S + prefill + itl, itl_s=itl)
