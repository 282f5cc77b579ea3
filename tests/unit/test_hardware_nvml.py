"""GPU telemetry and driver figures through a fake NVML (and amdsmi): the clock ratio shows thermal or power
throttling, not an idle low clock; a card is described by what its driver reports, or not at all where it cannot say."""

import sys
from dataclasses import dataclass
from enum import IntEnum
from types import SimpleNamespace
from typing import Any

import pynvml
import pytest

from gridserve.catalog import HARDWARE, MODELS, derive
from gridserve.catalog.claims import claimed_card
from gridserve.node.hardware import Amdsmi, Nvml, cuda_cores_per_sm, detect_hardware
from gridserve.perfmodel import Load, predict
from gridserve.types import DeviceFigures, HardwareInfo, MeasuredFigures, Telemetry

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


# Driver figures: what NVML and amdsmi report for a card, read into `DeviceFigures`.

GIB = 2**30


@dataclass
class FakeCard:
    """The pynvml calls `Nvml.gpus` and `Nvml.device_figures` make, answering for one card as nvidia-smi shows it."""

    name: str
    memory: int
    bus_bits: int
    mem_mhz: int
    sm_mhz: int
    cores: int
    capability: tuple[int, int]
    boost_mhz: int = 0
    """`nvmlDeviceGetMaxCustomerBoostClock`'s answer (0: the driver does not say)."""
    NVML_CLOCK_SM: int = pynvml.NVML_CLOCK_SM
    NVML_CLOCK_MEM: int = pynvml.NVML_CLOCK_MEM

    def nvmlSystemGetDriverVersion(self) -> str:
        return "570.86.15"

    def nvmlDeviceGetName(self, h: Any) -> str:
        return self.name

    def nvmlDeviceGetMemoryInfo(self, h: Any) -> Any:
        return SimpleNamespace(used=2**30, total=self.memory)

    def nvmlDeviceGetMemoryBusWidth(self, h: Any) -> int:
        return self.bus_bits

    def nvmlDeviceGetMaxClockInfo(self, h: Any, clock: int) -> int:
        return {pynvml.NVML_CLOCK_SM: self.sm_mhz, pynvml.NVML_CLOCK_MEM: self.mem_mhz}[clock]

    def nvmlDeviceGetNumGpuCores(self, h: Any) -> int:
        return self.cores

    def nvmlDeviceGetMaxCustomerBoostClock(self, h: Any, clock: int) -> int:
        return self.boost_mhz if clock == pynvml.NVML_CLOCK_SM else 0

    def nvmlDeviceGetCudaComputeCapability(self, h: Any) -> tuple[int, int]:
        return self.capability


H100 = FakeCard("NVIDIA H100 80GB HBM3", 85_520_809_984, 5120, 2619, 1980, 16896, (9, 0))
RTX4090 = FakeCard("NVIDIA GeForce RTX 4090", 25_757_220_864, 384, 10501, 3105, 16384, (8, 9), boost_mhz=2520)


class Without:
    """`card` lacking the pynvml functions named in `missing` (an older pynvml), or answering NOT_SUPPORTED for
    those in `unsupported` (a driver or card that cannot say)."""

    def __init__(
        self, card: Any, missing: frozenset[str] = frozenset(), unsupported: frozenset[str] = frozenset()
    ) -> None:
        self.card, self.missing, self.unsupported = card, missing, unsupported

    def __getattr__(self, name: str) -> Any:
        if name in self.missing:
            raise AttributeError(name)
        if name in self.unsupported:

            def refuse(*args: Any) -> Any:
                raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)

            return refuse
        return getattr(self.card, name)


def figures(card: Any) -> Any:
    return Nvml(card, handles=("gpu0",)).device_figures()


@pytest.mark.parametrize(
    ("card", "sms", "cc"),
    [(H100, 132, "9.0"), (RTX4090, 128, "8.9")],
)
def test_nvml_describes_a_card_by_its_driver_figures(card: FakeCard, sms: int, cc: str) -> None:
    got = figures(card)
    assert got == DeviceFigures(
        name=card.name,
        vendor="nvidia",
        memory_bytes=card.memory,
        memory_bus_width_bits=card.bus_bits,
        memory_clock_mhz=card.mem_mhz,
        sm_count=sms,
        sm_clock_mhz=card.boost_mhz or card.sm_mhz,
        compute_capability=cc,
    )


def test_the_boost_clock_gives_the_datasheets_flops_and_the_maximum_clock_stands_in_without_it() -> None:
    boosted = figures(RTX4090)
    assert boosted is not None and boosted.sm_clock_mhz == 2520
    assert derive.fp16_tflops(boosted) == pytest.approx(HARDWARE["rtx4090"].fp16_tflops, rel=0.01)
    plain = figures(Without(RTX4090, missing=frozenset({"nvmlDeviceGetMaxCustomerBoostClock"})))
    assert plain is not None and plain.sm_clock_mhz == 3105  # higher: FLOPS derived from it run high


