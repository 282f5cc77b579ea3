"""The roofline prediction for (model, hardware) under a given load, written once over columns.

- decode: ITL = weight bytes read per token / (bandwidth x decode efficiency), efficiency from published llama.cpp
  measurements (catalog/hardware.py: 0.75-0.87 on consumer GPUs, 0.42-0.54 data-centre); a dense model reads
  every weight, a mixture of experts its active ones (`ModelSpec.decode_bytes`);
- prefill: 2 x params x prompt tokens / (FLOPS x prefill efficiency), active params for a mixture of experts;
- throttling: a reported SM clock ratio below 1 slows both by that ratio; at or above THROTTLE_TEMP_C with no
  clock figure, THROTTLE_FACTOR is assumed;
- batching: ITL grows by BATCH_ITL_GROWTH per extra sequence up to the hardware's batch slots, and linearly
  beyond them; requests beyond the slots queue for a share of a job's service time. A mixture of experts' step
  also reads the further experts the batch's sequences are routed to (`moe_factor`: 1 for a dense model);
- calibration: the node's observed/predicted ratios scale the result (perfmodel/calibration.py).

The formula (`throttle`, `unloaded`, `under_load`) takes numpy columns (one row per node: the scheduler predicts
for a whole pool at once) or plain floats (one node: `predict`, the simulator, the doctor), and the scheduler's
compiled kernel compiles these same functions (`where`, `minimum` and `maximum` are its only non-arithmetic
steps; `scheduler/_fused_kernel.py` gives numba their one-value meaning). One formula, one order of operations:
every path gets the same bits. A missing figure is NaN in a column (no clock ratio, no temperature).
"""

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from gridserve.catalog.hardware import HardwareSpec
from gridserve.catalog.models import ModelSpec
from gridserve.perfmodel.calibration import TYPICAL_OUTPUT_TOKENS, Calibration

PREFILL_FIXED_S = 0.004
"""Per-request launch overhead (tokenisation, scheduling, kernel launches): a planning figure."""
BATCH_ITL_GROWTH = 0.02
"""Relative ITL growth per extra sequence in a continuous batch (small batches stay bandwidth-bound)."""
THROTTLE_TEMP_C = 87.0
"""NVIDIA GPUs begin thermal slowdown in the mid/high 80s C (nvidia-smi -q 'GPU Slowdown Temp')."""
THROTTLE_FACTOR = 0.8
LOAD_BANDWIDTH_GBS = 2.0
"""Disk-to-device bandwidth for loading weights that are on disk but not resident (NVMe-class)."""

Array = npt.NDArray[np.float64]
Num = float | Array
"""One node's figure or a column of them (one row per node)."""
Cond = bool | npt.NDArray[np.bool_]


# -- the three non-arithmetic steps: elementwise on columns, plain on floats (and in the compiled kernel) --------


def where(cond: Cond, a: Num, b: Num) -> Num:
    """`a` where `cond` holds, else `b` (both are computed: as numpy does)."""
    if isinstance(cond, np.ndarray):
        return np.where(cond, a, b)
    return a if cond else b


def minimum(a: Num, b: Num) -> Num:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return np.minimum(a, b)
    return min(a, b)


def maximum(a: Num, b: Num) -> Num:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return np.maximum(a, b)
    return max(a, b)


# -- the formula ----------------------------------------------------------------------------------------------------


def throttle(clock_ratio: Num, temperature_c: Num) -> Num:
    """Speed factor in (0, 1]: a clock figure beats the temperature guess; NaN is no figure."""
    return where(
        clock_ratio > 0.0,
        minimum(1.0, clock_ratio),
        where(temperature_c >= THROTTLE_TEMP_C, THROTTLE_FACTOR, 1.0),
    )


def moe_factor(batch: Num, experts: Num, per_token: Num, routed_share: Num) -> Num:
    """Weight bytes a decode step over `batch` sequences reads, over those one sequence reads: the routed experts'
    share of the latter grows with the expected distinct experts the batch touches per layer,
    E x (1 - (1 - k/E)^b), over the k one sequence touches (`ModelSpec.decode_params`, as a ratio). Exactly 1 for
    a dense model (experts = per_token = routed_share = 0)."""
    touched = experts * (1.0 - (1.0 - per_token / maximum(experts, 1.0)) ** maximum(batch, 1.0))
    return (1.0 - routed_share) + routed_share * touched / maximum(per_token, 1.0)


def unloaded(work: Num, base_itl: Num, flops: Num, speed: Num) -> tuple[Num, Num]:
    """(ITL, prefill seconds) of one sequence alone on the node, throttled.

    `work`: 2 x (active) params x prompt tokens; `base_itl`: `base_itl_s`; `flops`: FP16 FLOPS x prefill efficiency."""
    return base_itl / speed, work / (flops * speed)


