"""`emulated:<hardware>`: a catalogue model served with the timings that hardware would give it.

TTFT and ITL come from `perfmodel` (bandwidth-bound decode, compute-bound prefill, from the catalogue's
cited spec figures), or are fixed by the operator for benchmarks. The text comes from the tiny model.

Tokens are counted as the emulated model's tokenizer would count them, not as the tiny model's byte tokenizer
does (one per character, about 2.5x a client's count): the prompt with `tokencount` (Llama 3's pre-tokenizer and
calibrated piece lengths, within a few percent of Llama 3's and Gemma 3's counts on English text), and the answer
in the emulated model's vocabulary: each token the tiny model picks is spelled as a common English word, one token
in Llama 3's, Gemma 3's and `tokencount`'s counts alike (`spell`), so a client that counts the answer's tokens
itself counts what `usage` says, and each token is paced at the emulated ITL. An answer held to a response format
(JSON, tool calls) must be the tiny model's own characters: there each token is still one character.

A prefix cache is emulated as a serving engine's would be (vLLM's automatic prefix caching): the KV room the card
has beyond the weights holds the blocks of recent prompts (`PREFIX_BLOCK_TOKENS` of the prompt's counted tokens,
chain-hashed), least recently used out; a prompt's prefill is timed on the tokens not already held, and its last
event reports the rest as `cached_tokens`.
The node advertises the emulated hardware with `emulated: true`; models a real engine serves are refused.
"""

import asyncio
import contextlib
import logging
import time
import zlib
from collections import OrderedDict
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass

from gridserve.catalog import HardwareSpec, ModelSpec, hardware_spec, model_spec
from gridserve.catalog.derive import COPY_REACH, MATMUL_DTYPES, MATMUL_REACH, derive_card
from gridserve.catalog.spec import TYPICAL_SEQUENCE_TOKENS
from gridserve.engines import tokencount
from gridserve.engines.base import EngineStats, InvalidRequest
from gridserve.engines.placement import PLACEMENTS, EmulationError, placement_for
from gridserve.engines.text import StopMatcher
from gridserve.engines.tiny import OFFSET
from gridserve.engines.torch_engine import TorchEngine
from gridserve.perfmodel import Load, predict
from gridserve.prefix import PrefixIndex
from gridserve.types import (
    ChatMessage,
    DeviceFigures,
    GenerateRequest,
    HardwareInfo,
    MeasuredFigures,
    ModelOffer,
    TokenEvent,
)
from gridserve.types.wire import LOGPROBS_FEATURE, SAMPLING_FEATURES, TokenLogprob, TopLogprob

log = logging.getLogger("gridserve.node")
TEXT_PROMPT_CHARS = 1024
TEXT_MAX_TOKENS = 2048
"""The tiny text source sees at most the last 1,024 characters of the prompt (of the last messages, together)
and writes at most 2,048 tokens at once (its context is 4,096): a longer plain-text answer goes on in rounds
(`EmulatedEngine._round`), one held to a response format ends there. Timings and context checks use the emulated
model's own figures."""


PREFIX_BLOCK_TOKENS = 32
"""Tokens per emulated prefix-cache block."""


_WORD_LIST = (
    "the of and to in is that for it as with was on be at by this have from or one had not but what all were "
    "when we can an your said if do will each how up out them then she many some so into has more her two like "
    "him see time no make than been its who now my made over did down only way find use may long very just most "
    "know get back much go good new our me man too any day same look also came come work word"
)
WORDS = tuple(_WORD_LIST.split())
"""The emulated vocabulary's words: each, with its leading space, one token in Llama 3's and Gemma 3's tokenizers
and in `tokencount` (tests check all three), and never merged with the next (a space starts every one)."""
_WRITTEN = (ord("\n"), *range(32, 127))
"""The bytes the tiny model writes (tiny.py's logit mask): one word each."""
_SPELLING = {OFFSET + byte: f" {word}" for byte, word in zip(_WRITTEN, WORDS, strict=True)}


def spell(token: int) -> str:
    """A tiny-model token as the emulated model's: a word (the end-of-sequence token has no text)."""
    return _SPELLING.get(token, "")


