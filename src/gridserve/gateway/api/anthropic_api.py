"""Anthropic's Messages API, `POST /v1/messages`, served by the chat core (gateway/api/surface.py).

A Messages request is read into a chat completion request (system prompt, text, `tool_use` and `tool_result`
blocks, tools and tool_choice, stop sequences, sampling), so it is scheduled, dispatched, audited and billed as
one; the answer comes back in Anthropic's shapes: a `message` whole, or its server-sent events (`message_start`,
content blocks, `message_delta`, `message_stop`). What gridserve cannot do (images and documents, extended
thinking, server tools, a final assistant message to continue) is refused with a 400 naming it, as is any
parameter the Messages API does not have: nothing is silently dropped. Errors use Anthropic's format
(`{"type": "error", "error": {"type", "message"}}`)."""

import re
from collections.abc import Callable
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model
from pydantic.config import JsonDict
from pydantic_core import ErrorDetails

from gridserve.engines import grammar
from gridserve.gateway.api.errors import APIError, bad_request, json_object, unsupported_parameter
from gridserve.gateway.api.openai_api import ApiContext
from gridserve.gateway.api.schemas import MAX_STOPS, ChatCompletionRequest, GridOptions, SamplingFields
from gridserve.gateway.api.surface import Answer, Renderer, Surface
from gridserve.gateway.api.tools import MAX_TOOLS, CallDelta
from gridserve.types.wire import MAX_SCHEMA_CHARS, ResponseFormat

STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}
"""OpenAI's finish reason -> Anthropic's stop_reason; `stop` ended by one of the request's stop sequences (the node
names it on its last event: `stop_sequence`) is `stop_sequence`. An upstream node that does not say which string
matched reports `end_turn`: never a guess."""
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    502: "api_error",
    503: "overloaded_error",
    529: "overloaded_error",
}
TOOL_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
TOOL_ID_PREFIX = "toolu_"


def _off(*defaults: Any) -> Callable[[Any], bool]:
    """A parameter is off when absent, null, empty, or one of `defaults`."""
    return lambda value: value is None or value in ({}, [], "", *defaults)


REFUSED: dict[str, tuple[Callable[[Any], bool], str]] = {
    "thinking": (_off({"type": "disabled"}), "extended thinking"),
    "container": (_off(), "a code execution container"),
    "context_management": (_off(), "context management"),
    "mcp_servers": (_off(), "MCP servers"),
    "inference_geo": (_off(), "a geographic region for inference"),
    "diagnostics": (_off(), "prompt cache diagnostics"),
    "speed": (_off("standard"), "fast mode"),
}
"""Parameters of Anthropic's API that ask for what gridserve cannot do: refused with a 400 naming them unless off
(absent, null, empty or at their default), never served as if they were absent."""
TOOL_REFUSED: dict[str, tuple[Callable[[Any], bool], str]] = {
    "defer_loading": (_off(False), "deferred tool loading (tool search)"),
    "allowed_callers": (_off(), "programmatic tool calling"),
    "input_examples": (_off(), "tool input examples"),
}
TOOL_KEYS = {"type", "name", "description", "input_schema", "cache_control", "strict", "eager_input_streaming"}
"""A custom tool's keys gridserve reads or that ask for nothing it does not do: `cache_control` (the nodes' prefix
caches reuse what they can by themselves), `strict` (tool inputs are always decoded under their schema's grammar),
`eager_input_streaming` (a tool's input is streamed whole, in one delta)."""
TEXT_KEYS = {"type", "text", "cache_control", "citations"}
TOOL_USE_KEYS = {"type", "id", "name", "input", "cache_control"}
TOOL_RESULT_KEYS = {"type", "tool_use_id", "content", "is_error", "cache_control"}
TOOL_ERROR_PREFIX = "Error: "
"""How a `tool_result` with `is_error` reaches the model: its content after this prefix."""


# -- the request -----------------------------------------------------------------------------------------------