def under_load(
    itl: Num,
    prefill: Num,
    slots: Num,
    active: Num,
    queued: Num,
    ttft_factor: Num,
    itl_factor: Num,
    load_s: Num,
    output_tokens: Num = TYPICAL_OUTPUT_TOKENS,
    interleaved: Num = 0.0,
    experts: Num = 0.0,
    per_token: Num = 0.0,
    routed_share: Num = 0.0,
) -> tuple[Num, Num, Num]:
    """(TTFT, ITL, queue seconds) of a new request joining `active` requests in flight and `queued` waiting, on a
    node with `slots` batch slots (>= 1), calibrated; TTFT includes the queue and `load_s` (loading weights that
    are not resident). `itl` and `prefill` come from `unloaded`; active = queued = 0 is the node at rest. Each job
    ahead holds its slot for a TTFT and `output_tokens` (the node's typical answer, `Calibration.output_tokens`).
    An `interleaved` node (> 0: an engine that runs every request at once, token by token in turn) has no slots
    to wait for: a new request starts at once and every request's tokens come `running` times slower (one
    sequence a step). `experts`, `per_token`, `routed_share`: a mixture of experts' `moe_terms` (0: dense)."""
    running = active + 1
    batch = moe_factor(minimum(running, slots), experts, per_token, routed_share)
    itl = where(
        interleaved > 0.0,
        itl * running,
        where(
            running <= slots,
            itl * (1.0 + BATCH_ITL_GROWTH * active) * batch,
            itl * ((1.0 + BATCH_ITL_GROWTH * (slots - 1)) * batch * running / slots),
        ),
    )
    ttft = (PREFILL_FIXED_S + prefill + itl) * ttft_factor
    itl = itl * itl_factor
    waiting = queued + where(interleaved > 0.0, 0.0, maximum(0.0, active + 1 - slots))
    queue = waiting * (ttft + itl * output_tokens) / slots  # 0 when nothing waits
    return ttft + queue + load_s, itl, queue


# -- one node ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Load:
    """How busy the node is: requests in flight on it, and requests waiting in its queue."""

    active: int = 0
    queued: int = 0
    clock_ratio: float | None = None
    temperature_c: float | None = None
    interleaved: bool = False
    """The engine runs requests token by token in turn, without batch slots (`Capability.interleaved`)."""


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


def decode_bytes_per_s(hw: HardwareSpec) -> float:
    """The bandwidth decode streams weights at: peak x measured decode efficiency."""
    return hw.bandwidth_gbs * 1e9 * hw.decode_efficiency


def prefill_flops(hw: HardwareSpec) -> float:
    """The FLOPS prefill runs at: FP16 peak x measured prefill efficiency."""
    return hw.fp16_tflops * 1e12 * hw.prefill_efficiency


def base_itl_s(model: ModelSpec, hw: HardwareSpec, dtype: str, quantization: str) -> float:
    """Decode time per token of one sequence at full clocks: the weights it reads streamed once (all of a dense
    model's, a mixture of experts' active ones)."""
    return model.decode_bytes(1, dtype, quantization) / decode_bytes_per_s(hw)


def moe_terms(model: ModelSpec) -> tuple[float, float, float]:
    """`under_load`'s (experts, per_token, routed_share) for `model`: zeros for a dense model."""
    return float(model.experts), float(model.experts_per_token), model.routed_share


def prefill_work(model: ModelSpec, prompt_tokens: Num) -> Num:
    """FLOPs to prefill a prompt (or the part of it not in the node's prefix cache): 2 per parameter per token,
    the active parameters of a mixture of experts (at least one token: the last is always computed)."""
    return 2.0 * model.token_params * maximum(1, prompt_tokens)


def load_weights_s(model: ModelSpec, dtype: str, quantization: str) -> float:
    """Seconds to load weights that are on disk but not resident."""
    return model.weight_bytes(dtype, quantization) / (LOAD_BANDWIDTH_GBS * 1e9)


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
    """One node's prediction: the column formula over a single row (plain floats)."""
    load = load or Load()
    cal = calibration or Calibration()
    nan = float("nan")
    speed = float(
        throttle(
            load.clock_ratio if load.clock_ratio is not None else nan,
            load.temperature_c if load.temperature_c is not None else nan,
        )
    )
    work = float(prefill_work(model, prompt_tokens))
    itl, prefill = unloaded(work, base_itl_s(model, hw, dtype, quantization), prefill_flops(hw), speed)
    loading = 0.0 if resident else load_weights_s(model, dtype, quantization)
    ttft, itl, queue = under_load(
        itl,
        prefill,
        float(max(1, hw.batch_slots)),
        float(load.active),
        float(load.queued),
        cal.ttft_factor,
        cal.itl_factor,
        loading,
        cal.output_tokens,
        1.0 if load.interleaved else 0.0,
        *moe_terms(model),
    )
    return Prediction(ttft_s=float(ttft), itl_s=float(itl), queue_s=float(queue), load_s=loading, throttle=speed)