@pytest.mark.parametrize(("card", "key"), [(H100, "h100-sxm"), (RTX4090, "rtx4090")])
def test_the_figures_give_the_catalogue_cards_bandwidth(card: FakeCard, key: str) -> None:
    got = figures(card)
    assert got is not None
    assert derive.bandwidth_gbs(got) == pytest.approx(HARDWARE[key].bandwidth_gbs, rel=0.01)
    assert derive.dtypes(got) == HARDWARE[key].dtypes


def test_an_older_pynvml_returning_bytes_is_read_as_text() -> None:
    class Old(FakeCard):
        def nvmlDeviceGetName(self, h: Any) -> Any:
            return self.name.encode()

    old = Old(**vars(H100))
    got = figures(old)
    assert got is not None and got.name == H100.name


@pytest.mark.parametrize(
    "call",
    [
        "nvmlDeviceGetName",
        "nvmlDeviceGetMemoryInfo",
        "nvmlDeviceGetMemoryBusWidth",
        "nvmlDeviceGetMaxClockInfo",
        "nvmlDeviceGetCudaComputeCapability",
        "nvmlDeviceGetNumGpuCores",
    ],
)
def test_a_call_the_binding_or_driver_lacks_gives_no_figures(call: str) -> None:
    """A node must still start: no description instead of an exception (torch, not imported for this, gives no SM
    count either)."""
    assert figures(Without(H100, missing=frozenset({call}))) is None
    assert figures(Without(H100, unsupported=frozenset({call}))) is None


def test_figures_out_of_range_give_no_figures() -> None:
    zero_bus = FakeCard(H100.name, H100.memory, 0, 2619, 1980, 16896, (9, 0))
    assert figures(zero_bus) is None


def test_a_core_count_that_is_not_whole_sms_is_not_trusted() -> None:
    odd = FakeCard(H100.name, H100.memory, 5120, 2619, 1980, 16896 + 64, (9, 0))
    assert figures(odd) is None
    unknown_arch = FakeCard("NVIDIA Future", H100.memory, 5120, 2619, 1980, 16896, (13, 0))
    assert figures(unknown_arch) is None


@pytest.mark.parametrize(
    ("cores", "sms", "capability"),
    [(5120, 80, (7, 0)), (2560, 40, (7, 5)), (6912, 108, (8, 0)), (10496, 82, (8, 6)), (18176, 142, (8, 9))],
)
def test_cores_per_sm_match_the_datasheets(cores: int, sms: int, capability: tuple[int, int]) -> None:
    """V100, T4, A100, RTX 3090, L40S: CUDA cores over SMs as NVIDIA's datasheets give them."""
    per_sm = cuda_cores_per_sm(*capability)
    assert per_sm is not None and cores // per_sm == sms and cores % per_sm == 0


def test_no_nvml_means_no_figures() -> None:
    assert Nvml().device_figures() is None
    assert Nvml(H100, handles=("gpu0",)).device_figures(index=1) is None


def test_detect_hardware_names_a_known_card_and_describes_it(monkeypatch: pytest.MonkeyPatch) -> None:
    hw = detect_hardware(Nvml(H100, handles=("gpu0",)))
    assert hw.accelerator == "h100-sxm" and hw.memory_bytes == H100.memory
    assert hw.device is not None and hw.device.sm_count == 132 and hw.measured is None
    assert claimed_card(hw) is HARDWARE["h100-sxm"]  # a known name: the table's card, not a derived one


def test_an_unknown_card_is_described_so_the_gateway_can_derive_it() -> None:
    card = FakeCard("NVIDIA RTX 6000 Ada Generation", 48 * GIB, 384, 10001, 2505, 18176, (8, 9))
    measured = MeasuredFigures(bandwidth_gbs=800.0, tflops={"float16": 150.0}, seconds=2.5, device="cuda:0")
    hw = detect_hardware(Nvml(card, handles=("gpu0",)), measured=measured)
    assert hw.accelerator == "unknown-gpu" and hw.measured == measured
    spec = claimed_card(hw)
    assert spec is not None and spec.bandwidth_gbs == pytest.approx(960, rel=0.01)
    roundtrip = HardwareInfo.model_validate_json(hw.model_dump_json())
    assert roundtrip == hw


class ClkType(IntEnum):
    """amdsmi's AmdSmiClkType (the members read here)."""

    GFX = 0
    MEM = 4


@dataclass
class FakeAmdsmi:
    """The amdsmi calls `Amdsmi` makes, answering for one card as amdsmi's Python interface returns them."""

    asic: dict[str, Any]
    vram: dict[str, Any]
    clocks: dict[ClkType, int]
    AmdSmiClkType: type[ClkType] = ClkType
    initialised: bool = False

    def amdsmi_init(self) -> None:
        self.initialised = True

    def amdsmi_get_processor_handles(self) -> list[str]:
        return ["gpu0"]

    def amdsmi_get_gpu_asic_info(self, h: Any) -> dict[str, Any]:
        return self.asic

    def amdsmi_get_gpu_vram_info(self, h: Any) -> dict[str, Any]:
        return self.vram

    def amdsmi_get_clock_info(self, h: Any, clock: ClkType) -> dict[str, int]:
        if not isinstance(clock, ClkType):
            raise TypeError(clock)  # amdsmi raises AmdSmiParameterException for a plain int
        return {"clk": 100, "min_clk": 100, "max_clk": self.clocks[clock], "clk_locked": 0, "clk_deep_sleep": 0}

    def amdsmi_get_gpu_driver_info(self, h: Any) -> dict[str, str]:
        return {"driver_name": "amdgpu", "driver_version": "6.8.5", "driver_date": "2015/01/01 00:00"}