def prompt_ids(request: GenerateRequest) -> list[int]:
    """The prompt's tokens as the emulated model counts them (`tokencount`), each named by a stable id: what its
    prefill is timed on and what the prefix cache holds."""
    if request.messages is not None:
        pieces = tokencount.chat_tokens(request.messages)
    else:
        pieces = tokencount.prompt_tokens(request.prompt or "")
    return [zlib.crc32(piece.encode("utf-8", "surrogatepass")) & 0x7FFFFFFF for piece in pieces]


class EmulatedPrefixCache:
    """Which prompt blocks the emulated card's KV cache holds: one node's share of a PrefixIndex."""

    def __init__(self, capacity_tokens: int) -> None:
        self.capacity_tokens = capacity_tokens
        self._index = PrefixIndex(default_capacity=capacity_tokens // PREFIX_BLOCK_TOKENS)

    def reuse(self, model: str, ids: Sequence[int]) -> int:
        """Prompt tokens of `ids` already held (whole blocks, at most all but the last token); the prompt's blocks
        are then held, most recently used."""
        blocks: list[int] = []
        h = hash(model)
        for start in range(0, len(ids) - PREFIX_BLOCK_TOKENS + 1, PREFIX_BLOCK_TOKENS):
            h = hash((h, tuple(ids[start : start + PREFIX_BLOCK_TOKENS])))
            blocks.append(h)
        held = self._index.match(blocks).get("", 0)
        self._index.insert("", blocks)
        return max(0, min(held * PREFIX_BLOCK_TOKENS, len(ids) - 1))


@dataclass(frozen=True, kw_only=True)
class FixedTimings:
    ttft_s: float
    itl_s: float


def _placement_or_smallest(model: ModelSpec, hw: HardwareSpec) -> tuple[str, str]:
    """An operator may advertise a model the card cannot hold; the scheduler's memory filter must catch it."""
    try:
        return placement_for(model, hw)
    except EmulationError as exc:
        log.warning("%s; advertising it anyway at the smallest quantization", exc)
        return PLACEMENTS[-1]


class EmulatedEngine:
    def __init__(
        self,
        *,
        hardware: str,
        device: DeviceFigures | None = None,
        models: Sequence[str],
        text_engine: TorchEngine,
        fixed: FixedTimings | None = None,
        slowdown: float = 1.0,
        loadable: Sequence[str] = (),
        load_gbps: float = 2.0,
        fifo_slots: bool = False,
        prefix_cache: bool = True,
    ) -> None:
        """`slowdown` > 1 emulates a node slower than its spec (thermal throttling, a weak host) without saying
        so in its telemetry: only observed timings reveal it. `loadable` models are on disk: loading one takes
        its weight bytes / `load_gbps`. `fifo_slots`: at most the card's batch slots run at once and later
        requests wait in arrival order (as a serving engine's batch limit); otherwise every request runs at once
        and the performance model's queue estimate slows it instead. `prefix_cache`: emulate one in the card's KV
        room (see the module's docstring). `device`: the card as a driver would describe it, for a card in no table
        (`hardware` is then its name): its figures derive the spec (catalog/derive.py), and the node sends them."""
        self.hw = derive_card(device, key=hardware) if device is not None else hardware_spec(hardware)
        self._device = device
        self._models: dict[str, tuple[ModelSpec, str, str]] = {name: self._placed(name) for name in models}
        self._loadable = {name: self._placed(name) for name in loadable if name not in self._models}
        if not self._models and not self._loadable:
            raise EmulationError("an emulated engine needs at least one catalogue model")
        self._load_gbps = load_gbps
        self._load_lock = asyncio.Lock()
        self._slowdown = slowdown
        self._text = text_engine
        self._fixed = fixed
        self._stats = EngineStats()
        self._cache: OrderedDict[str, tuple[TokenEvent, ...]] = OrderedDict()
        self._slots = asyncio.Semaphore(max(1, self.hw.batch_slots)) if fifo_slots else None
        self._prefix = EmulatedPrefixCache(self._kv_room_tokens()) if prefix_cache else None

    def _kv_room_tokens(self) -> int:
        """Tokens of KV the card holds beyond its resident weights (the largest model's KV bytes a token, of
        prompts of a typical length: a model's sliding layers keep at most their window of each)."""
        placed = list(self._models.values()) + list(self._loadable.values())
        weights = sum(spec.weight_bytes(dtype, quant) for spec, dtype, quant in self._models.values())
        per_token = max(spec.kv_bytes_per_held_token() for spec, _, _ in placed)
        return max(0, int((self.hw.memory_gib * 2**30 - weights) / per_token))

    def max_running(self) -> int:
        """The most requests it runs at once (advertised in the capability): the card's batch slots with
        `fifo_slots`, else 0 (every request runs at once; the performance model slows them)."""
        return max(1, self.hw.batch_slots) if self._slots is not None else 0

    def prefix_cache_tokens(self) -> int:
        """Prompt tokens the emulated prefix cache holds (advertised in the capability)."""
        return self._prefix.capacity_tokens if self._prefix is not None else 0

    def prefix_block_tokens(self) -> int:
        """The emulated prefix cache's block in tokens (advertised in the capability)."""
        return PREFIX_BLOCK_TOKENS

    def _placed(self, name: str) -> tuple[ModelSpec, str, str]:
        spec = model_spec(name)
        if spec.real_engine:
            raise EmulationError(f"{name} is served by a real engine; an emulated node may not claim it")
        return (spec, *_placement_or_smallest(spec, self.hw))

    def loadable(self) -> tuple[str, ...]:
        return tuple(self._loadable)

    async def load(self, model: str) -> None:
        """Read the weights from disk: weight bytes / load bandwidth, then the model is resident."""
        async with self._load_lock:
            if model in self._models:
                return
            if model not in self._loadable:
                raise InvalidRequest(f"{model} is not on this node's disk")
            spec, dtype, quant = self._loadable[model]
            await asyncio.sleep(spec.weight_bytes(dtype, quant) / (self._load_gbps * 1e9))
            self._models[model] = self._loadable.pop(model)

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
                features=(*SAMPLING_FEATURES, LOGPROBS_FEATURE),  # the text source is a TorchEngine
            )
            for name, (spec, dtype, quant) in self._models.items()
        )

    def advertised_hardware(self) -> HardwareInfo:
        """The emulated card, with the figures its micro-benchmark would measure at full speed: `slowdown` stays
        silent (as a host that slows only under serving load, or that fakes its benchmark), so only observed
        timings reveal it."""
        return HardwareInfo(
            accelerator=self.hw.key,
            emulated=True,
            memory_bytes=int(self.hw.memory_gib * 2**30),
            device=self._device,
            measured=MeasuredFigures(
                bandwidth_gbs=self.hw.bandwidth_gbs * COPY_REACH,
                tflops={d: self.hw.fp16_tflops * MATMUL_REACH for d in MATMUL_DTYPES if d in self.hw.dtypes},
                device="emulated",
            ),
        )

    async def start(self) -> None:
        await self._text.start()

    def telemetry_override(self) -> dict[str, float | int]:
        """Telemetry of the emulated device: its memory (resident weights + KV of active requests, each taken as a
        sequence of TYPICAL_SEQUENCE_TOKENS of the largest model), busy share."""
        weights = sum(spec.weight_bytes(dtype, quant) for spec, dtype, quant in self._models.values())
        per_request = max((spec.kv_bytes(TYPICAL_SEQUENCE_TOKENS) for spec, _, _ in self._models.values()), default=0)
        kv = self._stats.active * per_request
        total = int(self.hw.memory_gib * 2**30)
        return {
            "memory_total_bytes": total,
            "memory_used_bytes": min(total, int(weights + kv)),
            "utilization": min(1.0, self._stats.active / max(1, self.hw.batch_slots)),
        }

    async def aclose(self) -> None:
        await self._text.aclose()

    async def _text_events(self, request: GenerateRequest) -> AsyncIterator[TokenEvent]:
        """The tiny model's events as it makes them (deterministic requests are cached whole)."""
        deterministic = request.sampling.temperature == 0.0 or request.sampling.seed is not None
        key = request.model_copy(update={"request_id": ""}).model_dump_json()
        if deterministic and key in self._cache:
            self._cache.move_to_end(key)
            for event in self._cache[key]:
                yield event
            return
        events = []
        async for event in self._text.generate(request):
            events.append(event)
            yield event
        if deterministic:
            self._cache[key] = tuple(events)
            while len(self._cache) > 512:
                self._cache.popitem(last=False)

    async def _prefetched(self, request: GenerateRequest) -> AsyncGenerator[TokenEvent, None]:
        """The text source's events, made ahead of the emulated timings: the tiny model writes while the emulated
        prefill runs and between emulated tokens, so the text source (real CPU work) delays the emulated schedule
        only when it is slower in all than the schedule itself, not whenever one of its steps is (a busy host)."""
        made: asyncio.Queue[TokenEvent | BaseException | None] = asyncio.Queue()

        async def write() -> None:
            try:
                async for event in self._text_events(request):
                    made.put_nowait(event)
            except Exception as exc:  # handed to the reader, which raises it where the engine's caller sees it
                made.put_nowait(exc)
            made.put_nowait(None)

        writer = asyncio.create_task(write())
        try:
            while (item := await made.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await writer

    def _text_request(self, request: GenerateRequest) -> GenerateRequest:
        """What the tiny model is asked: the prompt's last `TEXT_PROMPT_CHARS` characters (its context is short),
        at most `TEXT_MAX_TOKENS` tokens, and for plain text no stop strings (they are matched on the spelled
        words: `_spelled`)."""
        sampling = request.sampling.model_copy(update={"max_tokens": min(request.sampling.max_tokens, TEXT_MAX_TOKENS)})
        if sampling.response_format is None:
            sampling = sampling.model_copy(update={"stop": ()})
        update: dict[str, object] = {"model": self._text.offers()[0].name, "sampling": sampling}
        if request.prompt is not None:
            update["prompt"] = request.prompt[-TEXT_PROMPT_CHARS:]
        if request.messages is not None:
            update["messages"] = _clipped(request.messages, TEXT_PROMPT_CHARS)
        return request.model_copy(update=update)

    async def _spelled(self, request: GenerateRequest) -> AsyncIterator[TokenEvent]:
        """A plain-text answer: the tiny model's tokens spelled as the emulated vocabulary's words, the request's
        stop strings matched on them from `min_tokens` tokens on (as TorchEngine does on its own text). An answer
        longer than the tiny model writes at once goes on in rounds (`_round`), up to the emulated model's own
        limits, so that no answer ends early on the tiny model's."""
        params = request.sampling
        stops = StopMatcher(params.stop)
        answer = list(request.resume)
        for count, token in enumerate(answer, 1):  # the stop matcher's state, as the client's text has it
            if count >= params.min_tokens:
                stops.feed(spell(token))
        while True:
            last: TokenEvent | None = None
            async with contextlib.aclosing(self._prefetched(self._round(request, answer))) as events:
                async for event in events:
                    if event.finish_reason is not None:  # the source's last event: it ends by itself after it
                        last = event
                        continue
                    answer.extend(event.token_ids)
                    words = "".join(spell(token) for token in event.token_ids)
                    text = stops.feed(words) if len(answer) >= params.min_tokens else words
                    yield event.model_copy(
                        update={"text": text, "logprobs": tuple(map(_spelled_logprob, event.logprobs))}
                    )
                    if stops.stopped:
                        yield TokenEvent(
                            finish_reason="stop", stop_sequence=stops.matched, completion_tokens=len(answer)
                        )
                        return
            assert last is not None, "a text source ends with a final event"
            if last.finish_reason == "stop" or len(answer) >= params.max_tokens:
                update = {"text": stops.flush(), "stop_sequence": None, "completion_tokens": len(answer)}
                yield last.model_copy(update=update)
                return

    def _round(self, request: GenerateRequest, answer: Sequence[int]) -> GenerateRequest:
        """What the tiny model is asked next: the client's request (clipped) continued after the tokens resumed,
        when they fit its context; after that, or after a long resumed answer, the rest of the answer (at most
        `TEXT_MAX_TOKENS` of it) written after a prompt of the answer's own last characters."""
        if tuple(answer) == request.resume and len(answer) < TEXT_MAX_TOKENS:
            return self._text_request(request)
        params, left = request.sampling, request.sampling.max_tokens - len(answer)
        written = min(left, TEXT_MAX_TOKENS)
        sampling = params.model_copy(
            update={
                "max_tokens": written,
                "min_tokens": min(written, max(0, params.min_tokens - len(answer))),
                "stop": (),
            }
        )
        tail = bytes(token - OFFSET for token in answer if token >= OFFSET).decode("utf-8", "replace")
        update = {"prompt": tail[-TEXT_PROMPT_CHARS:], "messages": None, "resume": (), "sampling": sampling}
        return request.model_copy(update={"model": self._text.offers()[0].name, **update})

    def _timings(self, model: str, prompt_tokens: int) -> tuple[float, float]:
        ttft, itl = self._base_timings(model, prompt_tokens)
        return ttft, itl * self._stats.decode_throttle

    def _base_timings(self, model: str, prompt_tokens: int) -> tuple[float, float]:
        if self._fixed is not None:
            return self._fixed.ttft_s, self._fixed.itl_s
        spec, dtype, quant = self._models[model]
        others = max(0, self._stats.active - 1)
        pred = predict(
            spec, self.hw, prompt_tokens=prompt_tokens, dtype=dtype, quantization=quant, load=Load(active=others)
        )
        return pred.ttft_s * self._slowdown, pred.itl_s * self._slowdown

    async def generate(self, request: GenerateRequest) -> AsyncIterator[TokenEvent]:
        if request.model in self._loadable:
            await self.load(request.model)  # a cold start
        if request.model not in self._models:
            raise InvalidRequest(f"model {request.model!r} is not served here")
        limit = self._models[request.model][0].max_context
        if request.sampling.max_tokens > limit:
            raise InvalidRequest(
                f"max_tokens ({request.sampling.max_tokens}) exceeds the model's context of {limit} tokens"
            )
        arrived = time.monotonic()
        if self._slots is not None:  # wait for a batch slot, first come first served
            self._stats.queued += 1  # reported as the node's queue depth
            try:
                await self._slots.acquire()
            finally:
                self._stats.queued -= 1
        start = time.monotonic()
        self._stats.active += 1
        try:
            # timings follow the whole prompt as the emulated model counts it (the text source sees its tail)
            ids = prompt_ids(request)
            prompt_tokens = len(ids)
            cached = self._prefix.reuse(request.model, ids) if self._prefix is not None else 0
            ttft, itl = self._timings(request.model, prompt_tokens - cached + len(request.resume))
            first: float | None = None
            i = 0
            plain = request.sampling.response_format is None
            source = self._spelled(request) if plain else self._prefetched(self._text_request(request))
            async for event in source:
                if first is None:  # the text source may be slower than the emulated TTFT
                    first = max(start + ttft, time.monotonic())
                delay = first + i * itl - time.monotonic()
                i += 1
                if delay > 0:
                    await asyncio.sleep(delay)
                self._stats.note_tokens(time.monotonic(), 1)
                if event.finish_reason is not None:
                    done, to_first = time.monotonic() - start, first - start
                    event = event.model_copy(
                        update={
                            "queue_s": start - arrived,
                            "prefill_s": to_first,
                            "decode_s": done - to_first,
                            "prompt_tokens": prompt_tokens,
                            "cached_tokens": cached,
                        }
                    )
                yield event
        finally:
            self._stats.active -= 1
            if self._slots is not None:
                self._slots.release()


def _clipped(messages: Sequence[ChatMessage], chars: int) -> tuple[ChatMessage, ...]:
    """The last messages with at most `chars` characters of text together (the earliest kept one cut at its head),
    so that the tiny model's prompt and answer fit its context however many messages there are."""
    kept: list[ChatMessage] = []
    for message in reversed(messages):
        if chars <= 0:
            break
        kept.append(message.model_copy(update={"content": message.content[-chars:]}))
        chars -= len(message.content)
    return tuple(reversed(kept))


def _spelled_logprob(entry: TokenLogprob) -> TokenLogprob:
    """A log-probability entry with its token and alternatives spelled as the emulated vocabulary's words."""
    alternatives = tuple(_spelled_alternative(top) for top in entry.top_logprobs)
    picked = _spelled_alternative(entry)
    return TokenLogprob(token=picked.token, logprob=entry.logprob, bytes=picked.bytes, top_logprobs=alternatives)


def _spelled_alternative(entry: TopLogprob) -> TopLogprob:
    """One byte's entry as its word's (the end-of-sequence token, with no bytes, stays as it is)."""
    if len(entry.bytes) != 1:
        return TopLogprob(token=entry.token, logprob=entry.logprob, bytes=entry.bytes)
    word = spell(OFFSET + entry.bytes[0])
    return TopLogprob(token=word, logprob=entry.logprob, bytes=tuple(word.encode()))
