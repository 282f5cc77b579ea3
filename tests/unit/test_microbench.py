"""The join micro-benchmark (node/microbench.py): positive, finite figures within its time budget on the CPU; a
clock that runs fast stops it after about one step; and the node runs it once, before it registers, only where it
should (a GPU node with a real engine, or a CPU node asked to), registering without figures when it fails."""

import asyncio
import logging
import math
from types import SimpleNamespace
from typing import cast

import pytest
import torch

from gridserve.engines import Engine
from gridserve.node import microbench
from gridserve.node.agent import NodeAgent
from gridserve.node.config import NodeConfig
from gridserve.node.hardware import Amdsmi, Nvml
from gridserve.trust import Identity
from gridserve.types import HardwareInfo, MeasuredFigures

MARGIN_S = 3.0
"""Generous: two shared cores, and the test suite's other workers on them."""


class Ticks:
    """A clock that moves on `tick` seconds every time it is read, however fast the work really is."""

    def __init__(self, tick: float) -> None:
        self.now, self.tick, self.reads = 0.0, tick, 0

    def __call__(self) -> float:
        self.reads += 1
        self.now += self.tick
        return self.now


def test_a_cpu_run_measures_bandwidth_and_float32_within_its_budget() -> None:
    """On a clock that moves only when read (the machine's load cannot starve a step of its share of the budget)."""
    clock = Ticks(0.01)
    got = microbench.run("cpu", budget_s=1.0, clock=clock)
    assert got.device == "cpu"
    assert math.isfinite(got.bandwidth_gbs) and got.bandwidth_gbs > 0
    assert set(got.tflops) == {"float32"}  # CPU engines compute in float32: the default measures that only
    assert all(math.isfinite(v) and v > 0 for v in got.tflops.values())
    assert 0 < got.seconds <= 1.0 + 8 * clock.tick
    assert "float32" in microbench.describe(got) and "GB/s" in microbench.describe(got)


@pytest.mark.parametrize("tick", [0.01, 0.1, 0.4])
def test_the_budget_bounds_the_run_to_about_one_step_beyond_it(tick: float) -> None:
    """One step: a warm measurement (two timed calls, four reads of the clock) and the checks around it. (Each
    call looks `tick` long, at least STEP_S, so sizes do not grow: this clock measures nothing real.)"""
    clock = Ticks(tick)
    got = microbench.run("cpu", budget_s=1.0, clock=clock)
    assert got.seconds <= 1.0 + 8 * tick + 1e-9
    assert clock.reads <= 200  # repetitions are bounded too, however much budget is left
    assert got.bandwidth_gbs > 0


def test_no_budget_still_gives_a_bandwidth_figure_and_no_matmul() -> None:
    """The first copy always runs: a node that sent a zero would read as a card far slower than it claims."""
    got = microbench.run("cpu", budget_s=0.0)
    assert got.bandwidth_gbs > 0 and got.tflops == {}


def test_dtypes_the_device_cannot_run_are_skipped() -> None:
    got = microbench.run("cpu", budget_s=1.0, dtypes=("fp8", "float32"), clock=Ticks(0.01))
    assert "fp8" not in got.tflops and "float32" in got.tflops


def test_only_cuda_and_cpu_devices_are_measured() -> None:
    with pytest.raises(ValueError, match="cuda or cpu"):
        microbench.run("meta", budget_s=0.1)


@pytest.mark.parametrize(
    ("has_gpu", "setting", "device"),
    [
        (True, None, "cuda:0"),
        (True, "1", "cuda:0"),
        (True, "0", None),
        (False, None, None),  # a CPU node's figures would move the CPU predictions: not by default
        (False, "1", "cpu"),
        (False, "0", None),
    ],
)
def test_which_device_is_measured_at_join(has_gpu: bool, setting: str | None, device: str | None) -> None:
    env = {} if setting is None else {microbench.ENV: setting}
    assert microbench.device_for_join(has_gpu, env) == device


