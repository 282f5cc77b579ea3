"""`openai-upstream`: the node fronts an OpenAI-compatible server the operator already runs
(vLLM, llama.cpp server, Ollama). Chat requests go to /v1/chat/completions, text prompts to /v1/completions,
both streamed; the node re-publishes the stream as gridserve token events.

Prefix caching is the upstream's own: requests ask for it (`cache_prompt: true`: llama.cpp's server keeps and
reuses the prompt's KV cache; servers that do not know the field ignore it), and the cached prompt tokens the server
reports are passed on in `cached_tokens`: OpenAI's `usage.prompt_tokens_details.cached_tokens` (vLLM with
`--enable-prompt-tokens-details`) or llama.cpp's `timings.cache_n`. llama-cpp-python's
server (0.3.x) reuses the longest common prefix with the previous prompt by itself but reports no count: 0 then.

The sampling extensions (`top_k`, `repetition_penalty`, `min_tokens`, `ignore_eos`) are passed through to servers
known to honour them under those names with vLLM's meaning, told by the `owned_by` of their `/v1/models` (`FEATURES`);
the node offers only those, so the gateway sends such requests only where they are honoured.

Embeddings: told that its server embeds (`gridserve node --tasks generate,embed`, or `embed` alone for a server
that only embeds, such as llama.cpp's started with `--embedding`), the node offers the model for embedding too and
forwards the gateway's embedding requests to the server's /v1/embeddings. A server that pools nothing (one vector
per token) has its vectors pooled by the node as gridserve's own engines pool (mean, L2-normalised)."""

import asyncio
import base64
import contextlib
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import aiohttp
import numpy as np
import orjson

from gridserve.engines.base import EngineError, EngineStats, InvalidRequest
from gridserve.engines.embedding import NORM_FLOOR, Embeddings
from gridserve.types import GenerateRequest, HardwareInfo, ModelOffer, TokenEvent
from gridserve.types.embedding import BadVector, Floats, decode_vectors
from gridserve.types.node import EMBED, GENERATE, Task
from gridserve.types.wire import LOGPROBS_FEATURE, TokenLogprob, TopLogprob

FEATURES = {
    "vllm": ("top_k", "repetition_penalty", "min_tokens", "ignore_eos", "response_format", LOGPROBS_FEATURE),
    "sglang": ("top_k", "repetition_penalty", "ignore_eos", "response_format", LOGPROBS_FEATURE),
    "llamacpp": ("top_k", "ignore_eos"),
}
"""Sampling extensions each server honours, by the `owned_by` its /v1/models gives (llama.cpp's repeat_penalty
looks back 64 tokens, not over the prompt and answer as vLLM's does; SGLang names min_tokens min_new_tokens)."""

MODELS_TIMEOUT = aiohttp.ClientTimeout(total=10)
EMBED_CONCURRENCY = 8
"""Requests to the server's /v1/embeddings at once for one embeddings request (one input each)."""


