"""Messages between gateway and node."""

from typing import Any, Literal, TypedDict

import orjson
from pydantic import Field, model_validator

from gridserve.types.base import Strict
from gridserve.types.node import Capability, NodeId, Telemetry

GREEDY_BELOW = 1e-6
"""Temperatures under this pick the argmax, the limit of sampling as the temperature goes to 0 (dividing the
logits by a temperature near 0 overflows float32, and the probabilities become NaN)."""
MAX_REPETITION_PENALTY = 10.0
MAX_SCHEMA_CHARS = 65_536
SAMPLING_FEATURES = ("top_k", "repetition_penalty", "min_tokens", "ignore_eos", "response_format", "tools")
"""The request features gridserve's own engines honour: vLLM's sampling extensions (which benchmark clients send)
and structured output (a response_format decoded under its grammar: engines/grammar.py)."""


MAX_TOP_LOGPROBS = 20
LOGPROBS_FEATURE = "logprobs"
"""A request feature apart from SAMPLING_FEATURES: a node that offers it sends each token's log-probability and the
likeliest alternatives (gridserve's own whole-model engines do; the pipeline sampler does not yet)."""


TOOL_CALL_TAG = "<tool_call>"
"""What a tool-calling answer starts with, before its calls as a JSON array of {"name", "arguments"}."""


class ResponseFormat(Strict):
    """Structured output: the answer is a JSON object (`json_object`), or one that validates against `schema`
    (`json_schema`), or tool calls (`tool_calls`: TOOL_CALL_TAG then a JSON array that validates against `schema`,
    the calls the request's tools allow; with `optional`, plain text not starting with "<" instead), generated
    under the grammar of it (engines/grammar.py)."""

    type: Literal["json_object", "json_schema", "tool_calls"]
    schema_text: str = Field("", max_length=MAX_SCHEMA_CHARS)
    """The JSON schema as the client sent it, serialised (empty for json_object); for tool_calls the gateway's
    schema of the calls array."""
    name: str = Field("", max_length=64)
    strict: bool = False
    optional: bool = False
    """tool_calls only: the answer may be text instead (tool_choice auto)."""

    def answer_schema(self) -> dict[str, object]:
        """The schema the answer must validate against (any object for json_object)."""
        if self.type == "json_object" or not self.schema_text:
            return {"type": "object"}
        found = orjson.loads(self.schema_text)
        return found if isinstance(found, dict) else {}

    def openai(self) -> dict[str, object]:
        """OpenAI's `response_format` for it (what an upstream server is sent)."""
        if self.type == "json_object":
            return {"type": "json_object"}
        body: dict[str, object] = {"name": self.name or "answer", "schema": self.answer_schema(), "strict": self.strict}
        return {"type": "json_schema", "json_schema": body}


class SamplingParams(Strict):
    """Sampling parameters. temperature below GREEDY_BELOW means greedy. With a seed, sampling is deterministic
    (the gateway fixes one for every sampled request it sends: gateway/api/openai_api.py)."""

    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = None
    stop: tuple[str, ...] = ()
    top_k: int = Field(0, ge=0)
    """Sample among the k likeliest tokens only (0: all), before top-p."""
    repetition_penalty: float = Field(1.0, gt=0.0, le=MAX_REPETITION_PENALTY)
    """vLLM's: the logit of every token already in the prompt or the answer is divided by it when positive,
    multiplied by it when negative (1: off)."""
    min_tokens: int = Field(0, ge=0)
    """No end (end-of-sequence token or stop string) before this many completion tokens: the end-of-sequence
    tokens' logits are -inf until then, as in vLLM."""
    ignore_eos: bool = False
    """An end-of-sequence token does not end the answer (it is a completion token like any other, with no text):
    the answer runs to max_tokens or a stop string, as in vLLM."""
    response_format: ResponseFormat | None = None
    """Structured output: every token is drawn from those the format's grammar allows next."""
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    """Send each token's log-probability with this many likeliest alternatives (None: none). The model's own
    distribution at the position (its logits and mask), before temperature, penalties and grammar, as vLLM reports
    them by default."""

    @model_validator(mode="after")
    def _min_within_max(self) -> "SamplingParams":
        if self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) exceeds max_tokens ({self.max_tokens})")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    def features(self) -> tuple[str, ...]:
        """The sampling extensions this request turns on (named as the request parameters): a node must offer
        each (ModelOffer.features) to be given it."""
        on = (
            ("top_k", self.top_k > 0),
            ("repetition_penalty", self.repetition_penalty != 1.0),
            ("min_tokens", self.min_tokens > 0),
            ("ignore_eos", self.ignore_eos),
            ("response_format", self.response_format is not None and self.response_format.type != "tool_calls"),
            ("tools", self.response_format is not None and self.response_format.type == "tool_calls"),
            (LOGPROBS_FEATURE, self.logprobs is not None),
        )
        return tuple(name for name, used in on if used)


class ChatMessage(Strict):
    role: str
    content: str


class GenerateRequest(Strict):
    """What the gateway asks a node to run. Exactly one of `prompt` and `messages` is set."""

    request_id: str
    model: str
    prompt: str | None = None
    messages: tuple[ChatMessage, ...] | None = None
    sampling: SamplingParams
    resume: tuple[int, ...] = ()
    """Failover: completion token ids another node already produced and the client already has. The node
    continues after them (completion position len(resume)) and sends only what follows; `completion_tokens`
    on its last event counts them too. Greedy output equals an uninterrupted run; seeded sampling too, since
    the draw at position k depends only on (seed, k) (engines/sampling.py)."""

    @model_validator(mode="after")
    def _resume_within_budget(self) -> "GenerateRequest":
        if len(self.resume) >= self.sampling.max_tokens:
            raise ValueError("resume must hold fewer tokens than max_tokens")
        return self