FIGURES = MeasuredFigures(bandwidth_gbs=3000.0, tflops={"float16": 700.0}, seconds=2.5, device="cuda:0")


def test_a_gpu_node_without_cuda_in_torch_skips_the_benchmark(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(microbench, "run", lambda *a: pytest.fail("ran without CUDA"))
    assert asyncio.run(microbench.at_join(True, env={})) is None


def test_a_failing_benchmark_logs_a_warning_and_gives_no_figures(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(device: str, budget_s: float) -> MeasuredFigures:
        raise RuntimeError("CUDA error: out of memory")

    monkeypatch.setattr(microbench, "run", broken)
    with caplog.at_level(logging.WARNING, logger="gridserve.node"):
        assert asyncio.run(microbench.at_join(False, env={microbench.ENV: "1"})) is None
    assert "out of memory" in caplog.text and "without measured figures" in caplog.text


class StubEngine:
    """What `NodeAgent.capability` asks of an engine."""

    kind = "torch"

    def __init__(self, advertised: HardwareInfo | None = None) -> None:
        self.advertised = advertised

    def advertised_hardware(self) -> HardwareInfo | None:
        return self.advertised

    def offers(self) -> tuple[()]:
        return ()

    def loadable(self) -> tuple[()]:
        return ()


GPU = SimpleNamespace(
    nvmlSystemGetDriverVersion=lambda: "570.86.15",
    nvmlDeviceGetName=lambda h: "NVIDIA H100 80GB HBM3",
    nvmlDeviceGetMemoryInfo=lambda h: SimpleNamespace(total=80 * 2**30, used=0),
)
"""An NVML that names a GPU (and cannot describe it: the agent registers by name)."""


def agent_with(engine: StubEngine, gpu: bool, monkeypatch: pytest.MonkeyPatch) -> tuple[NodeAgent, list[str]]:
    """A node agent on `engine`, with a GPU or none, whose benchmark records the device it ran on."""
    monkeypatch.delenv(microbench.ENV, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    ran: list[str] = []

    def fake_run(device: str, budget_s: float) -> MeasuredFigures:
        ran.append(device)
        return FIGURES

    monkeypatch.setattr(microbench, "run", fake_run)
    config = NodeConfig(gateway_url="http://gw", engine="torch:test", port=9)
    agent = NodeAgent(config, Identity.generate(), cast(Engine, engine))
    agent.nvml, agent.amd = (Nvml(GPU, handles=("gpu0",)) if gpu else Nvml()), Amdsmi()
    return agent, ran


def benchmark_twice(agent: NodeAgent) -> None:
    async def go() -> None:
        await agent._benchmark_once()
        await agent._benchmark_once()  # registering again (a model loaded, another gateway) measures nothing
        await agent.aclose()

    asyncio.run(go())


def test_a_gpu_node_measures_once_and_registers_the_figures(monkeypatch: pytest.MonkeyPatch) -> None:
    agent, ran = agent_with(StubEngine(), gpu=True, monkeypatch=monkeypatch)
    benchmark_twice(agent)
    assert ran == ["cuda:0"]
    hardware = agent.capability().hardware
    assert hardware.accelerator == "h100-sxm" and hardware.measured == FIGURES


@pytest.mark.parametrize(
    "engine",
    [StubEngine(HardwareInfo(accelerator="rtx4090", emulated=True)), StubEngine()],
    ids=["emulated", "cpu-node"],
)
def test_emulated_and_cpu_nodes_measure_nothing(engine: StubEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    agent, ran = agent_with(engine, gpu=engine.advertised is not None, monkeypatch=monkeypatch)
    benchmark_twice(agent)
    assert ran == [] and agent.capability().hardware.measured is None


def test_figures_keep_four_significant_figures() -> None:
    """Not fixed decimals: a slow CPU's 0.0004 TFLOPS is not rounded to zero."""
    assert microbench._figure(0.000123456) == 0.0001235
    assert microbench._figure(2891.37) == 2891.0
