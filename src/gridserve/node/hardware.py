"""Hardware detection and live telemetry: CPU and RAM always; NVIDIA GPUs through NVML and AMD GPUs through amdsmi
where present.

Besides its name, a card is described by the figures its driver reports (`DeviceFigures`: memory bus width and
clock, SM or compute-unit count, shader clock, architecture), so the gateway can derive a card no table names
(catalog/derive.py). Reading them never stops a node from starting: whatever the driver or its Python binding lacks
makes the description None, and the node registers by name alone as before."""

import importlib
import os
import platform
import sys
from dataclasses import dataclass
from typing import Any

import psutil

from gridserve.catalog.hardware import accelerator_for_gpu
from gridserve.types import DeviceFigures, GpuInfo, HardwareInfo, MeasuredFigures


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

    def device_figures(self, index: int = 0) -> DeviceFigures | None:
        """GPU `index` as NVML describes it, or None where this pynvml or driver cannot say all of it: a node whose
        card is described by name alone still starts and registers."""
        if self.module is None or index >= len(self.handles):
            return None
        nv, h = self.module, self.handles[index]
        try:
            name = _text(nv.nvmlDeviceGetName(h))
            major, minor = (int(part) for part in nv.nvmlDeviceGetCudaComputeCapability(h))
            sms = _nvml_sm_count(nv, h, major, minor) or _torch_sm_count(name)
            if sms is None:
                return None
            return DeviceFigures(
                name=name,
                vendor="nvidia",
                memory_bytes=int(nv.nvmlDeviceGetMemoryInfo(h).total),
                memory_bus_width_bits=int(nv.nvmlDeviceGetMemoryBusWidth(h)),
                memory_clock_mhz=float(nv.nvmlDeviceGetMaxClockInfo(h, nv.NVML_CLOCK_MEM)),
                sm_count=sms,
                sm_clock_mhz=_boost_clock(nv, h),
                compute_capability=f"{major}.{minor}",
            )
        except Exception:  # a call this pynvml or driver lacks (AttributeError, NVMLError), or a figure out of range
            return None


def _boost_clock(nv: Any, h: Any) -> float:
    """The SM boost clock the product is specified at (`nvmlDeviceGetMaxCustomerBoostClock`: an RTX 4090's 2,520 MHz,
    the clock datasheets' FLOPS assume) where the driver gives it, else the maximum clock (which runs higher: the
    FLOPS derived from it are then high, and the micro-benchmark's figures correct predictions)."""
    try:
        boost = float(nv.nvmlDeviceGetMaxCustomerBoostClock(h, nv.NVML_CLOCK_SM))
    except Exception:  # not in this pynvml or not supported by this GPU
        boost = 0.0
    return boost if boost > 0 else float(nv.nvmlDeviceGetMaxClockInfo(h, nv.NVML_CLOCK_SM))


def _text(value: Any) -> str:
    """A driver string: older pynvml releases return bytes."""
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def cuda_cores_per_sm(major: int, minor: int) -> int | None:
    """CUDA cores per SM by compute capability (NVIDIA's architecture whitepapers), to turn NVML's core count into
    SMs: NVML has no SM count. None for an architecture not listed."""
    if major == 6:
        return 64 if minor == 0 else 128
    if major == 7 or (major, minor) == (8, 0):
        return 64
    if major in (8, 9, 10, 11, 12):
        return 128
    return None


def _nvml_sm_count(nv: Any, h: Any, major: int, minor: int) -> int | None:
    """SMs from NVML's CUDA core count; None where the call is missing or the count is not whole SMs of the
    architecture's table entry (a table that does not fit the card is not trusted)."""
    per_sm = cuda_cores_per_sm(major, minor)
    try:
        cores = int(nv.nvmlDeviceGetNumGpuCores(h))
    except Exception:  # missing in this pynvml (before 11.5) or not supported by this driver
        return None
    if per_sm is None or cores <= 0 or cores % per_sm:
        return None
    return cores // per_sm


def _torch_sm_count(name: str) -> int | None:
    """SMs as CUDA reports them for the card named `name`, only where torch is already imported: importing it (and
    initialising CUDA) just to describe the card would cost seconds and memory at every start."""
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    try:
        if not torch.cuda.is_available():
            return None
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            if props.name == name:
                return int(props.multi_processor_count)
    except Exception:  # a CPU build, a driver torch cannot use
        return None
    return None


AMD_CLOCK_SCALE: dict[int, float] = {4: 2.0, 21: 2.0, 22: 8.0}
"""amdsmi's `vram_type` (amdsmi_vram_type_t: 4 HBM3, 21 GDDR5, 22 GDDR6) -> the factor that turns the maximum memory
clock amdgpu reports into the clock `DeviceFigures` means (bandwidth = bus bits / 8 x clock x 2). amdgpu reports
HBM and HBM2/HBM2E at half their data rate like NVML (MI100 1,200 MHz, MI250X 1,600 MHz: factor 1), HBM3 at a
quarter (MI300X 1,300 MHz x 8,192 bits -> 5.3 TB/s), GDDR5 at a quarter and GDDR6 at a sixteenth (RX 7900 XTX
1,249 MHz x 384 bits -> 960 GB/s). A type not listed keeps factor 1: a card is never described faster than it is."""


