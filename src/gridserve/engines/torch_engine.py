"""A local transformers engine: one worker thread runs the model; tokens stream to asyncio.

Prefill runs in chunks of the prefix cache's block size, reusing the longest cached run of a prompt's leading
blocks (engines/prefix_cache.py, which explains why a cache hit gives the same output, bit for bit)."""

import asyncio
import contextlib
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from gridserve.engines.base import EngineError, EngineStats, InvalidRequest, LocalEngine
from gridserve.engines.embedding import Embeddings
from gridserve.engines.pooling import mean_pooled
from gridserve.engines.prefix_cache import BLOCK_TOKENS, DEFAULT_PREFIX_CACHE_MB, PrefixCache, block_keys
from gridserve.engines.sampling import TokenRule, fresh_seed, pick_token, token_logprob
from gridserve.engines.text import IncrementalDecoder, StopMatcher
from gridserve.trust import proofs
from gridserve.trust.commitments import token_commitment
from gridserve.types import ChatMessage, GenerateRequest, HardwareInfo, ModelOffer, TokenEvent
from gridserve.types.embedding import Floats
from gridserve.types.node import EMBED, GENERATE, Task
from gridserve.types.wire import LOGPROBS_FEATURE, SAMPLING_FEATURES, TokenLogprob


class TextCodec(Protocol):
    eos_ids: frozenset[int]

    def encode_prompt(self, text: str) -> list[int]: ...

    def encode_chat(self, messages: Sequence[ChatMessage]) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def token_bytes(self, token: int) -> bytes:
        """The bytes one token stands for (its text may be part of a character: logprobs' `bytes`)."""
        ...

    def grammar_tokenizer(self) -> Any:
        """The vocabulary as llguidance reads it (structured output: engines/grammar.py)."""
        ...


@dataclass(frozen=True)
class LoadedModel:
    model: Any
    codec: TextCodec
    logit_mask: torch.Tensor | None = None
    """Additive mask over the vocabulary (-inf for ids never emitted), or None."""


_DONE = object()


class _Job(Protocol):
    """A request on the worker thread, run one step at a time among the others."""

    def advance(self) -> bool:
        """Run one step; True when the job is over (finished, cancelled or failed)."""
        ...


WORKER_JOIN_S = 30.0
"""How long `aclose` waits for the worker to finish its step (a long prompt's prefill) and stop."""


