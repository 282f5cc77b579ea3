"""Hardware detection and live telemetry: CPU and RAM always; NVIDIA GPUs through NVML where present."""

import os
import platform
from dataclasses import dataclass
from typing import Any

import psutil

from gridserve.catalog.hardware import accelerator_for_gpu
from gridserve.types import GpuInfo, HardwareInfo


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# NVML's clock event (formerly "throttle") reason bits, as nvml.h and pynvml's `nvmlClocksEventReason*` name them.
CLOCK_REASONS = {
    0x001: "GpuIdle",
    0x002: "ApplicationsClocksSetting",
    0x004: "SwPowerCap",
    0x008: "HwSlowdown",
    0x010: "SyncBoost",
    0x020: "SwThermalSlowdown",
    0x040: "HwThermalSlowdown",
    0x080: "HwPowerBrakeSlowdown",
    0x100: "DisplayClockSetting",
}
SLOWING_REASONS = frozenset(
    {"SwPowerCap", "HwSlowdown", "SwThermalSlowdown", "HwThermalSlowdown", "HwPowerBrakeSlowdown"}
)
"""Reasons that slow a GPU that has work (thermal or power); an idle GPU's low clock is not one of them."""


def clock_reasons(bits: int) -> tuple[str, ...]:
    return tuple(name for bit, name in CLOCK_REASONS.items() if bits & bit)


@dataclass
class Nvml:
    """A handle on NVML, or nothing where there is no NVIDIA driver."""

    module: Any = None
    handles: tuple[Any, ...] = ()

    @classmethod
    def open(cls) -> "Nvml":
        try:
            import pynvml

            pynvml.nvmlInit()
            count = pynvml.nvmlDeviceGetCount()
            return cls(pynvml, tuple(pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)))
        except Exception:
            return cls()

    def gpus(self) -> tuple[GpuInfo, ...]:
        if self.module is None:
            return ()
        nv = self.module
        driver = str(nv.nvmlSystemGetDriverVersion())
        return tuple(
            GpuInfo(
                name=str(nv.nvmlDeviceGetName(h)),
                memory_total_bytes=int(nv.nvmlDeviceGetMemoryInfo(h).total),
                driver=driver,
            )
            for h in self.handles
        )

    def _reason_bits(self, h: Any) -> int | None:
        """The current clock event reasons of `h`, or None where the driver cannot say."""
        for name in ("nvmlDeviceGetCurrentClocksEventReasons", "nvmlDeviceGetCurrentClocksThrottleReasons"):
            try:
                return int(getattr(self.module, name)(h))
            except Exception:  # missing in this pynvml or driver, or not supported by this GPU
                continue
        return None

    def sample(self) -> dict[str, Any] | None:
        """Utilisation, memory, temperature, clock event reasons and throttle clock ratio of GPU 0.

        `clock_ratio` is the SM clock over its maximum only while a thermal or power reason holds the clock
        down; otherwise 1.0 (an idle GPU drops its clocks without being slow), or None if NVML has no reasons."""
        if self.module is None or not self.handles:
            return None
        nv, h = self.module, self.handles[0]
        memory = nv.nvmlDeviceGetMemoryInfo(h)
        bits = self._reason_bits(h)
        reasons = clock_reasons(bits) if bits is not None else ()
        ratio: float | None = None if bits is None else 1.0
        if SLOWING_REASONS.intersection(reasons):
            clock = nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_SM)
            max_clock = nv.nvmlDeviceGetMaxClockInfo(h, nv.NVML_CLOCK_SM) or clock or 1
            ratio = min(1.0, clock / max_clock)
        return {
            "utilization": nv.nvmlDeviceGetUtilizationRates(h).gpu / 100.0,
            "memory_used": float(memory.used),
            "memory_total": float(memory.total),
            "temperature": float(nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU)),
            "clock_ratio": ratio,
            "clock_reasons": reasons,
        }


def detect_hardware(nvml: Nvml) -> HardwareInfo:
    gpus = nvml.gpus()
    ram = psutil.virtual_memory().total
    accelerator = "cpu"
    memory = ram
    if gpus:
        accelerator = accelerator_for_gpu(gpus[0].name) or "unknown-gpu"
        memory = gpus[0].memory_total_bytes
    return HardwareInfo(
        accelerator=accelerator,
        cpu_model=_cpu_model(),
        cpu_cores=os.cpu_count() or 1,
        ram_bytes=ram,
        gpus=gpus,
        memory_bytes=memory,
    )
