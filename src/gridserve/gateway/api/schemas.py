"""OpenAI-facing request schemas: lenient (unknown fields allowed), as OpenAI-compatible servers are."""

from collections.abc import Callable
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema, field_validator

from gridserve.types.wire import MAX_REPETITION_PENALTY, MAX_TOP_LOGPROBS

MAX_STOPS = 4
MAX_CHOICES = 16
MAX_LEGACY_LOGPROBS = 5
"""OpenAI's bound on the text completions' `logprobs`."""


def _string_or_list(max_items: int, *, min_items: int = 0, nullable: bool = False) -> WithJsonSchema:
    """The documented schema of a `str | list[str]` field whose list length a validator checks (so that the OpenAPI
    document states the bound; validation and its error messages stay the validator's)."""
    items = {"type": "array", "items": {"type": "string"}, "minItems": min_items, "maxItems": max_items}
    return WithJsonSchema({"anyOf": [{"type": "string"}, items, *([{"type": "null"}] if nullable else [])]})


class OpenAIModel(BaseModel):
    model_config = ConfigDict(extra="allow")


def _off(*defaults: Any) -> Callable[[Any], bool]:
    """A parameter is off when absent, null, empty, or one of `defaults` (what asks for the default behaviour)."""
    return lambda value: value is None or value in ({}, [], "", *defaults)


UNSUPPORTED: dict[str, tuple[Callable[[Any], bool], str]] = {
    "functions": (_off(), "tool calling by the legacy functions field (send tools)"),
    "function_call": (_off("none"), "tool calling by the legacy functions field (send tools)"),
    "echo": (_off(False), "echoing the prompt"),
    "suffix": (_off(), "a suffix"),
    "best_of": (_off(1), "best-of sampling"),
    "logit_bias": (_off(), "logit bias"),
    "presence_penalty": (_off(0), "penalties"),
    "frequency_penalty": (_off(0), "penalties"),
    "min_p": (_off(0), "min-p sampling"),
    "audio": (_off(), "audio output"),
    "modalities": (_off(["text"]), "modalities other than text"),
    "prediction": (_off(), "predicted outputs"),
}
"""Parameters of OpenAI's API (and vLLM's sampling extensions that benchmark clients send) that gridserve's nodes
cannot honour yet: a request that turns one on is refused with a 400 naming it, never served as if it were absent
(a client that sends `tools` must not get plain text back as though it had not). Each maps to (is it off?, what it
asks for)."""


CHAT_ONLY: dict[str, tuple[Callable[[Any], bool], str]] = {
    "tools": (_off(), "tool calling, which /v1/completions does not do (use /v1/chat/completions)"),
    "tool_choice": (_off("none"), "tool calling, which /v1/completions does not do (use /v1/chat/completions)"),
    "top_logprobs": (_off(0), "alternatives by /v1/chat/completions' field (here their number is logprobs)"),
}
"""Chat-only parameters, refused on the text completions endpoint rather than ignored."""


def unsupported(body: dict[str, Any], chat: bool = True) -> tuple[str, str] | None:
    """The first parameter in the body that asks for what gridserve cannot do, with what it asks for; None if none.
    `chat`: the chat endpoint (else CHAT_ONLY parameters are refused too)."""
    table = UNSUPPORTED if chat else {**UNSUPPORTED, **CHAT_ONLY}
    for name, (off, what) in table.items():
        if name in body and not off(body[name]):
            return name, what
    return None


class StreamOptions(OpenAIModel):
    include_usage: bool = False
    continuous_usage_stats: bool = False
    """vLLM's: with `include_usage`, every chunk carries the usage so far (benchmark clients such as guidellm send
    it); without `include_usage` it has no effect, as in vLLM."""


class Message(OpenAIModel):
    role: str
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(str(part.get("text", "")) for part in self.content if part.get("type") == "text")


class GridOptions(BaseModel):
    """gridserve's own request options, under the body key `gridserve` (OpenAI SDK: `extra_body`)."""

    model_config = ConfigDict(extra="forbid")
    tier: str | None = None
    max_price_per_mtok: float | None = Field(None, gt=0)
    ttft_slo_s: float | None = Field(None, gt=0)
    tpot_slo_s: float | None = Field(None, gt=0)
    engines: list[str] | None = None
    explain: bool = False
    hedge: bool | None = None
    """Send the request to the runner-up too if the first token is late (the gateway's hedging must be on). Unset:
    yes, except for a key of the batch class (a hedge holds a second node's slot that the fair queue does not count,
    and a batch flood's hedges take the slots kept for interactive requests)."""


