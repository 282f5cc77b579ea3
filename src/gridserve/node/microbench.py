"""A short, bounded micro-benchmark a node runs once when it joins: device memory bandwidth and a dense matmul per
dtype the device supports.

Why: a driver's figures say what a card is built to do; a node's card may be power-capped, throttled, shared or not
the card it claims. The node signs what it measured with its capability (`HardwareInfo.measured`), the performance
model starts from those figures, and the gateway compares them with the claimed card (catalog/derive.py: a copy at
`COPY_REACH` of the datasheet bandwidth, a matmul at `MATMUL_REACH` of its FP16 FLOPS, is the card at full speed).

Bounded: every step checks a deadline before it starts and is sized to take milliseconds to tens of milliseconds;
sizes grow only while the time left allows, and shrink with the device's free memory. A run takes at most `budget_s`
plus about one step (CUDA's start-up, before the clock starts, aside).
"""

import asyncio
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from gridserve.types import MeasuredFigures

if TYPE_CHECKING:
    import torch

log = logging.getLogger("gridserve.node")

ENV = "GRIDSERVE_MICROBENCH"
"""`0` skips the benchmark everywhere; `1` runs it on a CPU-only node too (by default it runs only on a GPU node: a
CPU node's measured figures would change the CPU predictions the catalogue's tests rely on)."""
BUDGET_S = 3.0
"""The default time budget at join: seconds, not minutes."""
GPU_DTYPES = ("float16", "bfloat16", "float32", "fp8")
CPU_DTYPES = ("float32",)
"""CPU engines compute in float32; half-precision matmul on most CPUs is a slow software path whose figure would
understate the FP16 compute share the gateway reads (catalog/derive.py `compute_share`)."""
MIB = 2**20
COPY_BYTES = {"cuda": 1024 * MIB, "cpu": 256 * MIB}
"""The copy's buffer, at most: many times any cache (H100's L2 is 50 MB), so the copy measures device memory."""
PROBE_BYTES = 64 * MIB
"""The first copy's buffer: beyond most caches, quick enough to fit any budget."""
MEMORY_SHARE = 1 / 8
"""Most of the device's free memory one step's buffers may take (an engine may already hold the rest)."""
MATMUL_START = 256
MATMUL_MAX = {"cuda": 16384, "cpu": 4096}
STEP_S = 0.005
"""Operands grow until one call takes this long (a matmul that large runs at the card's rate)."""
REP_S = 0.03
"""One timed repetition runs calls for about this long, so launch and timing overheads do not count."""
MAX_REPS = 5
MAX_CALLS = 256

Clock = Callable[[], float]
Call = Callable[[], object]


@dataclass(frozen=True, slots=True)
class Deadline:
    """The time a phase (or the whole run) must end by, on `clock`."""

    clock: Clock
    end: float

    def left(self) -> float:
        return self.end - self.clock()

    def fits(self, seconds: float) -> bool:
        """Whether a step predicted to take `seconds` ends in time."""
        return seconds <= self.left()


@dataclass(frozen=True, slots=True)
class Bench:
    """Timing on one torch device, waiting for it around each timing (CUDA runs asynchronously)."""

    handle: "torch.device"
    clock: Clock

    @property
    def kind(self) -> str:
        return "cuda" if self.handle.type == "cuda" else "cpu"

    def sync(self) -> None:
        import torch

        if self.handle.type == "cuda":
            torch.cuda.synchronize(self.handle)

    def free_bytes(self) -> int:
        """Free device memory (CUDA, after handing back what earlier steps cached), or available RAM (CPU)."""
        import torch

        if self.handle.type == "cuda":
            torch.cuda.empty_cache()
            return int(torch.cuda.mem_get_info(self.handle)[0])
        import psutil

        return int(psutil.virtual_memory().available)

    def timed(self, call: Call) -> float:
        self.sync()
        start = self.clock()
        call()
        self.sync()
        return max(self.clock() - start, 1e-9)

    def warm(self, call: Call) -> float:
        """The faster of two calls: the first pays page faults, kernel selection and library start-up."""
        return min(self.timed(call), self.timed(call))

    def best_rate(self, call: Call, work: float, seconds: float, phase: Deadline) -> float:
        """Best `work` per second over up to MAX_REPS repetitions of enough calls to last REP_S, each started only
        if the phase has time for it (`seconds`: one warm call, whose rate stands if no repetition fits)."""
        calls = max(1, min(MAX_CALLS, int(REP_S / seconds)))

        def repetition() -> None:
            for _ in range(calls):
                call()

        best, step = work / seconds, seconds * calls
        for _ in range(MAX_REPS):
            if not phase.fits(step):
                break
            step = self.timed(repetition)
            best = max(best, work * calls / step)
        return best


