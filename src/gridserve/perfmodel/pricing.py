"""Prices per million generated tokens, derived from what the hardware costs to run and how fast it serves.

derived = cost_per_hour / (tokens per hour at a full batch) x 1e6 x MARGIN. An operator may set their own
price within [MIN_OVERRIDE, MAX_OVERRIDE] x derived; outside that band it is clamped (and the decision says so).
"""

from gridserve.catalog.hardware import HardwareSpec
from gridserve.catalog.models import ModelSpec
from gridserve.perfmodel.roofline import base_itl_s, moe_factor, moe_terms

MARGIN = 1.3
"""Operator margin over running cost (power, wear, idle time)."""
MIN_OVERRIDE, MAX_OVERRIDE = 0.5, 2.0


def derived_price_per_mtok(model: ModelSpec, hw: HardwareSpec, dtype: str, quantization: str) -> float:
    """A full batch's tokens: a mixture of experts' full batch reads more of its experts than one sequence does
    (`roofline.moe_factor`; 1 for a dense model)."""
    slots = max(1, hw.batch_slots)
    itl = base_itl_s(model, hw, dtype, quantization) * float(moe_factor(float(slots), *moe_terms(model)))
    tokens_per_s = slots / itl
    return hw.cost_per_hour / (tokens_per_s * 3600.0) * 1e6 * MARGIN


def effective_price_per_mtok(derived: float, operator_price: float) -> float:
    """The operator's price clamped to the band around the derived one; 0 means 'use the derived price'."""
    if operator_price <= 0.0:
        return derived
    return min(max(operator_price, derived * MIN_OVERRIDE), derived * MAX_OVERRIDE)