def mi300x(**changes: Any) -> FakeAmdsmi:
    """An MI300X: 304 CUs at 2,100 MHz, 192 GB HBM3 on 8,192 bits at an amdgpu memory clock of 1,300 MHz."""
    asic = {
        "market_name": "AMD Instinct MI300X",
        "vendor_id": "0x1002",
        "num_compute_units": 304,
        "target_graphics_version": "gfx942",
    }
    vram = {"vram_type": 4, "vram_vendor": 6, "vram_size": 196_592, "vram_bit_width": 8192}
    asic.update({k: v for k, v in changes.items() if k in asic or k.startswith("num_")})
    vram.update({k: v for k, v in changes.items() if k.startswith("vram")})
    return FakeAmdsmi(asic, vram, {ClkType.GFX: 2100, ClkType.MEM: 1300})


def amd(fake: FakeAmdsmi, monkeypatch: pytest.MonkeyPatch) -> Amdsmi:
    monkeypatch.setitem(sys.modules, "amdsmi", fake)
    opened = Amdsmi.open()
    assert fake.initialised and opened.handles == ("gpu0",)
    return opened


def test_amdsmi_describes_an_amd_card(monkeypatch: pytest.MonkeyPatch) -> None:
    got = amd(mi300x(), monkeypatch).device_figures()
    assert got is not None and got.vendor == "amd"
    assert got.name == "AMD Instinct MI300X" and got.memory_bytes == 196_592 * 2**20
    assert (got.sm_count, got.sm_clock_mhz, got.compute_capability) == (304, 2100.0, "gfx942")
    assert derive.bandwidth_gbs(got) == pytest.approx(5300, rel=0.01)  # MI300X datasheet: 5.3 TB/s
    assert derive.fp16_tflops(got) == pytest.approx(1307, rel=0.01)  # datasheet: 1,307 TFLOPS dense FP16
    assert "fp8" in derive.dtypes(got)


def test_older_amdsmi_keys_and_its_gfx_spelling_are_read(monkeypatch: pytest.MonkeyPatch) -> None:
    """Before ROCm 6.2 `vram_size_mb`; the README's `num_of_compute_units`; gfx90a comes back as "gfx90"."""
    fake = mi300x(target_graphics_version="gfx90", vram_type=3)
    fake.asic["num_of_compute_units"] = fake.asic.pop("num_compute_units")
    fake.vram["vram_size_mb"] = fake.vram.pop("vram_size")
    got = amd(fake, monkeypatch).device_figures()
    assert got is not None and got.compute_capability == "gfx90a" and got.sm_count == 304
    assert got.memory_clock_mhz == 1300.0  # HBM2E: amdgpu's clock is NVML's convention already


@pytest.mark.parametrize(
    "change",
    [
        {"num_compute_units": "N/A"},
        {"vram_bit_width": 0xFFFFFFFF},
        {"vram_size": "N/A"},
    ],
)
def test_what_amdsmi_cannot_say_gives_no_figures(change: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    assert amd(mi300x(**change), monkeypatch).device_figures() is None


def test_an_amdsmi_without_clock_info_gives_no_figures(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = mi300x()
    opened = amd(fake, monkeypatch)
    opened.module = Without(fake, missing=frozenset({"amdsmi_get_clock_info"}))
    assert opened.device_figures() is None


def test_an_unsupported_gfx_query_leaves_the_architecture_unsaid(monkeypatch: pytest.MonkeyPatch) -> None:
    got = amd(mi300x(target_graphics_version="gfx18446744073709551615"), monkeypatch).device_figures()
    assert got is not None and got.compute_capability == ""


def test_no_amdsmi_means_no_amd_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "amdsmi", None)  # importing it raises ImportError
    opened = Amdsmi.open()
    assert opened.module is None and opened.gpus() == () and opened.device_figures() is None


def test_detect_hardware_reads_amd_where_nvml_finds_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    hw = detect_hardware(Nvml(), amd(mi300x(), monkeypatch))
    assert hw.accelerator == "unknown-gpu" and hw.memory_bytes == 196_592 * 2**20
    assert hw.gpus[0].name == "AMD Instinct MI300X" and hw.gpus[0].driver == "6.8.5"
    assert hw.device is not None and hw.device.vendor == "amd"
    spec = claimed_card(hw)
    assert spec is not None and spec.hw_class == "datacenter"


def test_a_cpu_node_is_described_as_before() -> None:
    hw = detect_hardware(Nvml(), Amdsmi())
    assert hw.accelerator == "cpu" and hw.device is None and hw.gpus == () and hw.memory_bytes == hw.ram_bytes
