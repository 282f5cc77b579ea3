"""Hardware and model facts, as data. Logic reads these; it never branches on names."""

from gridserve.catalog.hardware import HARDWARE, HardwareSpec, hardware_spec
from gridserve.catalog.models import MODELS, ModelSpec, model_spec

__all__ = ["HARDWARE", "MODELS", "HardwareSpec", "ModelSpec", "hardware_spec", "model_spec"]