class TorchEngine(LocalEngine):
    """Serves one causal LM on a dedicated worker thread. Concurrent requests are interleaved token by token
    (each with its own KV cache): a new request's prefill runs after at most one decode step of each running
    one, so TTFT does not wait for other answers to finish. Each request's computation is the same as if it
    ran alone, so outputs stay bitwise-reproducible for a fixed thread count.

    It offers its model for generation and for embedding (`embed`: engines/pooling.py, one input a step on the same
    worker) unless told otherwise (`offer_tasks`)."""

    def __init__(
        self,
        *,
        kind: str,
        offer: ModelOffer,
        loader: Callable[[], LoadedModel],
        threads: int,
        lazy: bool = False,
        prefix_cache_bytes: int = DEFAULT_PREFIX_CACHE_MB * 2**20,
        prefix_block: int = BLOCK_TOKENS,
    ) -> None:
        """`lazy`: do not load the weights at start; the model is `loadable` until asked for (pre-warming) or
        first requested (a cold start). `prefix_cache_bytes`: the prefix cache's budget (0: none); prefill runs in
        chunks of `prefix_block` tokens either way."""
        self._lazy = lazy
        self._load_lock = asyncio.Lock()
        self._kind = kind
        self._offer = offer.model_copy(
            update={"features": (*SAMPLING_FEATURES, LOGPROBS_FEATURE), "tasks": (GENERATE, EMBED)}
        )  # _Generation's TokenRule
        self._loader = loader
        self._threads = threads
        self._loaded: LoadedModel | None = None
        self._prefix_budget = prefix_cache_bytes
        self._prefix_block = prefix_block
        self._prefix: PrefixCache | None = None
        """Created with the model; used on the worker thread only."""
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"engine-{kind}-load")
        self._incoming: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._worker: threading.Thread | None = None
        self._stats = EngineStats(steps=0)

    def offers(self) -> tuple[ModelOffer, ...]:
        return (self._offer,) if self._loaded is not None else ()

    def offer_tasks(self, tasks: tuple[Task, ...]) -> None:
        """Offer the model for these tasks only (`gridserve node --tasks`, once, before serving); an offer not for
        generation names no request features (they are generation's)."""
        features = self._offer.features if GENERATE in tasks else ()
        self._offer = self._offer.model_copy(update={"tasks": tasks, "features": features})

    def loadable(self) -> tuple[str, ...]:
        return () if self._loaded is not None else (self._offer.name,)

    def advertised_hardware(self) -> HardwareInfo | None:
        return None

    def prefix_cache_tokens(self) -> int | None:
        """Prompt tokens the prefix cache can hold (advertised in the capability); None until the model is loaded."""
        return self._prefix.capacity_tokens() if self._prefix is not None else None

    interleaved = True
    """Requests take turns token by token (no batch slots, no queue): advertised in the capability, so the
    gateway predicts no wait behind other requests, and decode slowed by each one running."""

    def prefix_block_tokens(self) -> int | None:
        """The prefix cache's block in tokens (advertised in the capability); None without a cache."""
        return self._prefix.block if self._prefix is not None and self._prefix.enabled else None

    @property
    def prefix_cache(self) -> PrefixCache | None:
        return self._prefix

    async def start(self) -> None:
        if not self._lazy:
            await self.load(self._offer.name)

    async def load(self, model: str) -> None:
        if model != self._offer.name:
            raise InvalidRequest(f"this node can load {self._offer.name}, not {model}")
        async with self._load_lock:
            if self._loaded is None:
                loop = asyncio.get_running_loop()
                self._prefix, self._loaded = await loop.run_in_executor(self._pool, self._load)

    def _load(self) -> tuple[PrefixCache, LoadedModel]:
        torch.set_num_threads(self._threads)
        loaded = self._loader()
        loaded.model.eval()
        loaded.codec.grammar_tokenizer()  # built once (about a second for a real vocabulary), not on a first request
        return PrefixCache.for_model(loaded.model, self._prefix_budget, self._prefix_block), loaded

    def load_sync(self) -> None:
        """Load in the calling thread (for direct, non-served use)."""
        self._prefix, self._loaded = self._pool.submit(self._load).result()

    async def aclose(self) -> None:
        """Stop the worker (after the step it is in) and wait for it: a process that exits while the worker thread
        is still inside torch aborts ("terminate called without an active exception")."""
        if self._worker is not None:
            self._incoming.put(None)
            await asyncio.get_running_loop().run_in_executor(None, self._worker.join, WORKER_JOIN_S)
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
        if self._lazy and self._loaded is None:
            await self.load(request.model)  # a cold start: the gateway prefers warm nodes and pre-warms standbys
        loaded = self._require()
        prompt = self.prompt_ids(request)
        limit = self._offer.max_context
        if len(prompt) + request.sampling.max_tokens > limit:
            raise InvalidRequest(
                f"prompt ({len(prompt)} tokens) + max_tokens ({request.sampling.max_tokens}) "
                f"exceeds the model's context of {limit} tokens"
            )
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[object] = asyncio.Queue()

        def emit(item: object) -> None:
            """From the worker thread. The caller's loop may have closed since (it stopped reading: its
            `asyncio.run` ended): the item is then for no one, and the worker must go on with the others."""
            with contextlib.suppress(RuntimeError):  # "Event loop is closed"
                loop.call_soon_threadsafe(events.put_nowait, item)

        assert self._prefix is not None  # set with the model
        gen = _Generation(loaded, self._prefix, prompt, request, emit, self._stats)
        self._stats.queued += 1
        self._ensure_worker()
        self._incoming.put(gen)
        try:
            while True:
                item = await events.get()
                if item is _DONE:
                    break
                if isinstance(item, BaseException):
                    raise EngineError(str(item)) from item
                assert isinstance(item, TokenEvent)
                yield item
        finally:
            gen.cancel.set()

    async def embed(self, model: str, inputs: Sequence[str]) -> Embeddings:
        """The inputs' vectors, computed on the worker thread one input a step (engines/pooling.py)."""
        if model != self._offer.name or not self._offer.serves(EMBED):
            raise InvalidRequest(f"this node does not embed with {model}")
        if self._lazy and self._loaded is None:
            await self.load(model)
        loaded = self._require()
        prompts = [loaded.codec.encode_prompt(text) for text in inputs]
        limit = self._offer.max_context
        longest = max(range(len(prompts)), key=lambda i: len(prompts[i]), default=0)
        if prompts and len(prompts[longest]) > limit:
            raise InvalidRequest(
                f"input {longest} ({len(prompts[longest])} tokens) exceeds the model's context of {limit} tokens"
            )
        done: asyncio.Future[Floats] = asyncio.get_running_loop().create_future()
        job = _Embedding(loaded.model, prompts, _settler(done), self._stats)
        self._stats.queued += 1
        self._ensure_worker()
        self._incoming.put(job)
        try:
            vectors = await done
        finally:
            job.cancel.set()
        return Embeddings(vectors=vectors, prompt_tokens=sum(len(p) for p in prompts))

    def _ensure_worker(self) -> None:
        if self._worker is None:
            self._worker = threading.Thread(target=self._work, name=f"engine-{self._kind}", daemon=True)
            self._worker.start()

    def _work(self) -> None:
        """Admit new requests, then advance every running one by one step; repeat."""
        torch.set_num_threads(self._threads)
        running: list[_Job] = []
        with torch.inference_mode():
            while True:
                try:
                    while True:
                        gen = self._incoming.get(block=not running)
                        if gen is None:
                            return
                        self._stats.queued -= 1
                        self._stats.active += 1
                        running.append(gen)
                except queue.Empty:
                    pass
                for gen in list(running):
                    done = gen.advance()
                    self._stats.steps = (self._stats.steps or 0) + 1
                    if done:
                        running.remove(gen)
                        self._stats.active -= 1


