"""GPU telemetry through a fake NVML: the clock ratio shows thermal or power throttling, not an idle low clock."""

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import pynvml
import pytest

from gridserve.catalog import HARDWARE, MODELS
from gridserve.node.hardware import Nvml
from gridserve.perfmodel import Load, predict
from gridserve.types import Telemetry

MAX_MHZ = 1980


@dataclass
class FakeNvml:
    """The pynvml calls `Nvml.sample` makes, answering for one GPU."""

    sm_mhz: int
    reasons: int | None
    NVML_CLOCK_SM: int = 1
    NVML_TEMPERATURE_GPU: int = 0

    def nvmlDeviceGetMemoryInfo(self, h: Any) -> Any:
        return SimpleNamespace(used=2**30, total=80 * 2**30)

    def nvmlDeviceGetUtilizationRates(self, h: Any) -> Any:
        return SimpleNamespace(gpu=0)

    def nvmlDeviceGetTemperature(self, h: Any, sensor: int) -> int:
        return 41

    def nvmlDeviceGetClockInfo(self, h: Any, clock: int) -> int:
        return self.sm_mhz

    def nvmlDeviceGetMaxClockInfo(self, h: Any, clock: int) -> int:
        return MAX_MHZ

    def nvmlDeviceGetCurrentClocksEventReasons(self, h: Any) -> int:
        if self.reasons is None:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return self.reasons


def sample(sm_mhz: int, reasons: int | None) -> dict[str, Any]:
    out = Nvml(FakeNvml(sm_mhz, reasons), handles=("gpu0",)).sample()
    assert out is not None
    return out


def test_an_idle_gpu_with_dropped_clocks_is_not_throttled() -> None:
    out = sample(345, pynvml.nvmlClocksEventReasonGpuIdle)  # 0.17 of max: the idle H100 measured
    assert out["clock_ratio"] == 1.0
    assert out["clock_reasons"] == ("GpuIdle",)
    load = Load(clock_ratio=out["clock_ratio"])
    idle = predict(MODELS["llama-3-8b"], HARDWARE["h100-sxm"], prompt_tokens=1, load=load)
    assert idle.throttle == 1.0 and idle.decode_tokens_per_s > 20.0  # the interactive tier's floor


def test_a_thermal_slowdown_reports_the_clock_ratio() -> None:
    out = sample(int(0.6 * MAX_MHZ), pynvml.nvmlClocksEventReasonSwThermalSlowdown)
    assert out["clock_ratio"] == pytest.approx(0.6, abs=1e-3)
    assert out["clock_reasons"] == ("SwThermalSlowdown",)


@pytest.mark.parametrize(
    ("bits", "names"),
    [
        (pynvml.nvmlClocksEventReasonSwPowerCap, ("SwPowerCap",)),
        (
            pynvml.nvmlClocksEventReasonHwSlowdown | pynvml.nvmlClocksEventReasonHwPowerBrakeSlowdown,
            ("HwSlowdown", "HwPowerBrakeSlowdown"),
        ),
        (
            pynvml.nvmlClocksEventReasonGpuIdle | pynvml.nvmlClocksEventReasonHwThermalSlowdown,
            ("GpuIdle", "HwThermalSlowdown"),
        ),
    ],
)
def test_power_and_hardware_slowdowns_report_the_clock_ratio(bits: int, names: tuple[str, ...]) -> None:
    out = sample(1650, bits)
    assert out["clock_ratio"] == pytest.approx(1650 / MAX_MHZ)
    assert out["clock_reasons"] == names


def test_application_clocks_without_a_slowdown_are_full_speed() -> None:
    out = sample(1650, pynvml.nvmlClocksEventReasonApplicationsClocksSetting)
    assert out["clock_ratio"] == 1.0


def test_a_driver_without_clock_reasons_reports_no_clock_figure() -> None:
    out = sample(345, None)
    assert out["clock_ratio"] is None and out["clock_reasons"] == ()


def test_the_older_throttle_reasons_call_is_used_where_the_event_one_is_missing() -> None:
    class Old(FakeNvml):
        nvmlDeviceGetCurrentClocksEventReasons = None  # type: ignore[assignment]

        def nvmlDeviceGetCurrentClocksThrottleReasons(self, h: Any) -> int:
            return int(pynvml.nvmlClocksThrottleReasonSwThermalSlowdown)

    out = Nvml(Old(990, None), handles=("gpu0",)).sample()
    assert out is not None and out["clock_ratio"] == pytest.approx(0.5)


def test_no_nvml_means_no_gpu_sample() -> None:
    assert Nvml().sample() is None
    assert Nvml().gpus() == ()


def test_reason_bits_match_the_installed_pynvml() -> None:
    from gridserve.node.hardware import CLOCK_REASONS, SLOWING_REASONS

    for bit, name in CLOCK_REASONS.items():
        assert getattr(pynvml, f"nvmlClocksEventReason{name}") == bit
    assert set(CLOCK_REASONS.values()) >= SLOWING_REASONS


def test_telemetry_carries_the_reasons_and_old_nodes_need_not_send_them() -> None:
    assert Telemetry().clock_reasons == ()
    tel = Telemetry(clock_ratio=0.6, clock_reasons=("SwThermalSlowdown",))
    assert Telemetry.model_validate_json(tel.model_dump_json()) == tel
