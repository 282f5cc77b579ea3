"""The latency doctor's view of finished requests: a trace each (the request's time split into network, queue,
prefill and decode), kept in a ring. Written by the request lifecycle (gateway/lifecycle/subscribers.py)."""

from collections import deque
from dataclasses import dataclass
from typing import Any

from gridserve.gateway.dispatch.generation import Segment


@dataclass(frozen=True)
class RequestTrace:
    """One finished request as the doctor sees it. Times in seconds; None where not measured."""

    at: float
    decision_id: str
    request_id: str
    model: str
    node_id: str
    status: str
    ttft_s: float
    network_s: float | None
    queue_s: float | None
    prefill_s: float | None
    decode_s: float | None
    itl_s: float | None
    predicted_ttft_s: float | None
    predicted_itl_s: float | None
    failovers: int
    hedged: bool
    error: str = ""
    prompt_tokens: int = 0
    """As the node counted them."""
    cached_tokens: int = 0
    """Prompt tokens the node said it took from its prefix cache (its own count)."""
    prompt_estimate: int = 0
    """The gateway's estimate of the prompt's tokens (what its prefix index counts in)."""
    expected_cached_tokens: int = 0
    """Prompt tokens the gateway's prefix index expected the node to hold (of `prompt_estimate`)."""

    def as_dict(self) -> dict[str, Any]:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in self.__dict__.items()}


class Traces:
    """The recent request traces (a ring)."""

    def __init__(self, capacity: int = 2048) -> None:
        self.items: deque[RequestTrace] = deque(maxlen=capacity)

    def add(self, trace: RequestTrace) -> None:
        self.items.append(trace)

    def for_node(self, node_id: str, since: float = 0.0) -> list[RequestTrace]:
        return [t for t in self.items if t.node_id == node_id and t.at >= since]


def segment_split(segment: Segment) -> dict[str, float | None]:
    """Network / queue / prefill / decode of a segment, from the gateway's clock and the node's own timings."""
    ttft = segment.first_at - segment.started
    final = segment.final
    if "prefill_s" not in final:
        return {"network_s": None, "queue_s": None, "prefill_s": None, "decode_s": segment.last_at - segment.first_at}
    queue, prefill = float(final.get("queue_s", 0.0)), float(final["prefill_s"])
    return {
        "network_s": max(0.0, ttft - queue - prefill),
        "queue_s": queue,
        "prefill_s": prefill,
        "decode_s": segment.last_at - segment.first_at,
    }
