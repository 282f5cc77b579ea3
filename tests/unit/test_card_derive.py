"""Cards derived from their driver figures (catalog/derive.py): every catalogue card from the figures NVML reports
for it, against the table's cited figures; classes and tiers from figures; a card in no table."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gridserve.catalog.derive import (
    bandwidth_gbs,
    classify,
    cost_per_hour,
    derive_card,
    dtypes,
    fp16_tflops,
)
from gridserve.catalog.hardware import HARDWARE
from gridserve.catalog.tiers import TIERS
from gridserve.types import DeviceFigures

GIB = 2**30


def nvidia(name: str, gib: float, bus: int, mem_mhz: float, sms: int, sm_mhz: float, cc: str) -> DeviceFigures:
    return DeviceFigures(
        name=name,
        memory_bytes=int(gib * GIB),
        memory_bus_width_bits=bus,
        memory_clock_mhz=mem_mhz,
        sm_count=sms,
        sm_clock_mhz=sm_mhz,
        compute_capability=cc,
    )


# What NVML reports for each catalogue card (nvidia-smi -q: bus width, max memory and SM clocks; SM counts and
# compute capability from NVIDIA's datasheets and CUDA's device query). Boost clocks are the datasheets'.
DRIVER_FIGURES = {
    "h100-sxm": nvidia("NVIDIA H100 80GB HBM3", 80, 5120, 2619, 132, 1830, "9.0"),
    "h100-pcie": nvidia("NVIDIA H100 PCIe", 80, 5120, 1593, 114, 1620, "9.0"),
    "a100-80g": nvidia("NVIDIA A100-SXM4-80GB", 80, 5120, 1593, 108, 1410, "8.0"),
    "a100-40g": nvidia("NVIDIA A100-PCIE-40GB", 40, 5120, 1215, 108, 1410, "8.0"),
    "l40s": nvidia("NVIDIA L40S", 48, 384, 9001, 142, 2520, "8.9"),
    "rtx4090": nvidia("NVIDIA GeForce RTX 4090", 24, 384, 10501, 128, 2520, "8.9"),
    "rtx3090": nvidia("NVIDIA GeForce RTX 3090", 24, 384, 9751, 82, 1695, "8.6"),
    "a10g": nvidia("NVIDIA A10G", 24, 384, 6251, 80, 1710, "8.6"),
    "t4": nvidia("Tesla T4", 16, 256, 5001, 40, 1590, "7.5"),
}
A10G_FLOPS = 2.0
"""The table's A10G figure (70 TFLOPS, [llm-analysis]) is half what its GA102 professional rate gives (140): AWS's
part runs tensor FP16 at the GeForce rate. The derivation cannot know that from the driver; the table keeps it."""


@pytest.mark.parametrize("key", sorted(DRIVER_FIGURES))
def test_every_table_card_derives_from_its_driver_figures(key: str) -> None:
    table, derived = HARDWARE[key], derive_card(DRIVER_FIGURES[key], key=key)
    assert derived.bandwidth_gbs == pytest.approx(table.bandwidth_gbs, rel=0.03)
    expected_flops = table.fp16_tflops * (A10G_FLOPS if key == "a10g" else 1.0)
    assert derived.fp16_tflops == pytest.approx(expected_flops, rel=0.03)
    assert derived.memory_gib == pytest.approx(table.memory_gib, rel=0.01)
    assert derived.dtypes == table.dtypes
    # the class from figures admits the same tiers as the table's cited class
    for tier in TIERS.values():
        assert tier.admits(derived.bandwidth_gbs, derived.fp16_tflops) == tier.admits(
            table.bandwidth_gbs, table.fp16_tflops
        ), tier.name


def test_tiers_admit_by_figures_what_they_admitted_by_class() -> None:
    """Interactive took datacenter and consumer-high cards; its figures take exactly those of the catalogue."""
    interactive = TIERS["interactive"]
    for hw in HARDWARE.values():
        assert interactive.admits(hw.bandwidth_gbs, hw.fp16_tflops) == (
            hw.hw_class in ("datacenter", "consumer-high")
        ), hw.key
        assert TIERS["standard"].admits(hw.bandwidth_gbs, hw.fp16_tflops)
    assert not TIERS["standard"].admits(math.nan, math.nan)  # an unknown card: no tier


def test_a_card_in_no_table_is_classed_and_priced_from_its_figures() -> None:
    figures = nvidia("NVIDIA GeForce RTX 4070 Ti SUPER", 16, 256, 10501, 66, 2610, "8.9")
    card = derive_card(figures, key="rtx4070ti-super")
    assert card.key == "rtx4070ti-super" and card.name == "NVIDIA GeForce RTX 4070 Ti SUPER"
    assert card.bandwidth_gbs == pytest.approx(672.0, rel=0.01)  # 256-bit GDDR6X at 21 Gbps
    assert card.fp16_tflops == pytest.approx(88.2, rel=0.01)  # 66 SMs x 2,610 MHz x 512 (GeForce)
    assert card.hw_class == "consumer-high" and "fp8" in card.dtypes and "fp8" in card.quantizations
    assert TIERS["interactive"].admits(card.bandwidth_gbs, card.fp16_tflops)
    # its hour: its bandwidth at the median cost per GB/s of the catalogue's consumer-high cards (3090, 4090)
    per_gbs = (0.25 / 936 + 0.4 / 1008) / 2
    assert card.cost_per_hour == pytest.approx(672 * per_gbs, rel=0.01)


def test_amd_cards_derive_from_their_compute_units() -> None:
    mi300x = DeviceFigures(
        name="AMD Instinct MI300X",
        vendor="amd",
        memory_bytes=192 * GIB,
        memory_bus_width_bits=8192,
        memory_clock_mhz=2600,
        sm_count=304,
        sm_clock_mhz=2100,
        compute_capability="gfx942",
    )
    assert bandwidth_gbs(mi300x) == pytest.approx(5325, rel=0.01)  # 5.3 TB/s datasheet
    assert fp16_tflops(mi300x) == pytest.approx(1307, rel=0.01)  # 1,307 TFLOPS dense FP16
    assert {"bfloat16", "fp8"} <= dtypes(mi300x)
    assert derive_card(mi300x).hw_class == "datacenter"


def test_older_cards_lack_bf16_and_fp8() -> None:
    assert dtypes(DRIVER_FIGURES["t4"]) == frozenset({"float32", "float16"})
    assert "fp8" not in dtypes(DRIVER_FIGURES["a100-80g"]) and "bfloat16" in dtypes(DRIVER_FIGURES["a100-80g"])


@given(
    bandwidth=st.floats(1, 10_000),
    memory=st.floats(1, 512),
    tflops=st.floats(0.1, 5_000),
    factor=st.floats(1.0, 10.0),
)
def test_more_of_every_figure_never_lowers_a_class(
    bandwidth: float, memory: float, tflops: float, factor: float
) -> None:
    order = ["consumer", "consumer-high", "datacenter"]
    low = classify(bandwidth_gbs=bandwidth, memory_gib=memory, fp16_tflops=tflops)
    high = classify(bandwidth_gbs=bandwidth * factor, memory_gib=memory * factor, fp16_tflops=tflops * factor)
    assert order.index(high) >= order.index(low)


@given(st.floats(1, 10_000), st.sampled_from(["datacenter", "consumer-high", "consumer", "apple", "cpu"]))
def test_a_derived_hour_grows_with_bandwidth(bandwidth: float, hw_class: str) -> None:
    assert 0 < cost_per_hour(hw_class, bandwidth) < cost_per_hour(hw_class, bandwidth * 1.01)
