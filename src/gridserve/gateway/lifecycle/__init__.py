"""One request lifecycle for whole-model and pipeline requests: hooks in order (decided, opened or not, failed
over, finished) and the subscribers that own each consequence (decision log, metrics, ledger and calibration,
settlement and audits, tracing)."""

from gridserve.gateway.lifecycle.builders import from_generation, from_pipeline
from gridserve.gateway.lifecycle.lifecycle import Lifecycle
from gridserve.gateway.lifecycle.record import Finished, NodeWork, ReceiptInput, Settled, Timing
from gridserve.gateway.lifecycle.subscribers import (
    DecisionLogSubscriber,
    LedgerSubscriber,
    MetricsSubscriber,
    Scope,
    Settlement,
    Subscriber,
)

__all__ = [
    "DecisionLogSubscriber",
    "Finished",
    "LedgerSubscriber",
    "Lifecycle",
    "MetricsSubscriber",
    "NodeWork",
    "ReceiptInput",
    "Scope",
    "Settled",
    "Settlement",
    "Subscriber",
    "Timing",
    "from_generation",
    "from_pipeline",
]
