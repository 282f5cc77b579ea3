"""Rules the gateway serves by and the simulator replays: dispatch (hedging, first-token and stall timeouts,
failovers, retry budget), failure detection and audit rates. Imports nothing from the gateway package, so the
simulator runs the gateway's own numbers without depending on the gateway."""

from gridserve.policy.audit import AuditRates
from gridserve.policy.dispatch import DispatchPolicy
from gridserve.policy.health import HealthTiming

__all__ = ["AuditRates", "DispatchPolicy", "HealthTiming"]