def _document_refusals(schema: dict[str, Any]) -> None:
    """The OpenAPI description of a completion request says which parameters are refused (UNSUPPORTED)."""
    names = ", ".join(f"`{name}`" for name in UNSUPPORTED)
    schema["description"] = (
        "OpenAI's fields; others are accepted and have no effect, except these, refused with a 400 "
        f"(code `unsupported_parameter`, `param` naming it) unless absent, null, empty or at their default: {names}."
    )
    schema["x-gridserve-unsupported"] = list(UNSUPPORTED)


_VLLM = (
    "vLLM's sampling extension, honoured by nodes that offer it (a 400 naming it when no live node serving the "
    "model does): "
)


class SamplingFields(OpenAIModel):
    model_config = ConfigDict(extra="allow", json_schema_extra=_document_refusals)
    model: str = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = None
    stop: Annotated[str | list[str] | None, _string_or_list(MAX_STOPS, nullable=True)] = None
    n: int = Field(
        1,
        ge=1,
        le=MAX_CHOICES,
        description="Choices: each scheduled and generated as its own request (sampled ones with the seed plus its "
        "index); the usage counts the prompt once.",
    )
    top_k: int | None = Field(None, ge=-1, description=_VLLM + "sample among the k likeliest tokens (-1, 0: all).")
    repetition_penalty: float | None = Field(
        None,
        gt=0.0,
        le=MAX_REPETITION_PENALTY,
        description=_VLLM + "a token already in the prompt or the answer has its logit divided by it when positive, "
        "multiplied when negative (1: off).",
    )
    min_tokens: int | None = Field(
        None, ge=0, description=_VLLM + "no end (end-of-sequence or stop string) before this many tokens."
    )
    response_format: dict[str, Any] | None = Field(
        None,
        description='OpenAI\'s structured output: `{"type": "json_object"}` or `{"type": "json_schema", '
        '"json_schema": {"name", "schema", "strict"}}`; the answer is generated under the schema\'s grammar '
        'on nodes that offer it (`{"type": "text"}`: plain text).',
    )
    ignore_eos: bool | None = Field(
        None, description=_VLLM + "end-of-sequence does not end the answer: it runs to max_tokens or a stop string."
    )
    stream: bool = False
    stream_options: StreamOptions | None = None
    gridserve: GridOptions = Field(default_factory=GridOptions)

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop sequences")
        return value

    def stop_list(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def continuous_usage(self) -> bool:
        """Every chunk carries the usage so far (`stream_options`: `include_usage` and `continuous_usage_stats`)."""
        return self.include_usage() and bool(self.stream_options and self.stream_options.continuous_usage_stats)


class ChatCompletionRequest(SamplingFields):
    messages: list[Message] = Field(min_length=1)
    logprobs: bool | None = Field(
        None, description="Each answer token's log-probability (the model's own distribution, before temperature)."
    )
    top_logprobs: int | None = Field(
        None, ge=0, le=MAX_TOP_LOGPROBS, description="With logprobs: this many likeliest tokens at each position."
    )
    tools: list[Any] | None = Field(
        None,
        description="OpenAI's function tools; the answer's calls are generated under a grammar of their parameters "
        "on nodes that offer `tools`.",
    )
    tool_choice: Any = Field(None, description="none, auto (the default with tools), required, or a named function.")
    parallel_tool_calls: bool | None = None


class CompletionRequest(SamplingFields):
    prompt: Annotated[str | list[str], _string_or_list(1, min_items=1)]
    logprobs: int | None = Field(
        None,
        ge=0,
        le=MAX_LEGACY_LOGPROBS,
        description="Each answer token's log-probability with this many likeliest tokens at each position.",
    )

    @field_validator("prompt")
    @classmethod
    def _single(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and len(value) != 1:
            raise ValueError("exactly one prompt per request")
        return value

    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]
