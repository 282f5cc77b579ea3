"""`emulated:<hardware>`: a catalogue model served with the timings that hardware would give it.

TTFT and ITL come from `perfmodel` (bandwidth-bound decode, compute-bound prefill, from the catalogue's
cited spec figures), or are fixed by the operator for benchmarks. The text comes from the tiny model.
The node advertises the emulated hardware with `emulated: true`; models a real engine serves are refused.
"""

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from gridserve.catalog import HardwareSpec, ModelSpec, hardware_spec, model_spec
from gridserve.engines.base import EngineError, EngineStats, InvalidRequest
from gridserve.engines.torch_engine import TorchEngine
from gridserve.perfmodel import Load, predict
from gridserve.types import GenerateRequest, HardwareInfo, ModelOffer, TokenEvent

log = logging.getLogger("gridserve.node")
_PLACEMENTS = (("float16", "none"), ("float16", "q8_0"), ("float16", "q4_k_m"))
TEXT_PROMPT_CHARS = 1024
TEXT_MAX_TOKENS = 2048
"""The tiny text source sees at most the last 1,024 characters of each message and writes at most
2,048 tokens; timings and context checks use the emulated model's own figures."""
KV_RESERVE = 0.1
"""Share of device memory kept free for KV cache and activations when choosing a quantization."""


class EmulationError(EngineError):
    pass


@dataclass(frozen=True, kw_only=True)
class FixedTimings:
    ttft_s: float
    itl_s: float


def placement_for(model: ModelSpec, hw: HardwareSpec) -> tuple[str, str]:
    """The widest (dtype, quantization) whose weights fit in the device with a KV reserve."""
    budget = hw.memory_gib * 2**30 * (1 - KV_RESERVE)
    for dtype, quant in _PLACEMENTS:
        if model.weight_bytes(dtype, quant) <= budget:
            return dtype, quant
    need = model.weight_bytes(*_PLACEMENTS[-1]) / 2**30
    raise EmulationError(
        f"{model.name} does not fit on {hw.name}: needs {need:.1f} GiB even at q4_k_m, has {hw.memory_gib:.0f} GiB"
    )


def _placement_or_smallest(model: ModelSpec, hw: HardwareSpec) -> tuple[str, str]:
    """An operator may advertise a model the card cannot hold; the scheduler's memory filter must catch it."""
    try:
        return placement_for(model, hw)
    except EmulationError as exc:
        log.warning("%s; advertising it anyway at the smallest quantization", exc)
        return _PLACEMENTS[-1]


class EmulatedEngine:
    def __init__(
        self,
        *,
        hardware: str,
        models: Sequence[str],
        text_engine: TorchEngine,
        fixed: FixedTimings | None = None,
        slowdown: float = 1.0,
    ) -> None:
        """`slowdown` > 1 emulates a node slower than its spec (thermal throttling, a weak host) without saying
        so in its telemetry: only observed timings reveal it."""
        self.hw = hardware_spec(hardware)
        self._models: dict[str, tuple[ModelSpec, str, str]] = {}
        for name in models:
            spec = model_spec(name)
            if spec.real_engine:
                raise EmulationError(f"{name} is served by a real engine; an emulated node may not claim it")
            self._models[name] = (spec, *_placement_or_smallest(spec, self.hw))
        if not self._models:
            raise EmulationError("an emulated engine needs at least one catalogue model")
        self._slowdown = slowdown
        self._text = text_engine
        self._fixed = fixed
        self._stats = EngineStats()
        self._cache: OrderedDict[str, tuple[TokenEvent, ...]] = OrderedDict()

    @property
    def kind(self) -> str:
        return f"emulated:{self.hw.key}"

    @property
    def stats(self) -> EngineStats:
        return self._stats

    def offers(self) -> tuple[ModelOffer, ...]:
        return tuple(
            ModelOffer(
                name=name,
                dtype=dtype,
                quantization=quant,
                max_context=spec.max_context,
                weights_digest=f"emulated:{name}",
            )
            for name, (spec, dtype, quant) in self._models.items()
        )

    def advertised_hardware(self) -> HardwareInfo:
        return HardwareInfo(
            accelerator=self.hw.key,
            emulated=True,
            memory_bytes=int(self.hw.memory_gib * 2**30),
        )

    async def start(self) -> None:
        await self._text.start()

    def telemetry_override(self) -> dict[str, float | int]:
        """Telemetry of the emulated device: its memory (resident weights + KV of active requests), busy share."""
        weights = sum(spec.weight_bytes(dtype, quant) for spec, dtype, quant in self._models.values())
        spec = next(iter(self._models.values()))[0]
        kv = self._stats.active * 2048 * spec.kv_bytes_per_token()
        total = int(self.hw.memory_gib * 2**30)
        return {
            "memory_total_bytes": total,
            "memory_used_bytes": min(total, int(weights + kv)),
            "utilization": min(1.0, self._stats.active / max(1, self.hw.batch_slots)),
        }

    async def aclose(self) -> None:
        await self._text.aclose()

    async def _text_events(self, request: GenerateRequest) -> tuple[TokenEvent, ...]:
        deterministic = request.sampling.temperature == 0.0 or request.sampling.seed is not None
        key = request.model_copy(update={"request_id": ""}).model_dump_json()
        if deterministic and key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        events = tuple([ev async for ev in self._text.generate(request)])
        if deterministic:
            self._cache[key] = events
            while len(self._cache) > 512:
                self._cache.popitem(last=False)
        return events

    def _text_request(self, request: GenerateRequest) -> GenerateRequest:
        """The tiny model's context is short: clip the prompt's head and cap the output it must write."""
        clip = TEXT_PROMPT_CHARS
        update: dict[str, object] = {
            "model": self._text.offers()[0].name,
            "sampling": request.sampling.model_copy(
                update={"max_tokens": min(request.sampling.max_tokens, TEXT_MAX_TOKENS)}
            ),
        }
        if request.prompt is not None:
            update["prompt"] = request.prompt[-clip:]
        if request.messages is not None:
            update["messages"] = tuple(
                m.model_copy(update={"content": m.content[-clip:]}) for m in request.messages[-4:]
            )
        return request.model_copy(update=update)

    def _timings(self, model: str, prompt_tokens: int) -> tuple[float, float]:
        if self._fixed is not None:
            return self._fixed.ttft_s, self._fixed.itl_s
        spec, dtype, quant = self._models[model]
        others = max(0, self._stats.active - 1)
        pred = predict(
            spec, self.hw, prompt_tokens=prompt_tokens, dtype=dtype, quantization=quant, load=Load(active=others)
        )
        return pred.ttft_s * self._slowdown, pred.itl_s * self._slowdown

    async def generate(self, request: GenerateRequest) -> AsyncIterator[TokenEvent]:
        if request.model not in self._models:
            raise InvalidRequest(f"model {request.model!r} is not served here")
        limit = self._models[request.model][0].max_context
        if request.sampling.max_tokens > limit:
            raise InvalidRequest(
                f"max_tokens ({request.sampling.max_tokens}) exceeds the model's context of {limit} tokens"
            )
        start = time.monotonic()
        self._stats.active += 1
        try:
            events = await self._text_events(self._text_request(request))
            ttft, itl = self._timings(request.model, events[-1].prompt_tokens)
            for i, event in enumerate(events):
                delay = start + ttft + i * itl - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                self._stats.note_tokens(time.monotonic(), 1)
                yield event
        finally:
            self._stats.active -= 1
