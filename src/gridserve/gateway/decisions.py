"""The decision log: every served request's decision and outcome, in memory (recent) and in the store."""

import time
from collections import OrderedDict
from typing import Any

from gridserve.store import StoreWriter
from gridserve.types.scheduling import Decision


TERMINAL = frozenset({"ok", "failed"})


class DecisionLog:
    def __init__(self, writer: StoreWriter, capacity: int) -> None:
        self.writer = writer
        self.capacity = capacity
        self._recent: OrderedDict[str, dict[str, Any]] = OrderedDict()

    def record(self, decision: Decision, *, status: str, **outcome: Any) -> dict[str, Any]:
        data = self._recent.get(decision.decision_id) or decision.model_dump(mode="json")
        data.update(outcome)
        data["status"] = status
        self._recent[decision.decision_id] = data
        self._recent.move_to_end(decision.decision_id)
        while len(self._recent) > self.capacity:
            self._recent.popitem(last=False)
        if status not in TERMINAL:
            return data  # in-flight states stay in memory; the store gets the outcome, off the hot path
        self.writer.submit(
            self.writer.store.record_decision,
            decision.decision_id,
            request_id=decision.request_id,
            model=decision.model,
            node_id=data.get("served_by"),
            status=status,
            data=dict(data),
            at=time.time(),
        )
        return data

    def get(self, decision_id: str) -> dict[str, Any] | None:
        found = self._recent.get(decision_id)
        if found is not None:
            return found
        stored = self.writer.store.get_decision(decision_id)
        return None if stored is None else dict(stored["data"])
