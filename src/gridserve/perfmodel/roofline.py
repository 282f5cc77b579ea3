"""The roofline prediction for one (model, hardware) pair under a given load.

- decode: ITL = weight bytes / (bandwidth x decode efficiency), efficiency from published llama.cpp
  measurements (catalog/hardware.py: 0.75-0.87 on consumer GPUs, 0.42-0.54 data-centre);
- prefill: 2 x params x prompt tokens / (FLOPS x prefill efficiency);
- throttling: a reported SM clock ratio below 1 slows both by that ratio; at or above THROTTLE_TEMP_C with no
  clock figure, THROTTLE_FACTOR is assumed;
- batching: ITL grows by BATCH_ITL_GROWTH per extra sequence up to the hardware's batch slots, and linearly
  beyond them; requests beyond the slots queue for a share of a job's service time;
- calibration: the node's observed/predicted ratios scale the result (perfmodel/calibration.py).
"""

from dataclasses import dataclass

from gridserve.catalog.hardware import HardwareSpec
from gridserve.catalog.models import ModelSpec
from gridserve.perfmodel.calibration import Calibration

PREFILL_FIXED_S = 0.004
"""Per-request launch overhead (tokenisation, scheduling, kernel launches): a planning figure."""
BATCH_ITL_GROWTH = 0.02
"""Relative ITL growth per extra sequence in a continuous batch (small batches stay bandwidth-bound)."""
THROTTLE_TEMP_C = 87.0
"""NVIDIA GPUs begin thermal slowdown in the mid/high 80s C (nvidia-smi -q 'GPU Slowdown Temp')."""
THROTTLE_FACTOR = 0.8
TYPICAL_OUTPUT_TOKENS = 128
"""Output length assumed for a queued job when estimating how long it occupies a slot."""
LOAD_BANDWIDTH_GBS = 2.0
"""Disk-to-device bandwidth for loading weights that are on disk but not resident (NVMe-class)."""


@dataclass(frozen=True)
class Load:
    """How busy the node is: requests in flight on it, and requests waiting in its queue."""

    active: int = 0
    queued: int = 0
    clock_ratio: float | None = None
    temperature_c: float | None = None


@dataclass(frozen=True)
class Prediction:
    ttft_s: float
    itl_s: float
    queue_s: float = 0.0
    load_s: float = 0.0
    throttle: float = 1.0

    @property
    def decode_tokens_per_s(self) -> float:
        return 1.0 / self.itl_s

    def e2e_s(self, output_tokens: int) -> float:
        return self.ttft_s + self.itl_s * max(0, output_tokens - 1)


def _throttle(load: Load) -> float:
    if load.clock_ratio is not None and load.clock_ratio > 0.0:  # a clock figure beats the temperature guess
        return min(1.0, load.clock_ratio)
    if load.temperature_c is not None and load.temperature_c >= THROTTLE_TEMP_C:
        return THROTTLE_FACTOR
    return 1.0


def base_itl_s(model: ModelSpec, hw: HardwareSpec, dtype: str, quantization: str) -> float:
    return model.weight_bytes(dtype, quantization) / (hw.bandwidth_gbs * 1e9 * hw.decode_efficiency)


def predict(
    model: ModelSpec,
    hw: HardwareSpec,
    *,
    prompt_tokens: int,
    dtype: str = "float16",
    quantization: str = "none",
    load: Load | None = None,
    calibration: Calibration | None = None,
    resident: bool = True,
) -> Prediction:
    load = load or Load()
    cal = calibration or Calibration()
    speed = _throttle(load)
    itl = base_itl_s(model, hw, dtype, quantization) / speed
    running = load.active + 1
    slots = max(1, hw.batch_slots)
    if running <= slots:
        itl *= 1.0 + BATCH_ITL_GROWTH * (running - 1)
    else:
        itl *= (1.0 + BATCH_ITL_GROWTH * (slots - 1)) * running / slots
    prefill = 2.0 * model.params * max(1, prompt_tokens) / (hw.fp16_tflops * 1e12 * hw.prefill_efficiency * speed)
    ttft = (PREFILL_FIXED_S + prefill + itl) * cal.ttft_factor
    itl *= cal.itl_factor
    waiting = load.queued + max(0, load.active + 1 - slots)
    queue = waiting * (ttft + itl * TYPICAL_OUTPUT_TOKENS) / slots if waiting else 0.0
    loading = 0.0 if resident else model.weight_bytes(dtype, quantization) / (LOAD_BANDWIDTH_GBS * 1e9)
    return Prediction(ttft_s=ttft + queue + loading, itl_s=itl, queue_s=queue, load_s=loading, throttle=speed)
