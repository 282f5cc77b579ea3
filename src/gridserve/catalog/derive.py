"""Cards described by their figures, not looked up by name.

A node reports its card as the driver describes it (`DeviceFigures`: NVML's memory bus width and clock, SM count,
clock and compute capability; AMD's through amdsmi). From those this module derives what the performance model
needs: peak bandwidth, dense FP16 FLOPS, the dtypes and quantizations the card runs, a class, a running cost. The
hand-written table (catalog/hardware.py) stays as cited reference data: the tests derive every table card from its
driver figures and compare (tests/unit/test_card_derive.py).

Dense FP16 tensor FLOPs per SM (or compute unit) per clock, FP32 accumulate, from the vendors' whitepapers and
datasheets (peak TFLOPS / (SMs x boost clock)):
  sm_7.0 V100 1,024; sm_7.5 T4 1,024; sm_8.0 A100 2,048; sm_8.6 A10/A6000 1,024; sm_8.9 L40S 1,024;
  sm_9.0 H100 4,096; sm_10.0 B200 8,192. GeForce cards run FP16 with FP32 accumulate at half their professional
  siblings' rate (RTX 3090 512, RTX 4090 512, RTX 5090 512: NVIDIA's Ampere and Ada GA102/AD102 whitepapers).
  AMD: gfx908 MI100 1,024; gfx90a MI250X 1,024; gfx942 MI300X 2,048; gfx1100 RX 7900 XTX 512 (AMD CDNA/RDNA
  whitepapers).
The SM clock is the datasheet's boost clock where the driver gives it; NVML's maximum SM clock can run above the
clock a datasheet's FLOPS assume (H100 SXM: 1,980 against 1,830 MHz), so FLOPS derived from it may be up to ~8%
high. The micro-benchmark's figures, where the node sends them, are what predictions start from.
"""

import statistics
from dataclasses import replace

from gridserve.catalog.hardware import HARDWARE, HardwareSpec
from gridserve.types import DeviceFigures, MeasuredFigures

NVIDIA_FLOPS_PER_SM_CLOCK: dict[str, int] = {
    "7.0": 1024,
    "7.5": 1024,
    "8.0": 2048,
    "8.6": 1024,
    "8.7": 1024,
    "8.9": 1024,
    "9.0": 4096,
    "10.0": 8192,
    "12.0": 1024,
}
AMD_FLOPS_PER_CU_CLOCK: dict[str, int] = {"gfx908": 1024, "gfx90a": 1024, "gfx942": 2048, "gfx950": 4096}
AMD_CONSUMER_FLOPS_PER_CU_CLOCK = 512
"""RDNA 3 and later (gfx11xx, gfx12xx): WMMA at 512 FP16 FLOPs per compute unit per clock."""
DEFAULT_FLOPS_PER_SM_CLOCK = 512
"""An architecture no row names: the lowest tensor rate of the rows (a card is never assumed faster than it is)."""
TRANSFERS_PER_CLOCK = 2.0
"""Bandwidth = bus bytes x the memory clock NVML reports x 2: H100 SXM 5,120 bits x 2,619 MHz = 3,352 GB/s; RTX 4090
384 bits x 10,501 MHz = 1,008 GB/s; T4 256 bits x 5,001 MHz = 320 GB/s (each the datasheet's figure)."""
DERIVED_DECODE_EFFICIENCY = 0.75
"""Share of the bandwidth bound reached in decode for a card no benchmark row names: the value the table assumes
for its GPUs without a row (A10G, T4); calibration replaces it per node."""
DATACENTER_MEMORY_GIB, DATACENTER_TFLOPS = 40.0, 150.0
CONSUMER_HIGH_BANDWIDTH_GBS, CONSUMER_HIGH_TFLOPS = 300.0, 50.0
"""Class thresholds. Every table card's cited class meets its class's figures (the tests check it); the interactive
tier asks for the consumer-high figures (catalog/tiers.py)."""

_BASE = frozenset({"float32", "float16"})
_GGUF = frozenset({"none", "q8_0", "q4_k_m", "q5_k_m", "q6_k"})
_GPU_Q = _GGUF | frozenset({"awq", "gptq", "int8"})


def bandwidth_gbs(device: DeviceFigures) -> float:
    return device.memory_bus_width_bits / 8 * device.memory_clock_mhz * 1e6 * TRANSFERS_PER_CLOCK / 1e9


def _capability(device: DeviceFigures) -> tuple[int, int]:
    """NVIDIA's (major, minor); (0, 0) when the driver gave none or something else."""
    try:
        major, minor = device.compute_capability.split(".", 1)
        return int(major), int(minor)
    except ValueError:
        return 0, 0


def _geforce(device: DeviceFigures) -> bool:
    return "geforce" in device.name.lower() or device.name.lower().startswith("nvidia rtx 50")


def flops_per_sm_clock(device: DeviceFigures) -> int:
    if device.vendor == "amd":
        target = device.compute_capability.lower()
        if target.startswith(("gfx11", "gfx12")):
            return AMD_CONSUMER_FLOPS_PER_CU_CLOCK
        return AMD_FLOPS_PER_CU_CLOCK.get(target, DEFAULT_FLOPS_PER_SM_CLOCK)
    major, minor = _capability(device)
    rate = NVIDIA_FLOPS_PER_SM_CLOCK.get(f"{major}.{minor}", DEFAULT_FLOPS_PER_SM_CLOCK)
    if _geforce(device) and major >= 7 and (major, minor) != (7, 0):
        rate = min(rate, 512)
    return rate


