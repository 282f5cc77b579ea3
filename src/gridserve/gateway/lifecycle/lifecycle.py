"""One request lifecycle for every serving path: decided, opened (or not), failed over, finished.

The API calls these hooks in order; the subscribers (decision log, metrics, ledger and calibration, settlement
and audits, tracing) do the rest. A whole-model request and a pipeline request pass through the same hooks,
so they are logged, measured, recorded in the ledger and settled alike.
"""

import logging
import time
from collections.abc import Sequence
from typing import Any

from gridserve.gateway.integrity.receipts import ReceiptChecker
from gridserve.gateway.lifecycle.record import Finished, Settled
from gridserve.gateway.lifecycle.subscribers import Scope, Settlement, Subscriber
from gridserve.types.scheduling import Decision

log = logging.getLogger("gridserve.gateway")


class Lifecycle:
    def __init__(self, settlement: Settlement, receipts: ReceiptChecker, subscribers: Sequence[Subscriber]) -> None:
        self.settlement = settlement
        self.receipts = receipts
        self.subscribers = list(subscribers)

    def begin(self, endpoint: str) -> Scope:
        return Scope(endpoint)

    def decided(self, scope: Scope, decision: Decision) -> None:
        scope.decided_at = time.monotonic()
        for sub in self.subscribers:
            _safely(sub.decided, scope, decision)

    def not_opened(self, scope: Scope, decision: Decision | None, error: str) -> None:
        for sub in self.subscribers:
            _safely(sub.not_opened, scope, decision, error)

    def opened(self, scope: Scope, decision: Decision, served_by: str, **fields: Any) -> None:
        for sub in self.subscribers:
            _safely(sub.opened, scope, decision, served_by, fields)

    def failover(self, scope: Scope, node_id: str, detail: str) -> None:
        for sub in self.subscribers:
            _safely(sub.failover, scope, node_id, detail)

    def finished(self, scope: Scope, end: Finished) -> Settled:
        """Every subscriber learns how the request ended; returns the settlement to store (`commit`)."""
        try:
            settled = self.settlement.settle(end)
        except Exception:  # a bug here must not lose the answer: logged, the request still ends
            log.exception("settling %s failed", end.decision.request_id)
            settled = Settled()
        for sub in self.subscribers:
            _safely(sub.finished, scope, end, settled)
        log.info(
            "finished %s: %s (%d failovers)",
            end.decision.request_id,
            end.status,
            end.failovers,
            extra={
                "request_id": end.decision.request_id,
                "decision_id": end.decision.decision_id,
                "node_id": end.served_by,
                "status": end.status,
                "failovers": end.failovers,
                "error": end.error or None,
            },
        )
        return settled

    async def commit(self, end: Finished, settled: Settled) -> None:
        """Store the settlement: awaited for an answer that finished (it ends only once its tokens are settled),
        in the background otherwise (no answer to hold back)."""
        entries = list(settled.entries)
        if end.status == "ok":
            await self.receipts.commit(entries)
        else:
            self.receipts.write(entries)


def _safely(hook: Any, *args: Any) -> None:
    try:
        hook(*args)
    except Exception:
        log.exception("lifecycle subscriber %s failed", getattr(hook, "__qualname__", hook))


__all__ = ["Lifecycle", "Scope"]