# What the documented schema says of the fields read by hand below (the OpenAPI document, gateway/api/openapi_doc.py)
_BLOCK: JsonDict = {
    "type": "object",
    "required": ["type"],
    "properties": {"type": {"enum": ["text", "tool_use", "tool_result"]}},
}
_TEXT_BLOCK: JsonDict = {
    "type": "object",
    "required": ["type", "text"],
    "properties": {"type": {"const": "text"}, "text": {"type": "string"}},
}
_CONTENT: JsonDict = {"anyOf": [{"type": "string"}, {"type": "array", "items": _BLOCK}]}
_SYSTEM: JsonDict = {"anyOf": [{"type": "string"}, {"type": "array", "items": _TEXT_BLOCK}, {"type": "null"}]}
_TOOL: JsonDict = {
    "type": "object",
    "required": ["name", "input_schema"],
    "properties": {
        "type": {"enum": ["custom", None]},
        "name": {"type": "string", "pattern": TOOL_NAME.pattern},
        "description": {"type": ["string", "null"]},
        "input_schema": {"type": "object", "required": ["type"], "properties": {"type": {"const": "object"}}},
        "cache_control": {},
        "strict": {},
        "eager_input_streaming": {},
    },
    "additionalProperties": False,
}
_TOOLS: JsonDict = {"anyOf": [{"type": "array", "maxItems": MAX_TOOLS, "items": _TOOL}, {"type": "null"}]}
_TOOL_CHOICE: JsonDict = {
    "anyOf": [
        {
            "type": "object",
            "required": ["type"],
            "properties": {
                "type": {"enum": ["auto", "any", "tool", "none"]},
                "name": {"type": "string"},
                "disable_parallel_tool_use": {"type": "boolean"},
            },
            "additionalProperties": False,
        },
        {"type": "null"},
    ]
}
_THINKING: JsonDict = {
    "anyOf": [
        {"type": "null"},
        {
            "type": "object",
            "required": ["type"],
            "properties": {"type": {"const": "disabled"}},
            "additionalProperties": False,
        },
    ]
}
_NULL: JsonDict = {"type": "null"}


class InputMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    role: Literal["user", "assistant"]
    content: Any = Field(
        json_schema_extra=_CONTENT,
        description="A string, or content blocks: `text`, `tool_use` (assistant), `tool_result` (user; its content "
        "a string or text blocks, `is_error`). Other blocks (`image`, `document`, `thinking`, ...) are refused.",
    )


class MessagesRequest(BaseModel):
    """Anthropic's Messages request. A parameter not listed is refused with a 400 naming it, as Anthropic does."""

    model_config = ConfigDict(extra="forbid", strict=True)
    model: str = Field(min_length=1)
    max_tokens: int = Field(ge=1)
    messages: list[InputMessage] = Field(min_length=1, description="The last one is a user turn (no prefill).")
    system: Any = Field(None, json_schema_extra=_SYSTEM, description="A string or text blocks.")
    stop_sequences: list[str] | None = Field(None, max_length=MAX_STOPS)
    temperature: float | None = Field(None, ge=0.0, le=1.0, description="Default 1.")
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0, description="On nodes that offer top-k sampling (a 400 when none does).")
    stream: bool | None = None
    metadata: dict[str, Any] | None = Field(None, description="Accepted, no effect.")
    service_tier: Literal["auto", "standard_only"] | None = Field(None, description="Accepted, no effect.")
    cache_control: dict[str, Any] | None = Field(None, description="Accepted: nodes reuse cached prefixes anyway.")
    tools: list[dict[str, Any]] | None = Field(
        None,
        max_length=MAX_TOOLS,
        json_schema_extra=_TOOLS,
        description="Custom tools `{name, description, input_schema}`; server tools (another `type`) are refused.",
    )
    tool_choice: dict[str, Any] | None = Field(
        None,
        json_schema_extra=_TOOL_CHOICE,
        description="`{type: auto|any|tool|none, name, disable_parallel_tool_use}`.",
    )
    output_config: dict[str, Any] | None = Field(
        None, description='`format` `{"type": "json_schema", "schema"}`: the answer is generated under its grammar.'
    )
    thinking: Any = Field(None, json_schema_extra=_THINKING, description='Refused unless `{"type": "disabled"}`.')
    container: Any = Field(None, json_schema_extra=_NULL, description="Refused unless null.")
    context_management: Any = Field(None, json_schema_extra=_NULL, description="Refused unless null.")
    mcp_servers: Any = Field(
        None,
        json_schema_extra={"anyOf": [{"type": "null"}, {"type": "array", "maxItems": 0}]},
        description="Refused unless null or empty.",
    )
    inference_geo: Any = Field(None, json_schema_extra=_NULL, description="Refused unless null.")
    diagnostics: Any = Field(None, json_schema_extra=_NULL, description="Refused unless null.")
    speed: Any = Field(
        None, json_schema_extra={"enum": ["standard", None]}, description="Refused unless null or standard."
    )
    user_profile_id: str | None = Field(None, description="Accepted, no effect.")
    workspace_id: str | None = Field(None, description="Accepted, no effect.")
    gridserve: GridOptions = Field(default_factory=GridOptions, description="gridserve's own request options.")