def _copy_cap(bench: Bench) -> int:
    """The copy's buffer: COPY_BYTES, or less where free memory is short (source and destination together within
    MEMORY_SHARE of it), in whole MiB."""
    cap = min(COPY_BYTES[bench.kind], int(bench.free_bytes() * MEMORY_SHARE / 2))
    return max(MIB, cap // MIB * MIB)


def _copy_step(bench: Bench, size: int) -> tuple[Call, float]:
    """A device-to-device copy of `size` bytes, and one warm copy's seconds."""
    import torch

    src = torch.ones(size // 4, dtype=torch.float32, device=bench.handle)
    dst = torch.empty_like(src)

    def call() -> object:
        return dst.copy_(src)

    return call, bench.warm(call)


def bandwidth_gbs(bench: Bench, phase: Deadline) -> float:
    """Copy bandwidth in GB/s (bytes read plus bytes written): a PROBE_BYTES copy, grown 4x at a time up to the
    cap while the phase has time for the larger buffers and a few repetitions, then the best repetition."""
    cap = _copy_cap(bench)
    size = min(cap, PROBE_BYTES)
    call, seconds = _copy_step(bench, size)
    while size < cap and phase.fits(seconds * 4 * (3 + MAX_REPS)):
        size = min(cap, size * 4)
        del call  # the smaller buffers go before the larger ones come
        call, seconds = _copy_step(bench, size)
    return bench.best_rate(call, 2.0 * size, seconds, phase) / 1e9


def supported(bench: Bench, dtype: str) -> bool:
    """Whether the device runs `dtype` matmuls natively: bfloat16 from sm_80, fp8 (torch._scaled_mm) from sm_89 on
    NVIDIA; on ROCm bfloat16 where torch says so, fp8 not measured (its formats differ by target)."""
    import torch

    if bench.kind == "cpu":
        return dtype in ("float16", "bfloat16", "float32")
    rocm = torch.version.hip is not None
    capability = torch.cuda.get_device_capability(bench.handle)
    if dtype == "bfloat16":
        return torch.cuda.is_bf16_supported() if rocm else capability >= (8, 0)
    if dtype == "fp8":
        fp8 = hasattr(torch, "_scaled_mm") and hasattr(torch, "float8_e4m3fn")
        return fp8 and not rocm and capability >= (8, 9)
    return dtype in ("float16", "float32")


def _matmul_call(bench: Bench, dtype: str, n: int) -> Call:
    """An n x n by n x n matmul in `dtype` (fp8: e4m3 operands, unit scales, bfloat16 out, as inference runs it)."""
    import torch

    def operand() -> torch.Tensor:
        return torch.randn(n, n, device=bench.handle)

    if dtype == "fp8":
        a = operand().to(torch.float8_e4m3fn)
        b = operand().to(torch.float8_e4m3fn).t()  # _scaled_mm wants its second operand column-major
        scale = torch.ones((), device=bench.handle)

        def scaled() -> object:
            return torch._scaled_mm(a, b, scale_a=scale, scale_b=scale, out_dtype=torch.bfloat16)

        return scaled
    kind = getattr(torch, dtype)
    x, y = operand().to(kind), operand().to(kind)

    def plain() -> object:
        return torch.matmul(x, y)

    return plain


def _matmul_cap(bench: Bench) -> int:
    """The largest n (a power of two) whose three operands fit MEMORY_SHARE of free memory, up to MATMUL_MAX
    (counted at 4 bytes an element whatever the dtype: operands start as float32 random numbers)."""
    room = bench.free_bytes() * MEMORY_SHARE / (3 * 4)
    n = MATMUL_START
    while n * 2 <= MATMUL_MAX[bench.kind] and (n * 2) ** 2 <= room:
        n *= 2
    return n


def matmul_tflops(bench: Bench, dtype: str, phase: Deadline) -> float:
    """Dense matmul TFLOPS (2n^3 a call) in `dtype`: n doubles from MATMUL_START while one call takes under STEP_S
    and the phase has time for the next size (8x the work) and a repetition, then the best repetition."""
    cap = _matmul_cap(bench)
    n = MATMUL_START
    call = _matmul_call(bench, dtype, n)
    seconds = bench.warm(call)
    while n < cap and seconds < STEP_S and phase.fits(seconds * 8 * 4):
        n *= 2
        del call
        call = _matmul_call(bench, dtype, n)
        seconds = bench.warm(call)
    return bench.best_rate(call, 2.0 * n**3, seconds, phase) / 1e12


def _figure(value: float) -> float:
    """Four significant figures: what the measurement resolves (and a CPU's 0.0004 TFLOPS stays positive)."""
    return float(f"{value:.4g}")


def _start(handle: "torch.device") -> None:
    """Bring the device up before the clock starts: CUDA's context and cuBLAS take a second or more the first time,
    which is start-up, not the card's speed."""
    import torch

    if handle.type == "cuda":
        torch.cuda.set_device(handle)
        torch.matmul(torch.ones(64, 64, device=handle), torch.ones(64, 64, device=handle))
        torch.cuda.synchronize(handle)


def _matmuls(bench: Bench, dtypes: Iterable[str], run: Deadline) -> dict[str, float]:
    """TFLOPS per dtype, each in an equal share of the time left; a dtype that fails on this device is skipped."""
    todo = [d for d in dtypes if supported(bench, d)]
    out: dict[str, float] = {}
    for i, dtype in enumerate(todo):
        if run.left() <= 0:
            break
        phase = Deadline(bench.clock, bench.clock() + run.left() / (len(todo) - i))
        try:
            out[dtype] = _figure(matmul_tflops(bench, dtype, phase))
        except (RuntimeError, TypeError, AttributeError) as exc:  # a kernel this build or card lacks
            log.debug("micro-benchmark: no %s matmul on %s: %s", dtype, bench.handle, exc)
    return out


def run(
    device: str = "cuda:0",
    budget_s: float = BUDGET_S,
    dtypes: Iterable[str] | None = None,
    *,
    clock: Clock = time.perf_counter,
) -> MeasuredFigures:
    """Measure `device` ("cuda:0", "cpu") within `budget_s`: copy bandwidth in the first share of the budget, then a
    matmul per dtype (default: GPU_DTYPES on a GPU, CPU_DTYPES on a CPU) that the device supports in equal shares
    of the rest. Raises RuntimeError where no bandwidth figure came out (a node then registers without figures:
    a zero would read as a card far slower than it claims)."""
    import torch

    handle = torch.device(device)
    if handle.type not in ("cuda", "cpu"):
        raise ValueError(f"the micro-benchmark runs on cuda or cpu devices, not {device!r}")
    _start(handle)
    bench = Bench(handle, clock)
    kinds = tuple(dtypes if dtypes is not None else (GPU_DTYPES if bench.kind == "cuda" else CPU_DTYPES))
    began = clock()
    total = Deadline(clock, began + budget_s)
    phases = 1 + sum(1 for d in kinds if supported(bench, d))
    try:
        bandwidth = bandwidth_gbs(bench, Deadline(clock, began + budget_s / phases))
        tflops = _matmuls(bench, kinds, total)
    finally:
        if handle.type == "cuda":
            torch.cuda.empty_cache()  # hand the buffers back to the engine
    if not (math.isfinite(bandwidth) and bandwidth > 0):
        raise RuntimeError(f"no memory bandwidth measured on {device}")
    return MeasuredFigures(
        bandwidth_gbs=_figure(bandwidth), tflops=tflops, seconds=round(clock() - began, 3), device=device
    )


def describe(figures: MeasuredFigures) -> str:
    """One log line's worth: "copy 2870 GB/s; float16 612 TFLOPS, float32 51.2 TFLOPS (2.91 s)"."""
    matmuls = ", ".join(f"{dtype} {value:g} TFLOPS" for dtype, value in figures.tflops.items())
    return f"copy {figures.bandwidth_gbs:g} GB/s; {matmuls or 'no matmul'} ({figures.seconds:g} s)"


def device_for_join(has_gpu: bool, env: Mapping[str, str] = os.environ) -> str | None:
    """The device to benchmark when the node joins, or None: the GPU where there is one, the CPU only when
    GRIDSERVE_MICROBENCH=1, nothing when it is 0."""
    setting = env.get(ENV, "").strip().lower()
    if setting in ("0", "false", "no", "off"):
        return None
    if has_gpu:
        return "cuda:0"
    return "cpu" if setting in ("1", "true", "yes", "on") else None


def _run_at_join(device: str, budget_s: float) -> MeasuredFigures | None:
    """The benchmark, or None where this node's torch cannot reach the device (an upstream engine's node may have
    no torch, or a CPU build of it)."""
    try:
        import torch
    except ImportError:
        log.info("no torch on this node: no micro-benchmark")
        return None
    if device.split(":", 1)[0] == "cuda" and not torch.cuda.is_available():
        log.info("torch sees no CUDA device: no micro-benchmark")
        return None
    return run(device, budget_s)


async def at_join(
    has_gpu: bool, budget_s: float = BUDGET_S, env: Mapping[str, str] = os.environ
) -> MeasuredFigures | None:
    """Run the benchmark for a joining node in a worker thread (the event loop keeps serving), logging one line;
    any failure logs a warning and gives None, and the node registers without measured figures."""
    device = device_for_join(has_gpu, env)
    if device is None:
        return None
    try:
        figures = await asyncio.to_thread(_run_at_join, device, budget_s)
    except Exception as exc:  # a benchmark must never keep a node from joining
        log.warning("micro-benchmark on %s failed (%s); registering without measured figures", device, exc)
        return None
    if figures is not None:
        log.info("micro-benchmark on %s: %s", device, describe(figures))
    return figures