class TopLogprob(Strict):
    """A token's log-probability in OpenAI's shape: its text, and the text's UTF-8 bytes (a token that is part of a
    character has the replacement character as text; the bytes say which part)."""

    token: str
    logprob: float
    bytes: tuple[int, ...] = ()


class TokenLogprob(TopLogprob):
    """The picked token's, with the likeliest tokens at its position (most likely first)."""

    top_logprobs: tuple[TopLogprob, ...] = Field((), max_length=MAX_TOP_LOGPROBS)


class TokenEvent(Strict):
    """One streamed piece of output. Every generated token is sent in its own event (its text may be empty
    while a stop string or a multi-byte character is pending), so the gateway knows exactly which tokens the
    client's text covers. The last event has `finish_reason`, the counts and the node's own timings."""

    text: str = ""
    token_ids: tuple[int, ...] = ()
    finish_reason: Literal["stop", "length"] | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    """Last event: prompt tokens whose KV cache the node reused from an earlier request (its prefix cache) instead
    of computing them; at most `prompt_tokens`."""
    queue_s: float = 0.0
    """Last event: time the request waited on the node before compute started."""
    prefill_s: float = 0.0
    """Last event: compute time to the first token."""
    decode_s: float = 0.0
    """Last event: compute time after the first token."""
    prompt_digest: str = ""
    """Last event: sha256 of the prompt's token ids as the node tokenised them (committed to in the receipt)."""
    proof: str = ""
    """Last event: the activation proof over the tokens this node generated (trust/proofs.py)."""
    logprobs: tuple[TokenLogprob, ...] = ()
    """One per token of `token_ids` when the request asked for log-probabilities (SamplingParams.logprobs)."""
    stop_sequence: str | None = None
    """Last event: the request's stop string that ended the answer (None: end-of-sequence, or not a stop)."""

    def wire(self) -> "StreamEvent":
        """This event as a stream line carries it: text and token ids when there are any, and on the last event
        the finish reason, counts and timings (the proof goes inside the receipt, which the node adds). Like the
        prompt digest, `cached_tokens` is left out when it is 0 (its default)."""
        line: StreamEvent = {}
        if self.text:
            line["text"] = self.text
        if self.token_ids:
            line["token_ids"] = list(self.token_ids)
        if self.logprobs:
            line["logprobs"] = [lp.model_dump() for lp in self.logprobs]
        if self.finish_reason is not None:
            line["finish_reason"] = self.finish_reason
            line["prompt_tokens"] = self.prompt_tokens
            line["completion_tokens"] = self.completion_tokens
            if self.cached_tokens:
                line["cached_tokens"] = self.cached_tokens
            line["queue_s"] = self.queue_s
            line["prefill_s"] = self.prefill_s
            line["decode_s"] = self.decode_s
            if self.prompt_digest:
                line["prompt_digest"] = self.prompt_digest
            if self.stop_sequence is not None:
                line["stop_sequence"] = self.stop_sequence
        return line


class StreamError(TypedDict, total=False):
    """The body of an error line: the engine failed mid-generation."""

    type: str
    message: str


class StreamEvent(TypedDict, total=False):
    """One line of a node's generation stream, as the node writes it and the gateway decodes it (NDJSON).

    A plain dict at run time (orjson decodes a line straight into it), typed for every reader: the gateway's
    dispatch and failover, the pipeline (which writes the same events for the client), receipts, canaries and
    the API's chunk formatter. A token event has `text` and `token_ids`; the last event has `finish_reason`,
    the counts, the node's timings and its signed `receipt`; an error line has only `error`. The fields are
    TokenEvent's (which documents them) without `proof`, which travels inside the receipt."""

    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    queue_s: float
    prefill_s: float
    decode_s: float
    prompt_digest: str
    stop_sequence: str
    """Last event, when a stop string ended the answer: which (the gateway keeps it only if the request had it)."""
    logprobs: list[dict[str, Any]]
    """Token events of a request that asked for them: OpenAI's chat logprob entries, one per token id."""
    receipt: str
    """Last event: the node's receipt, a signed envelope (JSON text)."""
    error: StreamError
    busy: int
    """A busy line (it has nothing else): no token yet, but the node's engine has run this many steps in all,
    some since the stream's last line (another prompt's prefill on a CPU node). The transport reads it as a sign of
    life and never hands it on (gateway/dispatch/stall.py)."""


class Receipt(Strict):
    """What a node signs for each generation it finishes (purpose "receipt"). The gateway checks it against
    what it sent and what it received; the settlement ledger compares its token count with its own."""

    request_id: str
    node_id: NodeId
    model: str
    weights_digest: str
    input_commitment: str
    """sha256 of the canonical JSON of the request as the node received it (gateway/integrity/receipts.py)."""
    prompt_digest: str
    output_commitment: str
    """sha256 of the completion token ids this node sent (after any resumed ones), as little-endian int32."""
    resumed: int
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    queue_s: float
    prefill_s: float
    decode_s: float
    proof: str = ""
    """Activation proof (later: TOPLOC over the last hidden states); empty when the engine has none."""
    cached_tokens: int = 0
    """Prompt tokens the node took from its prefix cache (as in the final event); 0 from nodes that predate it."""


class RegisterPayload(Strict):
    capability: Capability


class RegisterReply(Strict):
    gateway_public_key: str
    heartbeat_interval_s: float
    unread: tuple[str, ...] = ()
    """Fields of the node's capability document this gateway does not know (an older gateway: it reads the rest;
    what these describe is not used to route to the node). Sent only when there are some."""


class HeartbeatPayload(Strict):
    node_id: NodeId
    seq: int
    telemetry: Telemetry
