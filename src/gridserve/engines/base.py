"""The engine protocol.

An engine turns a `GenerateRequest` into an async stream of `TokenEvent`s; the last event carries the
finish reason and the token counts. Greedy (temperature 0) and seeded sampling are deterministic.

Pipeline stages: a local engine is built over a model and a half-open layer range `[start, end)`; the
full model is the range `[0, layers)`. Only full-range engines are served today.
"""

import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol

from gridserve.types import GenerateRequest, HardwareInfo, ModelOffer, NodeError, TokenEvent
from gridserve.types.node import ErrorKind


class EngineError(Exception):
    """The engine failed while generating (a node-side fault)."""


class InvalidRequest(EngineError):
    """The request cannot be run as given (client fault): e.g. the prompt plus max_tokens exceed the context."""


DEFAULT_PREFIX_CACHE_MB = 512
"""The local engines' prefix cache budget by default (`gridserve node --prefix-cache-mb`; engines/prefix_cache.py)."""

RATE_WINDOW_S = 10.0
"""`tokens_per_s` is the rate over this many seconds."""
RATE_RESOLUTION_S = 0.01
"""Tokens noted within this long of the previous entry join it: at most window / resolution entries are kept."""


@dataclass
class EngineStats:
    active: int = 0
    queued: int = 0
    tokens_total: int = 0
    recent_tokens: deque[tuple[float, int]] = field(default_factory=deque)
    """(monotonic time, tokens) of the last RATE_WINDOW_S, oldest first."""
    errors: list[NodeError] = field(default_factory=list)
    decode_throttle: float = 1.0
    """Decode runs this many times slower than it could (fault injection: node/faults.py); engines apply it."""
    steps: int | None = None
    """Compute steps the engine has run (a prefill chunk or a decode step of any stream), for an engine that
    steps its streams itself (None: one that cannot tell, such as an upstream server). A stream waiting on
    other streams' steps is busy, not stalled: the node says so on the stream (node/app.py)."""

    def note_tokens(self, now: float, count: int) -> None:
        """`count` tokens made at `now` (time.monotonic())."""
        self.tokens_total += count
        recent = self.recent_tokens
        if recent and now - recent[-1][0] < RATE_RESOLUTION_S:
            recent[-1] = (recent[-1][0], recent[-1][1] + count)
        else:
            recent.append((now, count))
        self._prune(now)

    def _prune(self, now: float) -> None:
        horizon = now - RATE_WINDOW_S
        while self.recent_tokens and self.recent_tokens[0][0] < horizon:
            self.recent_tokens.popleft()

    def tokens_per_s(self, now: float) -> float:
        self._prune(now)
        return sum(c for _, c in self.recent_tokens) / RATE_WINDOW_S

    def note_error(self, message: str, kind: ErrorKind | None = None) -> None:
        self.errors.append(NodeError(at=time.time(), kind=kind or classify_error(message), message=message[:300]))
        del self.errors[:-20]


def classify_error(message: str) -> ErrorKind:
    """The kind of an engine error from its message (the words PyTorch, CUDA and llama.cpp use)."""
    low = message.lower()
    if "out of memory" in low or "oom" in low.split() or "cuda_error_out_of_memory" in low:
        return "oom"
    if "cuda" in low or "cublas" in low or "nccl" in low or "xid" in low:
        return "cuda"
    if "timeout" in low or "timed out" in low:
        return "timeout"
    if "refused" in low:
        return "refused"
    return "engine"


class LocalEngine:
    """What the local (torch) engines share: their kind and their stats."""

    _kind: str
    _stats: EngineStats

    @property
    def kind(self) -> str:
        return self._kind

    @property
    def stats(self) -> EngineStats:
        return self._stats


class Engine(Protocol):
    @property
    def kind(self) -> str: ...

    @property
    def stats(self) -> EngineStats: ...

    def offers(self) -> tuple[ModelOffer, ...]:
        """The models this engine serves (resident)."""
        ...

    def loadable(self) -> tuple[str, ...]:
        """Models this engine can load when asked (on disk, not resident: a cold first token)."""
        ...

    async def load(self, model: str) -> None:
        """Make `model` resident; InvalidRequest if this engine cannot load it."""
        ...

    def advertised_hardware(self) -> HardwareInfo | None:
        """Hardware to advertise instead of the detected one (emulated engines), else None."""
        ...

    async def start(self) -> None:
        """Load weights / connect; called once before serving."""
        ...

    def generate(self, request: GenerateRequest) -> AsyncIterator[TokenEvent]: ...

    async def aclose(self) -> None: ...
