"""Where an emulated card places a model: the widest (dtype, quantization) whose weights fit with room left for
the KV cache. Shared by the emulated engine and the simulator (sim/cards.py, sim/grid.py), without the engine's
torch text source: `gridserve simulate` and `gridserve plan` start without importing torch."""

from gridserve.catalog import HardwareSpec, ModelSpec
from gridserve.engines.base import EngineError

PLACEMENTS = (("float16", "none"), ("float16", "q8_0"), ("float16", "q4_k_m"))
"""The (dtype, quantization) an emulated card places a model at, widest first (sim/cards.py explains with them)."""
KV_RESERVE = 0.1
"""Share of device memory kept free for KV cache and activations when choosing a quantization."""


class EmulationError(EngineError):
    pass


def placement_for(model: ModelSpec, hw: HardwareSpec) -> tuple[str, str]:
    """The widest (dtype, quantization) whose weights fit in the device with a KV reserve."""
    budget = hw.memory_gib * 2**30 * (1 - KV_RESERVE)
    for dtype, quant in PLACEMENTS:
        if model.weight_bytes(dtype, quant) <= budget:
            return dtype, quant
    need = model.weight_bytes(*PLACEMENTS[-1]) / 2**30
    raise EmulationError(
        f"{model.name} does not fit on {hw.name}: needs {need:.1f} GiB even at q4_k_m, has {hw.memory_gib:.0f} GiB"
    )
