"""A node's pipeline-stage engine: one layer range of a model, a KV cache per session, steps run in order.

The node serves it over a long-lived, gateway-signed connection (node/stage_link.py); the gateway drives
every step (gateway/pipeline/session.py). A stage is not a whole model: `generate` refuses, and its offer names its
layers, so the scheduler never routes a whole request to it.
"""

import asyncio
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from gridserve.engines.base import EngineError, EngineStats, InvalidRequest, LocalEngine
from gridserve.engines.stage import StageModule, StageSpan
from gridserve.types import GenerateRequest, HardwareInfo, LayerRange, ModelOffer, TokenEvent


@dataclass(frozen=True)
class StepResult:
    array: npt.NDArray[Any] | None
    """Hidden states `[1, n, hidden]`, or the last position's logits `[1, vocab]` on the last stage (None for
    a replayed step: its output is already downstream)."""
    compute_s: float


class StageEngine(LocalEngine):
    """Runs `[start, end)` of `offer.name` on a dedicated thread (fixed torch thread count: reproducible).

    Started without a span (`gridserve node --layers auto`), the node offers to run any range of the model and
    the gateway assigns one from its plan (`assign`); a later assignment replaces the span."""

    def __init__(
        self,
        *,
        kind: str,
        offer: ModelOffer,
        span: StageSpan | None,
        n_layers: int,
        loader: Callable[[int, int], StageModule],
        threads: int,
        max_sessions: int = 64,
    ) -> None:
        self._kind = kind
        self._span = span
        self.n_layers = n_layers
        self.assignable = span is None
        """Started with `--layers auto`: the gateway's planner chooses (and may change) the span."""
        self._base_offer = offer
        self._offer = offer
        self._loader = loader
        self._threads = threads
        self._module: StageModule | None = None
        self._caches: OrderedDict[str, Any] = OrderedDict()
        self._max_sessions = max_sessions
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"stage-{kind}", initializer=self._init)
        self._stats = EngineStats()
        self._assigning = asyncio.Lock()

    def _init(self) -> None:
        torch.set_num_threads(self._threads)

    @property
    def span(self) -> StageSpan:
        if self._span is None:
            raise EngineError("no layers assigned to this stage yet")
        return self._span

    @property
    def model(self) -> str:
        return self._base_offer.name

    def offers(self) -> tuple[ModelOffer, ...]:
        return (self._offer,) if self._module is not None else ()

    def stage_models(self) -> tuple[str, ...]:
        """Models of which the gateway may assign this node any layer range."""
        return (self._base_offer.name,) if self.assignable else ()

    def loadable(self) -> tuple[str, ...]:
        return ()

    async def load(self, model: str) -> None:
        raise InvalidRequest(f"this node runs a layer range of {self._base_offer.name}; it loads nothing else")

    def advertised_hardware(self) -> HardwareInfo | None:
        return None

    async def start(self) -> None:
        if self._span is not None:
            await self.assign(self._span.start, self._span.end)

    async def assign(self, start: int, end: int) -> None:
        """Load layers `[start, end)` (InvalidRequest for a range the model does not have); sessions of the
        previous span are dropped."""
        try:
            span = StageSpan(start, end, self.n_layers)
        except ValueError as exc:
            raise InvalidRequest(f"layers [{start}, {end}): {exc}") from None
        async with self._assigning:
            if self._module is not None and self._span == span:
                return
            module = await asyncio.get_running_loop().run_in_executor(self._pool, self._load, start, end)
            self._caches.clear()
            self._stats.active = 0
            self._module, self._span = module, span
            self._offer = self._base_offer.model_copy(update={"layers": LayerRange(start=start, end=end)})

    def _load(self, start: int, end: int) -> StageModule:
        module = self._loader(start, end)
        module.eval()
        return module

    async def aclose(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def generate(self, request: GenerateRequest) -> AsyncIterator[TokenEvent]:
        raise InvalidRequest(
            f"this node runs a layer range of {self._base_offer.name} (a pipeline stage), not whole requests"
        )

    # -- sessions ---------------------------------------------------------------------------------------
    def open(self, session: str) -> None:
        """A fresh KV cache for `session` (the least recently used one is dropped past `max_sessions`)."""
        module = self._require()
        self._caches[session] = module.new_cache()
        while len(self._caches) > self._max_sessions:
            self._caches.popitem(last=False)
        self._stats.active = len(self._caches)

    def close(self, session: str) -> None:
        self._caches.pop(session, None)
        self._stats.active = len(self._caches)

    async def step(self, session: str, inputs: npt.NDArray[Any], *, replay: bool = False) -> StepResult:
        """Run the stage on `inputs` (token ids `[1, n]` on the first stage, else hidden states)."""
        if session not in self._caches:
            raise InvalidRequest(f"no open session {session!r} on this stage")
        expected = 2 if self.span.first else 3
        if inputs.ndim != expected or inputs.shape[0] != 1 or inputs.shape[1] < 1:
            raise InvalidRequest(f"stage {self.span} takes a [1, n{'' if self.span.first else ', hidden'}] tensor")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self._run, session, inputs, replay)

    def _run(self, session: str, inputs: npt.NDArray[Any], replay: bool) -> StepResult:
        module = self._require()
        cache = self._caches.get(session)
        if cache is None:
            raise InvalidRequest(f"session {session!r} was closed")
        started = time.perf_counter()
        with torch.inference_mode():
            tensor = torch.from_numpy(np.array(inputs))  # a writable copy of the frame's buffer
            if self.span.first:
                tensor = tensor.long()
            try:
                out = module(tensor, cache)
            except (RuntimeError, IndexError) as exc:
                self._stats.note_error(f"stage forward: {exc}")
                raise EngineError(f"stage forward failed: {exc}") from exc
            array = None if replay else (out[0, -1:] if self.span.last else out).numpy()
        self._stats.note_tokens(time.monotonic(), int(inputs.shape[1]))
        return StepResult(array, time.perf_counter() - started)

    def _require(self) -> StageModule:
        if self._module is None:
            raise EngineError("stage not loaded yet")
        return self._module
