"""A local transformers engine: one worker thread runs the model; tokens stream to asyncio."""

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from gridserve.engines.base import EngineError, EngineStats, InvalidRequest
from gridserve.engines.sampling import fresh_seed, pick_token
from gridserve.engines.text import IncrementalDecoder, StopMatcher
from gridserve.types import ChatMessage, GenerateRequest, HardwareInfo, ModelOffer, TokenEvent


class TextCodec(Protocol):
    eos_ids: frozenset[int]

    def encode_prompt(self, text: str) -> list[int]: ...

    def encode_chat(self, messages: Sequence[ChatMessage]) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


@dataclass(frozen=True)
class LoadedModel:
    model: Any
    codec: TextCodec
    logit_mask: torch.Tensor | None = None
    """Additive mask over the vocabulary (-inf for ids never emitted), or None."""


_DONE = object()


class TorchEngine:
    """Serves one causal LM. Requests run one at a time on a dedicated thread (queue depth is reported)."""

    def __init__(self, *, kind: str, offer: ModelOffer, loader: Callable[[], LoadedModel], threads: int) -> None:
        self._kind = kind
        self._offer = offer
        self._loader = loader
        self._threads = threads
        self._loaded: LoadedModel | None = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"engine-{kind}")
        self._stats = EngineStats()

    @property
    def kind(self) -> str:
        return self._kind

    @property
    def stats(self) -> EngineStats:
        return self._stats

    def offers(self) -> tuple[ModelOffer, ...]:
        return (self._offer,)

    def advertised_hardware(self) -> HardwareInfo | None:
        return None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._loaded = await loop.run_in_executor(self._pool, self._load)

    def _load(self) -> LoadedModel:
        torch.set_num_threads(self._threads)
        loaded = self._loader()
        loaded.model.eval()
        return loaded

    def load_sync(self) -> None:
        """Load in the calling thread (for direct, non-served use)."""
        self._loaded = self._pool.submit(self._load).result()

    async def aclose(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def prompt_ids(self, request: GenerateRequest) -> list[int]:
        codec = self._require().codec
        if request.messages is not None:
            return codec.encode_chat(request.messages)
        return codec.encode_prompt(request.prompt or "")

    def _require(self) -> LoadedModel:
        if self._loaded is None:
            raise EngineError("engine not started")
        return self._loaded

    async def generate(self, request: GenerateRequest) -> AsyncIterator[TokenEvent]:
        loaded = self._require()
        ids = self.prompt_ids(request)
        limit = self._offer.max_context
        if len(ids) + request.sampling.max_tokens > limit:
            raise InvalidRequest(
                f"prompt ({len(ids)} tokens) + max_tokens ({request.sampling.max_tokens}) "
                f"exceeds the model's context of {limit} tokens"
            )
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[object] = asyncio.Queue()
        cancel = threading.Event()

        def emit(item: object) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)

        self._stats.queued += 1
        future = loop.run_in_executor(self._pool, self._run, loaded, ids, request, emit, cancel)
        try:
            while True:
                item = await queue.get()
                if item is _DONE:
                    break
                if isinstance(item, BaseException):
                    raise EngineError(str(item)) from item
                assert isinstance(item, TokenEvent)
                yield item
            await future
        finally:
            cancel.set()

    def _run(
        self,
        loaded: LoadedModel,
        ids: list[int],
        request: GenerateRequest,
        emit: Callable[[object], None],
        cancel: threading.Event,
    ) -> None:
        self._stats.queued -= 1
        self._stats.active += 1
        try:
            with torch.inference_mode():
                self._decode_loop(loaded, ids, request, emit, cancel)
        except Exception as exc:
            self._stats.note_error(f"{type(exc).__name__}: {exc}")
            emit(exc)
        finally:
            self._stats.active -= 1
            emit(_DONE)

    def _decode_loop(
        self,
        loaded: LoadedModel,
        ids: list[int],
        request: GenerateRequest,
        emit: Callable[[object], None],
        cancel: threading.Event,
    ) -> None:
        params = request.sampling
        seed = params.seed if params.seed is not None else fresh_seed()
        decoder = IncrementalDecoder(loaded.codec.decode)
        stops = StopMatcher(params.stop)
        out = loaded.model(input_ids=torch.tensor([ids]), use_cache=True)
        finish: str = "length"
        produced = 0
        for step in range(params.max_tokens):
            if cancel.is_set():
                return
            logits = out.logits[0, -1].float()
            if loaded.logit_mask is not None:
                logits = logits + loaded.logit_mask
            token = pick_token(logits, params, seed, step)
            produced += 1
            self._stats.note_tokens(time.monotonic(), 1)
            if token in loaded.codec.eos_ids:
                finish = "stop"
                break
            text = stops.feed(decoder.push(token))
            if text:
                emit(TokenEvent(text=text, token_ids=(token,)))
            if stops.stopped:
                finish = "stop"
                break
            if step + 1 < params.max_tokens:
                out = loaded.model(
                    input_ids=torch.tensor([[token]]), past_key_values=out.past_key_values, use_cache=True
                )
        tail = "" if stops.stopped else stops.feed(decoder.finish()) + stops.flush()
        emit(
            TokenEvent(
                text=tail,
                finish_reason="stop" if finish == "stop" else "length",
                prompt_tokens=len(ids),
                completion_tokens=produced,
            )
        )