def fp16_tflops(device: DeviceFigures) -> float:
    return device.sm_count * device.sm_clock_mhz * 1e6 * flops_per_sm_clock(device) / 1e12


def dtypes(device: DeviceFigures) -> frozenset[str]:
    """BF16 from Ampere (sm_8.0) and CDNA2 (gfx90a) on; FP8 from Ada (sm_8.9) and CDNA3 (gfx942) on."""
    if device.vendor == "amd":
        target = device.compute_capability.lower()
        out = _BASE | {"bfloat16"} if target not in ("gfx906", "gfx908") else _BASE
        return out | {"fp8"} if target in ("gfx942", "gfx950") or target.startswith("gfx12") else out
    major, minor = _capability(device)
    out = _BASE | {"bfloat16"} if major >= 8 else _BASE
    return out | {"fp8"} if (major, minor) >= (8, 9) else out


def classify(*, bandwidth_gbs: float, memory_gib: float, fp16_tflops: float, kind: str = "gpu") -> str:
    """A class from figures: `kind` "cpu" and "apple" (unified memory) are classes of their own."""
    if kind in ("cpu", "apple"):
        return kind
    if memory_gib >= DATACENTER_MEMORY_GIB and fp16_tflops >= DATACENTER_TFLOPS:
        return "datacenter"
    if bandwidth_gbs >= CONSUMER_HIGH_BANDWIDTH_GBS and fp16_tflops >= CONSUMER_HIGH_TFLOPS:
        return "consumer-high"
    return "consumer"


def cost_per_hour(hw_class: str, bandwidth: float) -> float:
    """A running cost for a card no listing prices: its bandwidth at the median hourly cost per GB/s of the
    catalogue's cards of its class (of all cards, for a class the catalogue has none of). Decode speed follows
    bandwidth, so the derived price per token is its class's typical one."""
    same = [hw for hw in HARDWARE.values() if hw.hw_class == hw_class] or list(HARDWARE.values())
    return bandwidth * statistics.median(hw.cost_per_hour / hw.bandwidth_gbs for hw in same)


def derive_card(device: DeviceFigures, key: str = "") -> HardwareSpec:
    """The spec of a card from its driver figures (`key`: the node's accelerator string, else from the name)."""
    bandwidth, tflops = bandwidth_gbs(device), fp16_tflops(device)
    memory_gib = device.memory_bytes / 2**30
    hw_class = classify(bandwidth_gbs=bandwidth, memory_gib=memory_gib, fp16_tflops=tflops)
    kinds = dtypes(device)
    return HardwareSpec(
        key=key or "derived:" + "-".join(device.name.lower().split()),
        name=device.name,
        hw_class=hw_class,
        arch=f"{device.vendor} {device.compute_capability}".strip(),
        bandwidth_gbs=round(bandwidth, 1),
        memory_gib=memory_gib,
        fp16_tflops=round(tflops, 2),
        dtypes=kinds,
        quantizations=_GPU_Q | {"fp8"} if "fp8" in kinds else _GPU_Q,
        decode_efficiency=DERIVED_DECODE_EFFICIENCY,
        cost_per_hour=round(cost_per_hour(hw_class, bandwidth), 4),
    )


COPY_REACH = 0.85
"""Share of the datasheet bandwidth a device-to-device copy reaches (planning figure: STREAM-style copies reach
80-90% on HBM and GDDR cards). A copy measured at 85% of a card's peak is that card at full speed."""
MATMUL_REACH = 0.75
"""Share of the datasheet's dense FP16 FLOPS a large square matmul reaches (planning figure, 60-90% by card)."""
MATMUL_DTYPES = ("float16", "bfloat16")


def speed_share(claimed: HardwareSpec, measured: MeasuredFigures) -> float:
    """How much of the claimed card's decode speed the measurement shows (1.0: all of it; capped at 1): decode is
    bandwidth-bound, so the copy bandwidth decides."""
    if claimed.bandwidth_gbs <= 0:
        return 1.0
    return min(1.0, measured.bandwidth_gbs / (claimed.bandwidth_gbs * COPY_REACH))


def compute_share(claimed: HardwareSpec, measured: MeasuredFigures) -> float:
    """How much of the claimed card's FP16 FLOPS the measurement shows (1.0 when no half-precision matmul ran)."""
    got = max((measured.tflops.get(d, 0.0) for d in MATMUL_DTYPES), default=0.0)
    if got <= 0 or claimed.fp16_tflops <= 0:
        return 1.0
    return min(1.0, got / (claimed.fp16_tflops * MATMUL_REACH))


def scaled(spec: HardwareSpec, *, speed: float, compute: float, cost: float, reclass: bool = False) -> HardwareSpec:
    """`spec` at `speed` of its bandwidth and `compute` of its FLOPS, its running cost times `cost`; `reclass`: its
    class derived again from those figures (else it keeps the card's)."""
    if all(abs(x - 1.0) < 1e-9 for x in (speed, compute, cost)):
        return spec
    bandwidth, tflops = spec.bandwidth_gbs * speed, spec.fp16_tflops * compute
    hw_class = spec.hw_class
    if reclass:
        kind = spec.hw_class if spec.hw_class in ("cpu", "apple") else "gpu"
        hw_class = classify(bandwidth_gbs=bandwidth, memory_gib=spec.memory_gib, fp16_tflops=tflops, kind=kind)
    return replace(
        spec,
        hw_class=hw_class,
        bandwidth_gbs=bandwidth,
        fp16_tflops=tflops,
        cost_per_hour=spec.cost_per_hour * cost,
    )
