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

    def sample(self) -> dict[str, float] | None:
        """Utilisation, memory, temperature and SM clock ratio of GPU 0."""
        if self.module is None or not self.handles:
            return None
        nv, h = self.module, self.handles[0]
        memory = nv.nvmlDeviceGetMemoryInfo(h)
        clock = nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_SM)
        max_clock = nv.nvmlDeviceGetMaxClockInfo(h, nv.NVML_CLOCK_SM) or clock or 1
        return {
            "utilization": nv.nvmlDeviceGetUtilizationRates(h).gpu / 100.0,
            "memory_used": float(memory.used),
            "memory_total": float(memory.total),
            "temperature": float(nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU)),
            "clock_ratio": clock / max_clock,
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