_ANSWER_ONLY = ("max_tokens", "stop_sequences", "temperature", "top_p", "top_k", "stream", "metadata", "service_tier")
CountTokensRequest: type[BaseModel] = create_model(
    "CountTokensRequest",
    __config__=ConfigDict(extra="forbid", strict=True),
    __doc__="Anthropic's token count request (`POST /v1/messages/count_tokens`): a Messages request's input (model, "
    "system, messages, tools, tool_choice, output_config), without the parameters of an answer; one of those is "
    "refused with a 400 naming it.",
    **{name: (f.annotation, f) for name, f in MessagesRequest.model_fields.items() if name not in _ANSWER_ONLY},  # type: ignore[call-overload]
)


def _where(loc: tuple[int | str, ...]) -> str:
    """A validation error's location as a parameter: `messages[0].role`."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _invalid(error: ErrorDetails, renamed: dict[str, str] | None = None) -> APIError:
    param = _where(tuple(error["loc"]))
    head = param.split(".")[0].split("[")[0]
    if renamed and head in renamed:
        param = renamed[head] + param[len(head) :]
    return bad_request(f"Invalid request: {param}: {error['msg']}", param=param or None)


def _load(body: bytes) -> dict[str, Any]:
    return json_object(body)


def _refuse(raw: dict[str, Any], table: dict[str, tuple[Callable[[Any], bool], str]], where: str = "") -> None:
    for name, (off, what) in table.items():
        if name in raw and not off(raw[name]):
            raise unsupported_parameter(where + name, what)


def _only(raw: dict[str, Any], keys: set[str], where: str) -> None:
    extra = sorted(set(raw) - keys)
    if extra:
        param = f"{where}.{extra[0]}"
        raise bad_request(f"Invalid request: {param}: Extra inputs are not permitted", param=param)


async def read(ctx: ApiContext, body: bytes) -> SamplingFields:
    """A Messages request as the chat completion request it becomes (a 400 naming what is wrong or refused)."""
    return translate(_load(body))


async def read_count(ctx: ApiContext, body: bytes) -> SamplingFields:
    """A token count as the one-token greedy answer to the same input: the node that serves it counts the prompt
    as its model reads it (the chat template, the tools described, the grammar's preamble), on every engine and
    transport alike; and its prefix cache then holds the conversation the count is usually for."""
    raw = _load(body)
    _refuse(raw, REFUSED)
    try:
        CountTokensRequest.model_validate(raw)
    except ValidationError as exc:
        raise _invalid(exc.errors()[0]) from exc
    return translate({**raw, "max_tokens": 1, "temperature": 0.0})


def translate(raw: dict[str, Any]) -> ChatCompletionRequest:
    _refuse(raw, REFUSED)
    try:
        req = MessagesRequest.model_validate(raw)
    except ValidationError as exc:
        raise _invalid(exc.errors()[0]) from exc
    chat: dict[str, Any] = {
        "model": req.model,
        "max_tokens": req.max_tokens,
        "messages": _system(req.system) + _conversation(req.messages),
        "stream": bool(req.stream),
        "gridserve": req.gridserve,
    }
    sampling = {"temperature": req.temperature, "top_p": req.top_p, "top_k": req.top_k, "stop": _stops(req)}
    chat.update({k: v for k, v in sampling.items() if v is not None})
    tools = _tools(req.tools or [])
    if tools:
        chat["tools"] = tools
    chat.update(_tool_choice(req.tool_choice, [t["function"]["name"] for t in tools]))
    fmt = _output_format(req.output_config)
    if fmt is not None:
        if tools and chat.get("tool_choice") != "none":
            raise bad_request(
                "Invalid request: output_config.format: an answer is either tool use or a formatted answer, not "
                'both (send tool_choice {"type": "none"} or no tools).',
                param="output_config.format",
            )
        chat["response_format"] = fmt
    try:
        return ChatCompletionRequest.model_validate(chat)
    except ValidationError as exc:  # not expected: the checks above are Anthropic's, and stricter
        raise _invalid(exc.errors()[0], {"stop": "stop_sequences", "response_format": "output_config"}) from exc


def _stops(req: MessagesRequest) -> list[str] | None:
    for i, stop in enumerate(req.stop_sequences or []):
        if not stop:
            raise bad_request(
                f"Invalid request: stop_sequences[{i}]: a stop sequence cannot be empty.",
                param=f"stop_sequences[{i}]",
            )
    return req.stop_sequences or None


def _text_blocks(blocks: list[Any], where: str) -> str:
    """Text blocks' text, joined (anything but a text block: a 400 naming it)."""
    parts = []
    for j, block in enumerate(blocks):
        here = f"{where}[{j}]"
        kind = _kind(block, here)
        if kind != "text":
            raise unsupported_parameter(here, f"a {kind!r} content block here (only text blocks are)")
        parts.append(_text(block, here))
    return "".join(parts)


def _kind(block: Any, where: str) -> str:
    kind = block.get("type") if isinstance(block, dict) else None
    if not isinstance(kind, str):
        raise bad_request(f"Invalid request: {where}: a content block is an object with a string type.", param=where)
    return kind


def _text(block: dict[str, Any], where: str) -> str:
    _only(block, TEXT_KEYS, where)
    text = block.get("text")
    if not isinstance(text, str):
        raise bad_request(f"Invalid request: {where}.text: a text block's text must be a string.", param=where)
    return text


def _system(system: Any) -> list[dict[str, Any]]:
    if system is None:
        return []
    if isinstance(system, str):
        text = system
    elif isinstance(system, list):
        text = _text_blocks(system, "system")
    else:
        raise bad_request("Invalid request: system must be a string or a list of text blocks.", param="system")
    return [{"role": "system", "content": text}] if text else []


def _conversation(messages: list[InputMessage]) -> list[dict[str, Any]]:
    """The turns as OpenAI's chat messages: an assistant's `tool_use` blocks as its `tool_calls`, a user's
    `tool_result` blocks as `tool` messages (in their order, before the turn's text)."""
    if messages[-1].role == "assistant":
        raise bad_request(
            f"Invalid request: messages[{len(messages) - 1}]: the last message must be a user turn; continuing a "
            "final assistant message (prefill) is not supported.",
            param="messages",
        )
    out: list[dict[str, Any]] = []
    called: set[str] = set()
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        content = message.content
        if isinstance(content, str):
            out.append({"role": message.role, "content": content})
        elif not isinstance(content, list):
            raise bad_request(
                f"Invalid request: {where}.content must be a string or a list of content blocks.",
                param=f"{where}.content",
            )
        elif message.role == "assistant":
            out.append(_assistant(content, f"{where}.content", called))
        else:
            out.extend(_user(content, f"{where}.content", called))
    return out


def _assistant(blocks: list[Any], where: str, called: set[str]) -> dict[str, Any]:
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    for j, block in enumerate(blocks):
        here, kind = f"{where}[{j}]", _kind(block, f"{where}[{j}]")
        if kind == "text":
            texts.append(_text(block, here))
        elif kind == "tool_use":
            calls.append(_call(block, here))
            called.add(calls[-1]["id"])
        elif kind == "tool_result":
            raise bad_request(f"Invalid request: {here}: tool_result blocks belong to user turns.", param=here)
        else:
            raise _unsupported_block(kind, here)
    message: dict[str, Any] = {"role": "assistant", "content": "".join(texts) if texts or not calls else None}
    if calls:
        message["tool_calls"] = calls
    return message


def _call(block: dict[str, Any], where: str) -> dict[str, Any]:
    _only(block, TOOL_USE_KEYS, where)
    call_id, name, arguments = block.get("id"), block.get("name"), block.get("input")
    if not isinstance(call_id, str) or not call_id or not isinstance(name, str) or not isinstance(arguments, dict):
        raise bad_request(
            f"Invalid request: {where}: a tool_use block needs a string id and name and an object input.",
            param=where,
        )
    return {
        "id": call_id,
        "type": "function",
        "function": {"name": name, "arguments": orjson.dumps(arguments).decode()},
    }


def _user(blocks: list[Any], where: str, called: set[str]) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = []
    texts: list[str] = []
    for j, block in enumerate(blocks):
        here, kind = f"{where}[{j}]", _kind(block, f"{where}[{j}]")
        if kind == "text":
            texts.append(_text(block, here))
        elif kind == "tool_result":
            results.append(_result(block, here, called))
        elif kind == "tool_use":
            raise bad_request(f"Invalid request: {here}: tool_use blocks belong to assistant turns.", param=here)
        else:
            raise _unsupported_block(kind, here)
    return results + ([{"role": "user", "content": "".join(texts)}] if texts or not results else [])


def _result(block: dict[str, Any], where: str, called: set[str]) -> dict[str, Any]:
    _only(block, TOOL_RESULT_KEYS, where)
    call_id, content, is_error = block.get("tool_use_id"), block.get("content", ""), block.get("is_error", False)
    if not isinstance(call_id, str) or call_id not in called:
        raise bad_request(
            f"Invalid request: {where}.tool_use_id must be the id of a tool_use block in an earlier assistant turn.",
            param=f"{where}.tool_use_id",
        )
    if not isinstance(is_error, bool | None):
        raise bad_request(f"Invalid request: {where}.is_error must be a boolean.", param=f"{where}.is_error")
    if isinstance(content, list):
        text = _text_blocks(content, f"{where}.content")
    elif isinstance(content, str) or content is None:
        text = content or ""
    else:
        raise bad_request(
            f"Invalid request: {where}.content must be a string or a list of text blocks.", param=f"{where}.content"
        )
    return {"role": "tool", "tool_call_id": call_id, "content": TOOL_ERROR_PREFIX + text if is_error else text}


def _unsupported_block(kind: str, where: str) -> APIError:
    return unsupported_parameter(where, f"{kind!r} content blocks (gridserve's models read text)")


def _tools(tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Anthropic's custom tools as OpenAI's function tools (a 400 naming a server tool or a bad one)."""
    out: list[dict[str, Any]] = []
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        kind = tool.get("type")
        if kind not in (None, "custom"):
            raise unsupported_parameter(where, f"the server tool {kind!r} (gridserve serves custom tools only)")
        _refuse(tool, TOOL_REFUSED, where + ".")
        _only(tool, TOOL_KEYS | set(TOOL_REFUSED), where)
        name, schema, description = tool.get("name"), tool.get("input_schema"), tool.get("description", "")
        if not isinstance(name, str) or not TOOL_NAME.fullmatch(name):
            raise bad_request(
                f"Invalid request: {where}.name must be 1 to 64 letters, digits, _ or -.", param=f"{where}.name"
            )
        if not isinstance(schema, dict) or schema.get("type") != "object":
            raise bad_request(
                f'Invalid request: {where}.input_schema must be a JSON schema with "type": "object".',
                param=f"{where}.input_schema",
            )
        if not isinstance(description, str | None):
            raise bad_request(f"Invalid request: {where}.description must be a string.", param=f"{where}.description")
        if any(t["function"]["name"] == name for t in out):
            raise bad_request(f"Invalid request: {where}.name: two tools are named {name!r}.", param=f"{where}.name")
        function = {"name": name, "description": description or "", "parameters": schema}
        out.append({"type": "function", "function": function})
    if len(orjson.dumps(out)) > MAX_SCHEMA_CHARS:
        raise bad_request(
            f"Invalid request: tools: their schemas exceed {MAX_SCHEMA_CHARS} characters together.", param="tools"
        )
    return out


def _tool_choice(choice: dict[str, Any] | None, names: list[str]) -> dict[str, Any]:
    """Anthropic's tool_choice as OpenAI's `tool_choice` and `parallel_tool_calls`."""
    if choice is None:
        return {}
    _only(choice, {"type", "name", "disable_parallel_tool_use"}, "tool_choice")
    kind, single = choice.get("type"), choice.get("disable_parallel_tool_use", False)
    if not isinstance(single, bool):
        raise bad_request(
            "Invalid request: tool_choice.disable_parallel_tool_use must be a boolean.",
            param="tool_choice.disable_parallel_tool_use",
        )
    if kind in ("any", "tool") and not names:
        raise bad_request(f"Invalid request: tool_choice {kind!r} needs tools.", param="tool_choice")
    if kind == "tool":
        name = choice.get("name")
        if name not in names:
            raise bad_request(
                f"Invalid request: tool_choice.name names no declared tool ({name!r}).", param="tool_choice.name"
            )
        return {"tool_choice": {"type": "function", "function": {"name": name}}}
    openai = {"auto": "auto", "any": "required", "none": "none"}.get(kind if isinstance(kind, str) else "")
    if openai is None:
        raise bad_request(
            "Invalid request: tool_choice.type must be auto, any, tool or none.", param="tool_choice.type"
        )
    return {"tool_choice": openai, **({"parallel_tool_calls": False} if single else {})}


def _output_format(config: dict[str, Any] | None) -> dict[str, Any] | None:
    """`output_config.format` as OpenAI's `response_format` (json_schema), checked to compile to a grammar."""
    if config is None:
        return None
    _refuse(config, {"effort": (_off(), "an effort level")}, "output_config.")
    _only(config, {"format", "effort"}, "output_config")
    fmt = config.get("format")
    if fmt is None:
        return None
    schema = fmt.get("schema") if isinstance(fmt, dict) else None
    if not isinstance(fmt, dict) or fmt.get("type") != "json_schema" or not isinstance(schema, dict):
        raise bad_request(
            'Invalid request: output_config.format must be {"type": "json_schema", "schema": {...}}.',
            param="output_config.format",
        )
    _only(fmt, {"type", "schema"}, "output_config.format")
    text = orjson.dumps(schema).decode()
    problem = (
        f"more than {MAX_SCHEMA_CHARS} characters"
        if len(text) > MAX_SCHEMA_CHARS
        else grammar.check(ResponseFormat(type="json_schema", schema_text=text, strict=True))
    )
    if problem:
        raise bad_request(
            f"Invalid request: output_config.format.schema cannot be generated: {problem}",
            param="output_config.format.schema",
        )
    return {"type": "json_schema", "json_schema": {"name": "output", "schema": schema, "strict": True}}


# -- the answer ------------------------------------------------------------------------------------------------


def _event(kind: str, data: dict[str, Any]) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


def tool_use_id(call_id: str) -> str:
    """A call's id as Anthropic writes one (`toolu_...`), from the gateway's (`call_...`)."""
    return call_id if call_id.startswith(TOOL_ID_PREFIX) else TOOL_ID_PREFIX + call_id.removeprefix("call_")


def usage(answer: Answer) -> dict[str, int]:
    """Anthropic's usage: `input_tokens` are the prompt tokens not read from a cache (the node's prefix cache)."""
    cached = max(0, min(answer.cached_tokens, answer.prompt_tokens))
    return {
        "input_tokens": answer.prompt_tokens - cached,
        "output_tokens": answer.completion_tokens,
        "cache_read_input_tokens": cached,
        "cache_creation_input_tokens": 0,
    }


class MessageFormatter:
    """One answer as Anthropic's `message` or its stream of events (a Renderer and CallStreamer:
    gateway/api/surface.py). Text is content block 0, opened by the first text; each tool call is a `tool_use`
    block, streamed as it is made (its arguments as `input_json_delta`s)."""

    TEXT_DELTA = (
        b"event: content_block_delta\n"
        b'data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":'
    )

    def __init__(self, response_id: str, model: str, stops: tuple[str, ...] = ()) -> None:
        self.id, self.model = response_id, model
        self.stops = stops
        """The request's stop sequences: a node's word that one of them ended the answer is taken, no other."""
        self.blocks = 0
        """Content blocks opened so far (streamed)."""
        self.calls_streamed = False
        """Tool calls went out as they were made (`call_delta`): `end` closes the last, sends none whole."""

    def stopped(self, answer: Answer) -> dict[str, Any]:
        """`stop_reason` and `stop_sequence` of an answer that has ended."""
        if answer.reason == "stop" and answer.stop_sequence is not None and answer.stop_sequence in self.stops:
            return {"stop_reason": "stop_sequence", "stop_sequence": answer.stop_sequence}
        return {"stop_reason": STOP_REASONS.get(answer.reason, "end_turn"), "stop_sequence": None}

    def message(self, content: list[dict[str, Any]], answer: Answer | None) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": content,
            **(self.stopped(answer) if answer is not None else {"stop_reason": None, "stop_sequence": None}),
            "usage": usage(answer or Answer("", 0, 0)),
        }

    def start(self) -> bytes:
        # the prompt's token count comes with the answer's end: message_delta's usage carries it
        return _event("message_start", {"type": "message_start", "message": self.message([], None)})

    def text(self, text: str) -> bytes:
        head = b""
        if not self.blocks:
            self.blocks = 1
            block = {"type": "text", "text": ""}
            head = _event("content_block_start", {"type": "content_block_start", "index": 0, "content_block": block})
        return head + self.TEXT_DELTA + orjson.dumps(text) + b"}}\n\n"

    def call_delta(self, delta: CallDelta) -> bytes:
        """A call's `tool_use` block opened (the block before it closed), or more of its input's JSON."""
        if delta.name is None:
            return self._input(self.blocks - 1, delta.arguments)
        out = self._stop(self.blocks - 1) if self.blocks else b""
        self.calls_streamed = True
        return out + self._tool_use(delta.id, delta.name)

    def _tool_use(self, call_id: str, name: str) -> bytes:
        index, self.blocks = self.blocks, self.blocks + 1
        block = {"type": "tool_use", "id": tool_use_id(call_id), "name": name, "input": {}}
        return _event("content_block_start", {"type": "content_block_start", "index": index, "content_block": block})

    @staticmethod
    def _input(index: int, partial: str) -> bytes:
        delta = {"type": "input_json_delta", "partial_json": partial}
        return _event("content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta})

    def end(self, answer: Answer) -> bytes:
        out = [self._stop(self.blocks - 1)] if self.blocks else []
        for call in answer.calls if not self.calls_streamed else ():
            out += [self._tool_use(call.id, call.name), self._input(self.blocks - 1, call.arguments_text)]
            out.append(self._stop(self.blocks - 1))
        delta = self.stopped(answer)
        out.append(_event("message_delta", {"type": "message_delta", "delta": delta, "usage": usage(answer)}))
        return b"".join(out)

    @staticmethod
    def _stop(index: int) -> bytes:
        return _event("content_block_stop", {"type": "content_block_stop", "index": index})

    async def keep(self, answer: Answer) -> None:
        return None

    def close(self) -> bytes:
        return _event("message_stop", {"type": "message_stop"})

    def error(self, message: str, code: str) -> bytes:
        return _event("error", {"type": "error", "error": {"type": "api_error", "message": message}})

    def whole(self, answer: Answer) -> dict[str, Any]:
        content: list[dict[str, Any]] = [{"type": "text", "text": answer.text}] if answer.text else []
        for call in answer.calls:
            content.append({"type": "tool_use", "id": tool_use_id(call.id), "name": call.name, "input": call.arguments})
        return self.message(content, answer)


class CountFormatter(MessageFormatter):
    """A token count's answer: the prompt's tokens as the node that served the one-token answer counted them
    (cached or not). Never streamed: count_tokens takes no `stream`."""

    def whole(self, answer: Answer) -> dict[str, Any]:
        return {"input_tokens": answer.prompt_tokens}


def renderer(ctx: ApiContext, req: SamplingFields, response_id: str, model: str) -> Renderer:
    stops = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
    return MessageFormatter(response_id, model, stops)


def error(exc: APIError) -> bytes:
    """Anthropic's error body; the message names the parameter at fault (Anthropic's errors have no `param`)."""
    kind = ERROR_TYPES.get(exc.status, "invalid_request_error" if exc.status < 500 else "api_error")
    message = exc.message
    if exc.param and exc.param not in message:
        message += f" (parameter: {exc.param})"
    return orjson.dumps({"type": "error", "error": {"type": kind, "message": message}})


MESSAGES = Surface(
    "messages",
    "chat",
    "msg_",
    read,
    renderer,
    error,
    params=(("response_format", "output_config"), ("stop", "stop_sequences")),
)

COUNT_TOKENS = Surface(
    "count_tokens",
    "chat",
    "msg_",
    read_count,
    lambda ctx, req, response_id, model: CountFormatter(response_id, model),
    error,
    params=MESSAGES.params,
)

__all__ = ["COUNT_TOKENS", "MESSAGES", "CountTokensRequest", "MessageFormatter", "MessagesRequest", "translate"]