class UpstreamEngine:
    def __init__(
        self,
        *,
        url: str,
        served_name: str | None,
        upstream_model: str | None,
        max_context: int,
        api_key: str | None = None,
        tasks: tuple[Task, ...] = (GENERATE,),
    ) -> None:
        """`tasks`: what the upstream server serves its model for (it cannot be asked: a server that does not embed
        answers /v1/embeddings with an error of its own making)."""
        self.url = url.rstrip("/")
        self._tasks = tasks
        self._served_name = served_name
        self._upstream_model = upstream_model
        self._max_context = max_context
        self._api_key = api_key
        self._session: aiohttp.ClientSession | None = None
        self._stats = EngineStats()
        self._features: tuple[str, ...] = ()

    @property
    def kind(self) -> str:
        return "openai-upstream"

    @property
    def stats(self) -> EngineStats:
        return self._stats

    def offers(self) -> tuple[ModelOffer, ...]:
        name = self._served_name or self._upstream_model or "upstream"
        return (
            ModelOffer(
                name=name,
                dtype="unknown",
                quantization="unknown",
                max_context=self._max_context,
                weights_digest=f"upstream:{self._upstream_model}",
                features=self._features if GENERATE in self._tasks else (),
                tasks=self._tasks,
            ),
        )

    def offer_tasks(self, tasks: tuple[Task, ...]) -> None:
        """Offer the model for these tasks (`gridserve node --tasks`)."""
        self._tasks = tasks

    def loadable(self) -> tuple[str, ...]:
        return ()

    async def load(self, model: str) -> None:
        raise InvalidRequest("the openai-upstream engine serves what its server has loaded")

    def advertised_hardware(self) -> HardwareInfo | None:
        return None

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_connect=10))
        listed: list[dict[str, Any]] = []
        if self._upstream_model is None:
            listed = await self._models()
            if not listed:
                raise EngineError(f"upstream {self.url} lists no models")
            self._upstream_model = str(listed[0]["id"])
        else:  # the server's kind only tells which extensions it honours: none if it will not say
            with contextlib.suppress(EngineError, aiohttp.ClientError, ValueError, TimeoutError):
                listed = await self._models()
        chosen = next((m for m in listed if m.get("id") == self._upstream_model), {})
        self._features = FEATURES.get(str(chosen.get("owned_by", "")), ())

    async def _models(self) -> list[dict[str, Any]]:
        assert self._session is not None
        listing = f"{self.url}/v1/models"
        async with self._session.get(listing, headers=self._headers(), timeout=MODELS_TIMEOUT) as resp:
            if resp.status != 200:
                raise EngineError(f"upstream {listing} answered {resp.status}")
            data = await resp.json()
        return [m for m in data.get("data", []) if isinstance(m, dict) and "id" in m]

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()

    def _body(self, request: GenerateRequest) -> tuple[str, dict[str, Any]]:
        sp = request.sampling
        body: dict[str, Any] = {
            "model": self._upstream_model,
            "max_tokens": sp.max_tokens,
            "temperature": sp.temperature,
            "top_p": sp.top_p,
            "stream": True,
            "stream_options": {"include_usage": True},
            "cache_prompt": True,
        }
        if sp.seed is not None:
            body["seed"] = sp.seed
        if sp.stop:
            body["stop"] = list(sp.stop)
        extensions = {"top_k": sp.top_k, "repetition_penalty": sp.repetition_penalty, "min_tokens": sp.min_tokens}
        body |= {name: value for name, value in extensions.items() if name in sp.features()}
        if sp.ignore_eos:  # the gateway sends these only where offered (FEATURES)
            body["ignore_eos"] = True
        if sp.response_format is not None:
            body["response_format"] = sp.response_format.openai()
        if request.messages is not None:
            if sp.logprobs is not None:
                body |= {"logprobs": True, "top_logprobs": sp.logprobs}
            body["messages"] = [m.model_dump() for m in request.messages]
            return "/v1/chat/completions", body
        if sp.logprobs is not None:
            body["logprobs"] = sp.logprobs
        body["prompt"] = request.prompt or ""
        return "/v1/completions", body

    async def generate(self, request: GenerateRequest) -> AsyncIterator[TokenEvent]:
        if self._session is None:
            raise EngineError("engine not started")
        if request.resume:
            raise InvalidRequest("the openai-upstream engine cannot continue another node's generation")
        path, body = self._body(request)
        self._stats.active += 1
        try:
            async with self._session.post(self.url + path, json=body, headers=self._headers()) as resp:
                if resp.status >= 400:
                    text = (await resp.text())[:500]
                    error = InvalidRequest if resp.status in (400, 422) else EngineError
                    raise error(f"upstream answered {resp.status}: {text}")
                async for event in self._events(resp):
                    yield event
        except aiohttp.ClientError as exc:
            self._stats.note_error(f"upstream: {exc}")
            raise EngineError(f"upstream {self.url} failed: {exc}") from exc
        finally:
            self._stats.active -= 1

    async def embed(self, model: str, inputs: Sequence[str]) -> Embeddings:
        """The server's embeddings of `inputs`, one request to its /v1/embeddings per input (at most
        EMBED_CONCURRENCY at once): an input's vector never depends on the other inputs of its batch, as with
        gridserve's own engines (and llama-cpp-python 0.3's server mixes up the token vectors of every input after
        the first in a batch it does not pool)."""
        if EMBED not in self._tasks:
            raise InvalidRequest("this node's upstream server does not embed")
        if self._session is None:
            raise EngineError("engine not started")
        gate = asyncio.Semaphore(EMBED_CONCURRENCY)

        async def one(text: str) -> Embeddings:
            async with gate:
                return await self._embed_one(text)

        self._stats.active += 1
        calls = [asyncio.ensure_future(one(text)) for text in inputs]
        try:
            made = await asyncio.gather(*calls)
        except BaseException:
            for call in calls:  # one failed (or the caller left): the rest are not wanted
                call.cancel()
            raise
        finally:
            self._stats.active -= 1
        return Embeddings(np.concatenate([m.vectors for m in made]), sum(m.prompt_tokens for m in made))

    async def _embed_one(self, text: str) -> Embeddings:
        assert self._session is not None
        body = {"model": self._upstream_model, "input": [text]}
        try:
            async with self._session.post(self.url + "/v1/embeddings", json=body, headers=self._headers()) as resp:
                if resp.status >= 400:
                    answer = (await resp.text())[:500]
                    error = InvalidRequest if resp.status in (400, 422) else EngineError
                    raise error(f"upstream answered {resp.status}: {answer}")
                data = orjson.loads(await resp.read())
        except (aiohttp.ClientError, orjson.JSONDecodeError) as exc:
            self._stats.note_error(f"upstream: {exc}")
            raise EngineError(f"upstream {self.url} failed: {exc}") from exc
        return _embeddings(data, 1)

    async def _events(self, resp: aiohttp.ClientResponse) -> AsyncIterator[TokenEvent]:
        finish: str | None = None
        matched: str | None = None
        """The stop string that ended the answer where the server says (vLLM's `stop_reason`; not a token id)."""
        usage: dict[str, Any] = {}
        cached: int | None = None
        produced = 0
        async for raw in resp.content:
            line = raw.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                break
            chunk = orjson.loads(data)
            usage = chunk.get("usage") or usage
            cached = _cached_tokens(chunk, cached)
            for choice in chunk.get("choices") or ():
                text = choice.get("text") or (choice.get("delta") or {}).get("content") or ""
                finish = choice.get("finish_reason") or finish
                said = choice.get("stop_reason")
                matched = said if isinstance(said, str) and said else matched
                scored = _logprobs(choice.get("logprobs"))
                if text or scored:
                    produced += 1
                    self._stats.note_tokens(time.monotonic(), 1)
                    yield TokenEvent(text=text, logprobs=scored)
        prompt = int(usage.get("prompt_tokens", 0))
        yield TokenEvent(
            finish_reason="length" if finish == "length" else "stop",
            stop_sequence=matched if finish == "stop" else None,
            prompt_tokens=prompt,
            completion_tokens=int(usage.get("completion_tokens", produced)),
            cached_tokens=min(cached or 0, prompt),  # without a prompt count, none (a receipt bounds one by the other)
        )


