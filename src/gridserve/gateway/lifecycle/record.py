"""What a request leaves behind when it ends, the same for every path (whole-model node or pipeline of stages).

`Finished` is built once per request by the path that served it (`from_generation`, `from_pipeline`) and handed
to every subscriber of the lifecycle: the decision log, metrics, the reliability ledger and calibration,
settlement and audits, tracing. A subscriber never needs to know which path served the request.
"""

from dataclasses import dataclass, field
from typing import Any

from gridserve.types import GenerateRequest, NodeId, StreamEvent
from gridserve.types.scheduling import Decision


@dataclass(frozen=True)
class ReceiptInput:
    """What the gateway sent a whole-model node and received from it: a receipt is checked against this."""

    job: GenerateRequest
    ids: tuple[int, ...]
    final: StreamEvent
    unnamed: tuple[int, int] | None
    """(chunks, characters) of text the node sent without naming its tokens (an upstream server)."""
    text: str = ""
    """That text (an answer without token ids is compared by its text: gateway/integrity/redundancy.py)."""
    logprobs: tuple[tuple[float, tuple[float, ...]], ...] = ()
    """What the node claimed for each of `ids` when the request asked for log-probabilities: the token's and its
    alternatives' (audited)."""
    scored_tokens: tuple[str, ...] = ()
    """The tokens `logprobs` are for, as the node wrote them."""


@dataclass(frozen=True)
class NodeWork:
    """What one node did for a request: a segment of a whole-model generation, or a pipeline stage."""

    node_id: NodeId
    outcome: str
    """ok, failed, stalled or cancelled."""
    tokens: int
    """Completion tokens this node produced (a stage: the tokens generated while it was in the chain); of an
    embeddings answer, the input tokens it is paid for."""
    price_per_mtok: float | None
    """The price decided for this node's share of the request (None: unpriced)."""
    receipt: ReceiptInput | None = None
    """Set for whole-model segments that finished: their receipt is checked and may be audited."""
    layers: tuple[int, int] | None = None
    """A pipeline stage's layer range."""
    detail: str = ""
    embedded: bool = False
    """An embeddings answer: `tokens` are the input tokens the node embedded, its own count in the answer it signed
    up to what its inputs can hold (gateway/integrity/embeddings.py `most_tokens`), settled as receipted; none of
    them generated."""
    claimed: int | None = None
    """The tokens the node claimed where that differs from `tokens` (an embeddings count beyond what its inputs
    can hold): its settlement entry is disputed."""


@dataclass(frozen=True)
class Timing:
    """The request's latency as the gateway saw it, and where it was spent (None where not measured)."""

    ttft_s: float | None
    """Time to first token of the whole request (failovers included)."""
    itl_s: float | None
    """Mean inter-token latency on the node (or chain) that finished."""
    node_ttft_s: float | None = None
    """TTFT of the node (or chain) that finished, from its own start (equals ttft_s without failovers)."""
    fresh_ttft_s: float | None = None
    """TTFT of the finishing node when it did not resume another node's work (for calibration)."""
    split: dict[str, float | None] = field(default_factory=dict)
    """network_s, queue_s, prefill_s, decode_s of the finishing segment (whole-model nodes report them)."""

    @property
    def finishing_ttft_s(self) -> float:
        return self.node_ttft_s if self.node_ttft_s is not None else self.ttft_s or 0.0

    def as_dict(self) -> dict[str, Any]:
        out = {k: (None if v is None else round(v, 6)) for k, v in self.split.items()}
        out["ttft_s"] = None if self.ttft_s is None else round(self.ttft_s, 6)
        out["itl_s"] = None if self.itl_s is None else round(self.itl_s, 6)
        return out


@dataclass(frozen=True)
class Finished:
    """A request's end, whatever served it."""

    decision: Decision
    endpoint: str
    """chat or text."""
    status: str
    """ok, failed or cancelled."""
    error: str
    served_by: str
    """The node that finished the answer, or the pipeline candidate's id."""
    work: tuple[NodeWork, ...]
    prompt_tokens: int
    completion_tokens: int
    duration_s: float
    timing: Timing
    failovers: int = 0
    hedged: bool = False
    pipeline: bool = False
    cached_tokens: int = 0
    """Prompt tokens the finishing node says it took from its prefix cache (in its own tokens)."""
    log_fields: dict[str, Any] = field(default_factory=dict)
    """Path-specific fields for the decision log (route, chain, re-plans)."""

    @property
    def finishing(self) -> NodeWork | None:
        """The node whose work ended the answer (the last segment; for a pipeline, None: every stage did)."""
        return None if self.pipeline or not self.work else self.work[-1]


@dataclass(frozen=True)
class Settled:
    """The receipts' verdict on a finished request: problems found and the settlement entries to store."""

    problems: tuple[str, ...] = ()
    entries: tuple[dict[str, Any], ...] = ()


__all__ = ["Finished", "NodeWork", "ReceiptInput", "Settled", "Timing"]
