"""How much of a node's work is re-executed by the verifier (the rule is trust/audit_policy.py); the gateway's
auditor and the simulator read the same rates."""

from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class AuditRates:
    rate: float = 0.05
    """Share of an established, fully reliable node's completions re-executed by the verifier."""
    new_rate: float = 0.5
    """Audit share for nodes with little history."""
    floor: float = 0.01


__all__ = ["AuditRates"]