def _logprobs(raw: Any) -> tuple[TokenLogprob, ...]:
    """A stream chunk's log-probabilities as the node sends them: OpenAI's chat entries (`content`) or the text
    completions' lists (`tokens`, `token_logprobs`, `top_logprobs`)."""
    if not isinstance(raw, dict):
        return ()
    if isinstance(raw.get("content"), list):
        return tuple(_scored(e) for e in raw["content"] if isinstance(e, dict))
    tokens, values, tops = raw.get("tokens") or [], raw.get("token_logprobs") or [], raw.get("top_logprobs") or []
    made = []
    for i, (token, value) in enumerate(zip(tokens, values, strict=False)):
        top = tops[i] if i < len(tops) and isinstance(tops[i], dict) else {}
        entry = {"token": token, "logprob": value, "top_logprobs": [{"token": t, "logprob": v} for t, v in top.items()]}
        made.append(_scored(entry))
    return tuple(made)


def _scored(entry: dict[str, Any]) -> TokenLogprob:
    top = tuple(_top(t) for t in entry.get("top_logprobs") or () if isinstance(t, dict))
    head = _top(entry)
    return TokenLogprob(token=head.token, logprob=head.logprob, bytes=head.bytes, top_logprobs=top)


def _top(entry: dict[str, Any]) -> TopLogprob:
    token = str(entry.get("token", ""))
    value = entry.get("logprob")
    logprob = float(value) if isinstance(value, int | float) else -9999.0
    raw = entry.get("bytes")
    encoded = tuple(int(b) for b in raw) if isinstance(raw, list) else tuple(token.encode())
    return TopLogprob(token=token, logprob=max(logprob, -9999.0), bytes=encoded)


def _embeddings(data: Any, count: int) -> Embeddings:
    """An OpenAI embeddings answer as `count` vectors in input order; EngineError for anything else."""
    entries = data.get("data") if isinstance(data, dict) else None
    if not isinstance(entries, list) or len(entries) != count or not all(isinstance(e, dict) for e in entries):
        raise EngineError(f"upstream gave no list of {count} embeddings")
    ordered = sorted(entries, key=lambda e: e.get("index", 0) if isinstance(e.get("index"), int) else 0)
    try:
        vectors = np.stack([_vector(e.get("embedding")) for e in ordered])
    except (BadVector, ValueError, TypeError) as exc:
        raise EngineError(f"upstream embeddings are not one vector of numbers per input: {exc}") from exc
    usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
    tokens = usage.get("prompt_tokens", 0)
    return Embeddings(vectors=vectors, prompt_tokens=tokens if isinstance(tokens, int) and tokens >= 0 else 0)


def _vector(raw: Any) -> Floats:
    """One input's embedding: numbers, or base64 of float32 (as the server pooled it); or one vector per token (a
    server that pools nothing: llama.cpp's `--pooling none`, llama-cpp-python's server on a generative model),
    pooled here as gridserve's own engines pool: their mean, L2-normalised (engines/pooling.py)."""
    given = decode_vectors([raw], len(base64.b64decode(raw)) // 4)[0] if isinstance(raw, str) else raw
    values: Floats = np.asarray(given, dtype=np.float32)
    if values.ndim == 2 and values.shape[0] > 0:
        pooled = values.mean(axis=0)
        values = (pooled / max(float(np.linalg.norm(pooled)), NORM_FLOOR)).astype(np.float32)
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"an embedding of the shape {values.shape}")
    return values


def _cached_tokens(chunk: dict[str, Any], known: int | None) -> int | None:
    """The cached prompt tokens a stream chunk reports (OpenAI's usage details, else llama.cpp's timings), else
    `known`."""
    details = (chunk.get("usage") or {}).get("prompt_tokens_details") or {}
    value = details.get("cached_tokens") if isinstance(details, dict) else None
    if value is None:
        timings = chunk.get("timings")
        value = timings.get("cache_n") if isinstance(timings, dict) else None
    return max(0, int(value)) if isinstance(value, int | float) and not isinstance(value, bool) else known