def _amd_count(value: Any) -> int | None:
    """A positive count from amdsmi, which says "N/A" or the type's all-ones value where it cannot say."""
    try:
        number = int(value)
    except (TypeError, ValueError):
        return None
    return number if 0 < number < 0xFFFFFFFF else None


def _gfx_target(value: Any) -> str:
    """amdsmi's `target_graphics_version` as a gfx target ("gfx942"). amdsmi builds it as "gfx" + the decimal
    number of the target's digits, so gfx90a comes back as "gfx90" (the only target that reads so on a server
    card), and an unsupported query as "gfx" + 2**64 - 1."""
    text = str(value).strip().lower()
    if text.isdigit():
        text = "gfx" + text
    if not text.startswith("gfx") or len(text) > 10:
        return ""
    return "gfx90a" if text == "gfx90" else text


@dataclass
class Amdsmi:
    """A handle on AMD's amdsmi library, or nothing where it is not installed or finds no AMD GPU."""

    module: Any = None
    handles: tuple[Any, ...] = ()

    @classmethod
    def open(cls) -> "Amdsmi":
        try:
            amd = importlib.import_module("amdsmi")
            amd.amdsmi_init()
            return cls(amd, tuple(amd.amdsmi_get_processor_handles()))
        except Exception:  # not installed, no amdgpu driver loaded, or no permission on it
            return cls()

    def _name(self, h: Any) -> str:
        name = str(self.module.amdsmi_get_gpu_asic_info(h).get("market_name", "")).strip()
        return name if name and name != "N/A" else "AMD GPU"

    def _memory_bytes(self, h: Any) -> int | None:
        vram = self.module.amdsmi_get_gpu_vram_info(h)
        mib = _amd_count(vram.get("vram_size", vram.get("vram_size_mb")))  # MiB; `vram_size_mb` before ROCm 6.2
        return None if mib is None else mib * 2**20

    def gpus(self) -> tuple[GpuInfo, ...]:
        if self.module is None or not self.handles:
            return ()
        try:
            driver = _text(self.module.amdsmi_get_gpu_driver_info(self.handles[0]).get("driver_version", ""))
        except Exception:  # an older amdsmi, or a virtual function that cannot say
            driver = ""
        try:
            return tuple(
                GpuInfo(name=self._name(h), memory_total_bytes=self._memory_bytes(h) or 0, driver=driver)
                for h in self.handles
            )
        except Exception:  # the library answers nothing usable: the node is described as having no GPU
            return ()

    def _max_clock_mhz(self, h: Any, kind: str) -> float:
        clock_type = getattr(self.module.AmdSmiClkType, kind)
        return float(self.module.amdsmi_get_clock_info(h, clock_type)["max_clk"])

    def device_figures(self, index: int = 0) -> DeviceFigures | None:
        """GPU `index` as amdsmi describes it (amdsmi_get_gpu_asic_info, _vram_info, _clock_info), or None where the
        library or driver cannot say all of it."""
        if self.module is None or index >= len(self.handles):
            return None
        amd, h = self.module, self.handles[index]
        try:
            asic, vram = amd.amdsmi_get_gpu_asic_info(h), amd.amdsmi_get_gpu_vram_info(h)
            units = _amd_count(asic.get("num_compute_units", asic.get("num_of_compute_units")))
            bus, memory = _amd_count(vram.get("vram_bit_width")), self._memory_bytes(h)
            if units is None or bus is None or memory is None:
                return None
            scale = AMD_CLOCK_SCALE.get(_amd_count(vram.get("vram_type")) or 0, 1.0)
            return DeviceFigures(
                name=self._name(h),
                vendor="amd",
                memory_bytes=memory,
                memory_bus_width_bits=bus,
                memory_clock_mhz=self._max_clock_mhz(h, "MEM") * scale,
                sm_count=units,
                sm_clock_mhz=self._max_clock_mhz(h, "GFX"),
                compute_capability=_gfx_target(asic.get("target_graphics_version", "")),
            )
        except Exception:  # a call this amdsmi lacks (AttributeError), AmdSmiException, or a figure out of range
            return None


def detect_hardware(nvml: Nvml, amd: Amdsmi | None = None, measured: MeasuredFigures | None = None) -> HardwareInfo:
    """The node's hardware: NVIDIA GPUs through NVML, else AMD GPUs through amdsmi, else the CPU. The first GPU's
    driver figures travel as `device` (the gateway derives a card from them when its name is in no table), and the
    join micro-benchmark's figures as `measured`."""
    gpus, device = nvml.gpus(), nvml.device_figures()
    if not gpus and amd is not None:
        gpus, device = amd.gpus(), amd.device_figures()
    ram = psutil.virtual_memory().total
    accelerator = "cpu"
    memory = ram
    if gpus:
        accelerator = accelerator_for_gpu(gpus[0].name) or "unknown-gpu"
        memory = gpus[0].memory_total_bytes or ram  # amdsmi may not say
    return HardwareInfo(
        accelerator=accelerator,
        cpu_model=_cpu_model(),
        cpu_cores=os.cpu_count() or 1,
        ram_bytes=ram,
        gpus=gpus,
        memory_bytes=memory,
        device=device,
        measured=measured,
    )