class _Generation:
    """One request's decoding, one step at a time: the first step prefills prompt + resumed tokens (failover:
    the client has their text already, so they only rebuild the detokeniser's and stop matcher's state), in
    block-aligned chunks after the longest cached prefix, and picks a token; each later step runs one decode
    forward and picks the next."""

    def __init__(
        self,
        loaded: LoadedModel,
        prefix: PrefixCache,
        prompt: list[int],
        request: GenerateRequest,
        emit: Callable[[object], None],
        stats: EngineStats,
    ) -> None:
        self.loaded, self.prefix, self.prompt, self.request = loaded, prefix, prompt, request
        self.emit, self.stats = emit, stats
        self.cached = 0
        """Prompt tokens whose keys and values came from the prefix cache."""
        self.params = request.sampling
        self.seed = self.params.seed if self.params.seed is not None else fresh_seed()
        self.decoder = IncrementalDecoder(loaded.codec.decode)
        self.stops = StopMatcher(self.params.stop)
        self._rule: TokenRule | None = None
        """Made by the first step, on the worker thread (a response format's grammar is built then)."""
        self.cancel = threading.Event()
        self.submitted = time.monotonic()
        self.began: float | None = None
        self.first_at: float | None = None
        self.out: Any = None
        self._chunks: Iterator[Any] | None = None
        """The prompt's prefill, one chunk a step (`_prefill`)."""
        self.activations: list[torch.Tensor] = []
        """Final-layer hidden state behind each picked token (for the activation proof)."""
        self.step = len(request.resume)
        self.last = 0

    def advance(self) -> bool:
        """Run one step; True when the generation is over (finished, cancelled or failed)."""
        try:
            if self.cancel.is_set():
                self.emit(_DONE)
                return True
            finish = self._step()
        except Exception as exc:
            self.stats.note_error(f"{type(exc).__name__}: {exc}")
            self.emit(exc)
            self.emit(_DONE)
            return True
        if finish is None:
            return False
        self._final(finish)
        self.emit(_DONE)
        return True

    @property
    def rule(self) -> TokenRule:
        if self._rule is None:
            resumed, loaded = self.request.resume, self.loaded
            history = [*self.prompt, *resumed]
            self._rule = TokenRule(self.params, loaded.codec.eos_ids, loaded.logit_mask, history, loaded.codec, resumed)
        return self._rule

    def _step(self) -> str | None:
        if self.out is None:
            if self._chunks is None:
                self.began = time.monotonic()
                _ = self.rule  # its grammar, if any, before the prefill
                for count, token in enumerate(self.request.resume, 1):
                    self._text(token, count)
                self._chunks = self._prefill([*self.prompt, *self.request.resume])
            self.out = next(self._chunks)
            if self.out is None:  # one chunk of the prompt done: the worker runs the other streams' steps now
                return None
        else:
            started = time.monotonic()
            step_ids = torch.tensor([[self.last]])
            self.out = self.loaded.model(
                input_ids=step_ids, past_key_values=self.out.past_key_values, use_cache=True, output_hidden_states=True
            )
            if self.stats.decode_throttle > 1.0:
                time.sleep((time.monotonic() - started) * (self.stats.decode_throttle - 1.0))
        return self._pick()

    def _prefill(self, ids: list[int]) -> Iterator[Any]:
        """Prefill `ids` chunk by chunk (each a block, the last one possibly shorter) after the blocks the prefix
        cache holds, storing each whole block computed. Yields None after each chunk but the last, then the last
        chunk's output (logits of its last position only, and the hidden states): one chunk a step, so that a long
        prompt does not hold back the tokens of the node's other streams for its whole prefill (on a CPU node a
        thousand-token prompt takes seconds, and a stream without a token for a second is taken for stalled)."""
        if not ids:
            raise EngineError("empty prompt")
        model, prefix = self.loaded.model, self.prefix
        size = prefix.block
        keys = block_keys(ids, size) if prefix.enabled else []
        reused = prefix.lookup(keys, len(ids))
        cache = prefix.restore(model, keys[:reused])
        self.cached = min(reused * size, len(self.prompt))
        protect = frozenset(keys)
        decoder = model.get_decoder()
        out: Any = None
        storing = prefix.enabled
        for start in range(reused * size, len(ids), size):
            chunk = torch.tensor([ids[start : start + size]])
            last = start + size >= len(ids)
            if not last:  # the decoder alone: no logits wanted here
                decoder(input_ids=chunk, past_key_values=cache, use_cache=True)
            else:
                out = model(
                    input_ids=chunk, past_key_values=cache, use_cache=True, output_hidden_states=True, logits_to_keep=1
                )
            if storing and start + size <= len(ids):
                # False: the budget is full of this prompt's own earlier blocks (kept; a later block needs them)
                storing = prefix.store(keys[start // size], cache, protect)
            if last:
                prefix.touch(keys)
            yield out

    def _pick(self) -> str | None:
        self.activations.append(self.out.hidden_states[-1][0, -1].clone())
        logits = self.out.logits[0, -1].float()
        scores = self.rule.scores(logits, self.step)
        token = pick_token(scores, self.params, self.seed, self.step)
        self.rule.note(token)
        self.step += 1
        self.last = token
        self.first_at = self.first_at or time.monotonic()
        self.stats.note_tokens(time.monotonic(), 1)
        if self.rule.ends(token):
            return "stop"
        scored: tuple[TokenLogprob, ...] = ()
        if self.params.logprobs is not None:
            scored = (token_logprob(logits, self.loaded.logit_mask, token, self.params.logprobs, self.loaded.codec),)
        self.emit(TokenEvent(text=self._text(token, self.step), token_ids=(token,), logprobs=scored))
        if self.stops.stopped:
            return "stop"
        return "length" if self.step >= self.params.max_tokens else None

    def _text(self, token: int, count: int) -> str:
        """The text the answer's `count`-th token adds; stop strings are looked for from `min_tokens` tokens on."""
        text = self.decoder.push(token)
        return self.stops.feed(text) if count >= self.params.min_tokens else text

    def _final(self, finish: str) -> None:
        tail = "" if self.stops.stopped else self.stops.feed(self.decoder.finish()) + self.stops.flush()
        end = time.monotonic()
        began = self.began or end
        first_at = self.first_at or end
        self.emit(
            TokenEvent(
                text=tail,
                finish_reason="stop" if finish == "stop" else "length",
                stop_sequence=self.stops.matched,
                prompt_tokens=len(self.prompt),
                cached_tokens=self.cached,
                prompt_digest=token_commitment(self.prompt),
                proof=proofs.build(self.activations, self.request.model),
                completion_tokens=self.step,
                queue_s=round(began - self.submitted, 6),
                prefill_s=round(first_at - began, 6),
                decode_s=round(end - first_at, 6),
            )
        )


def _settler(done: "asyncio.Future[Floats]") -> Callable[[Floats | BaseException], None]:
    """Settle `done` from the worker thread (a result, or the error the job raised), unless its waiter went."""
    loop = done.get_loop()

    def settle(outcome: Floats | BaseException) -> None:
        if done.done():
            return
        if isinstance(outcome, BaseException):
            done.set_exception(outcome if isinstance(outcome, EngineError) else EngineError(str(outcome)))
        else:
            done.set_result(outcome)

    def from_worker(outcome: Floats | BaseException) -> None:
        loop.call_soon_threadsafe(settle, outcome)

    return from_worker


class _Embedding:
    """One embeddings request: one input a step, so a batch holds back the tokens of the node's streams for one
    input's forward pass at a time, not for the whole batch."""

    def __init__(
        self, model: Any, prompts: list[list[int]], settle: Callable[[Floats | BaseException], None], stats: EngineStats
    ) -> None:
        self.model, self.prompts, self.settle, self.stats = model, prompts, settle, stats
        self.vectors: list[Floats] = []
        self.cancel = threading.Event()

    def advance(self) -> bool:
        if self.cancel.is_set():
            return True
        try:
            self.vectors.append(mean_pooled(self.model, self.prompts[len(self.vectors)]))
        except Exception as exc:
            self.stats.note_error(f"{type(exc).__name__}: {exc}")
            self.settle(exc)
            return True
        if len(self.vectors) < len(self.prompts):
            return False
        self.settle(np.stack(self.vectors))
        return True
