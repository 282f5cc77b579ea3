"""OpenAI's Responses API: `POST /v1/responses` (a Surface over the chat core: gateway/api/surface.py), and
`GET` / `DELETE /v1/responses/{id}` and `GET /v1/responses/{id}/input_items` (gateway/api/input_items.py).

A Responses request becomes a chat completion request: `instructions` a system message first, then the stored
conversation of `previous_response_id` (its input and its answer, as chat messages; never its instructions, as
OpenAI documents), then `input`'s items (messages, function calls and their outputs); function tools become chat
tools and `text.format` a `response_format`. So routing, receipts, audits, failover and tool grammars are the chat
completions' own. The answer is written as a Response object, whole or as OpenAI's `response.*` events, and
unless `store` is false it is stored, with the conversation including it, before it goes out: a client can chain
at once, through any gateway on the same database (the `responses` table, store/db.py).

`background: true`: the request is admitted (its key's limits) and stored `queued`, the client answered at once,
and a task of this gateway's `ResponseStore` runs it: `in_progress`, then what the answer's writer keeps, or `failed`
with the error. `POST /v1/responses/{id}/cancel` stops it (`cancelled`); through another gateway on the same
database, the mark is stored and the gateway running it keeps it when its answer comes. A stopping gateway gives
those under way its drain time, then stores them failed (`gateway_stopped`)."""

import asyncio
import dataclasses
import logging
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, StringConstraints, ValidationError

from gridserve.engines import grammar
from gridserve.gateway.api import input_items
from gridserve.gateway.api.errors import APIError, bad_request, json_object, unsupported_parameter
from gridserve.gateway.api.openai_api import ApiContext, Reply, admit, run_admitted, to_job
from gridserve.gateway.api.schemas import ChatCompletionRequest, GridOptions, SamplingFields
from gridserve.gateway.api.surface import Answer, Renderer, Surface, openai_error
from gridserve.gateway.api.tools import MAX_TOOLS, CallDelta
from gridserve.gateway.tenancy import ApiKey
from gridserve.gateway.tenancy.limits import CALLER, CURRENT, Admission
from gridserve.store import Store
from gridserve.store.group_commit import GroupCommit
from gridserve.types.wire import ResponseFormat

log = logging.getLogger("gridserve.gateway")

MAX_METADATA = 16
ROLES = {"user": "user", "assistant": "assistant", "system": "system", "developer": "system"}
"""An input message's role as the chat role the model reads (OpenAI's `developer` is the system's)."""
TEXT_PARTS = ("input_text", "output_text")
MEDIA_PARTS = ("input_image", "input_file", "input_audio")


def _off(value: Any) -> bool:
    """A parameter is off when absent, null, false, zero or empty (what asks for the default behaviour)."""
    return value is None or value is False or value in (0, "", [], {})


UNSUPPORTED: dict[str, tuple[Callable[[Any], bool], str]] = {
    "include": (_off, "additional output data"),
    "reasoning": (lambda v: _off(v) or (isinstance(v, dict) and all(_off(x) for x in v.values())), "reasoning"),
    "conversation": (_off, "server-side conversations (use previous_response_id)"),
    "prompt": (_off, "stored prompt templates"),
    "max_tool_calls": (_off, "a limit on built-in tool calls"),
    "top_logprobs": (_off, "log probabilities"),
    "prompt_cache_retention": (_off, "a prompt cache retention policy"),
    "service_tier": (lambda v: v in (None, "auto", "default"), "a service tier other than auto or default"),
}
"""Responses parameters gridserve cannot honour: refused with a 400 naming them unless off (what asks for the
default behaviour), never served as if they were absent."""


# -- the request ------------------------------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class ResponsesTextConfig(_Strict):
    format: dict[str, Any] | None = Field(
        None,
        description='`{"type": "text"}`, `{"type": "json_object"}` or `{"type": "json_schema", "name", "schema", '
        '"strict"}`: the answer is generated under the schema\'s grammar.',
    )
    verbosity: Any = Field(None, description="medium (the default) only.")


class ResponsesStreamOptions(_Strict):
    include_obfuscation: bool | None = Field(None, description="Accepted; gridserve pads no events.")


Metadata = dict[Annotated[str, StringConstraints(max_length=64)], Annotated[str, StringConstraints(max_length=512)]]


class ResponsesRequest(_Strict):
    """OpenAI's Responses request as gridserve reads it: a field it does not know is a 400 naming it
    (`unknown_parameter`), one it cannot honour a 400 `unsupported_parameter` unless off."""

    model: str = Field(min_length=1)
    input: str | list[dict[str, Any]] = Field(
        description="A user message, or a list of items: messages (`role`, `content`: a string or input_text / "
        "output_text parts), `function_call` and `function_call_output` items."
    )
    instructions: str | None = Field(None, description="A system message first (not carried to a continuation).")
    previous_response_id: str | None = Field(
        None, max_length=200, description="Continue a stored response: its conversation comes before `input`."
    )
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    tools: list[dict[str, Any]] | None = Field(
        None, max_length=MAX_TOOLS, description="Function tools (`type` function, `name`, `parameters`)."
    )
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    text: ResponsesTextConfig | None = None
    store: bool | None = Field(None, description="Keep the response for retrieval and continuation (default true).")
    stream: bool | None = None
    stream_options: ResponsesStreamOptions | None = None
    metadata: Metadata | None = Field(None, max_length=MAX_METADATA)
    truncation: Literal["auto", "disabled"] | None = Field(
        None, description="Accepted; gridserve never drops input: a prompt over the context is a 400."
    )
    user: str | None = Field(None, description="Accepted, no effect.")
    safety_identifier: str | None = Field(None, description="Accepted, no effect.")
    prompt_cache_key: str | None = Field(None, description="Accepted, no effect (prefix routing needs no key).")
    seed: int | None = Field(None, description="gridserve: sample reproducibly.")
    gridserve: GridOptions = Field(default_factory=GridOptions)
    background: bool | None = Field(
        None,
        description="Run in the background: answered at once (status `queued`), then polled with GET "
        "/v1/responses/{id} and cancelled with POST /v1/responses/{id}/cancel. Needs `store`; not streamed.",
    )
    include: Any = None
    reasoning: Any = None
    conversation: Any = None
    prompt: Any = None
    max_tool_calls: Any = None
    top_logprobs: Any = None
    prompt_cache_retention: Any = None
    service_tier: Any = None


@dataclass(frozen=True)
class Spec:
    """What the Response object echoes and keeps, besides the answer."""

    request: ResponsesRequest
    conversation: list[dict[str, Any]]
    """The chat messages before this answer, without the instructions (what a continuation starts from)."""
    tools: list[dict[str, Any]]
    tool_choice: Any
    text_format: dict[str, Any]
    created_at: int | None = None
    """When the response was made, where it was answered before it ran (a background one)."""
    before: int = 0
    """How many of `conversation`'s messages are the stored conversation it continues (`previous_response_id`)."""

    def turn(self, *answer: dict[str, Any]) -> "Turn":
        """What this response adds to the conversation it continues: its input, then `answer`."""
        return Turn(self.request.previous_response_id, [*self.conversation[self.before :], *answer])


class ResponsesChat(ChatCompletionRequest):
    """The chat completion request a Responses request becomes, with what its Response object needs."""

    _spec: Spec | None = PrivateAttr(None)

    def spec(self) -> Spec:
        assert self._spec is not None, "made by read()"
        return self._spec


_NESTED = {"text", "stream_options", "gridserve"}
CHAT_NAMES = {"messages": "input", "max_completion_tokens": "max_output_tokens", "response_format": "text.format"}
"""The Responses parameter each chat completion field comes from."""


def _param(loc: tuple[int | str, ...]) -> str | None:
    """The parameter a validation error is about (the nested field of an object parameter)."""
    if not loc:
        return None
    name = str(loc[0])
    if name in _NESTED and len(loc) > 1 and isinstance(loc[1], str) and loc[1].isidentifier():
        return f"{name}.{loc[1]}"
    return name


def _parse(body: bytes) -> ResponsesRequest:
    raw = json_object(body)
    try:
        req = ResponsesRequest.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = _param(first["loc"])
        if first["type"] == "extra_forbidden":
            raise APIError(400, f"Unknown parameter: '{param}'.", param=param, code="unknown_parameter") from exc
        raise bad_request(f"Invalid request: {param}: {first['msg']}", param=param) from exc
    for name, (off, what) in UNSUPPORTED.items():
        if not off(getattr(req, name)):
            raise unsupported_parameter(name, what)
    if req.text is not None and req.text.verbosity not in (None, "medium"):
        raise unsupported_parameter("text.verbosity", "a verbosity other than medium")
    if req.background and req.stream:
        raise unsupported_parameter("stream", "streaming a background response (poll GET /v1/responses/{id})")
    if req.background and req.store is False:
        raise bad_request("Invalid request: a background response is stored: store must not be false.", param="store")
    return req


# -- tools and formats ------------------------------------------------------------------------------------------


def _tool(raw: dict[str, Any], i: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """tools[i] as (the chat tool, the Response's echo of it)."""
    kind = raw.get("type")
    if kind != "function":
        if isinstance(kind, str) and kind:
            raise unsupported_parameter(f"tools[{i}]", f"the built-in tool {kind!r} (only function tools)")
        raise bad_request(f"Invalid request: tools[{i}].type must be function.", param=f"tools[{i}].type")
    name, parameters = raw.get("name"), raw.get("parameters")
    description, strict = raw.get("description"), raw.get("strict")
    if not isinstance(name, str) or not 1 <= len(name) <= 64:
        raise bad_request(f"Invalid request: tools[{i}].name must be 1 to 64 characters.", param=f"tools[{i}].name")
    if parameters is not None and not isinstance(parameters, dict):
        raise bad_request(
            f"Invalid request: tools[{i}].parameters must be a JSON schema.", param=f"tools[{i}].parameters"
        )
    if not isinstance(description, str | None) or not isinstance(strict, bool | None):
        raise bad_request(
            f"Invalid request: tools[{i}].description must be a string and strict a boolean.", param=f"tools[{i}]"
        )
    function = {"name": name, "description": description or "", "parameters": parameters}
    echo = {"type": "function", **function, "description": description, "strict": strict is not False}
    return {"type": "function", "function": function}, echo


def _tool_choice(choice: str | dict[str, Any] | None) -> tuple[Any, Any]:
    """(the chat tool_choice, the Response's echo of it)."""
    if choice is None or isinstance(choice, str):
        return choice, choice or "auto"
    kind, name = choice.get("type"), choice.get("name")
    if kind == "function" and isinstance(name, str):
        return {"type": "function", "function": {"name": name}}, {"type": "function", "name": name}
    if kind == "function":
        raise bad_request("Invalid request: tool_choice.name must name a function tool.", param="tool_choice.name")
    if isinstance(kind, str) and kind:
        raise unsupported_parameter("tool_choice", f"a tool choice of type {kind!r} (only function tools)")
    raise bad_request(
        'Invalid request: tool_choice must be none, auto, required or {"type": "function", "name": ...}.',
        param="tool_choice",
    )


def _text_format(raw: dict[str, Any] | None) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """text.format as (the chat response_format, the Response's echo of it), checked to compile to a grammar."""
    kind = (raw or {}).get("type", "text")
    if raw is None or kind == "text":
        return None, {"type": "text"}
    if kind == "json_object":
        return {"type": "json_object"}, {"type": "json_object"}
    if kind != "json_schema":
        raise bad_request(
            f"Invalid request: text.format.type must be text, json_object or json_schema, not {kind!r}.",
            param="text.format.type",
        )
    name, schema, strict = raw.get("name"), raw.get("schema"), raw.get("strict")
    if not isinstance(name, str) or not 1 <= len(name) <= 64:
        raise bad_request("Invalid request: text.format.name must be 1 to 64 characters.", param="text.format.name")
    if not isinstance(schema, dict):
        raise bad_request("Invalid request: text.format.schema must be a JSON schema.", param="text.format.schema")
    if not isinstance(strict, bool | None):
        raise bad_request("Invalid request: text.format.strict must be a boolean.", param="text.format.strict")
    _check_schema(name, schema, bool(strict))
    echo = {"type": "json_schema", "name": name, "schema": schema, "strict": bool(strict)}
    if "description" in raw:
        echo["description"] = raw["description"]
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": bool(strict)}}, echo


def _check_schema(name: str, schema: dict[str, Any], strict: bool) -> None:
    try:
        fmt = ResponseFormat(type="json_schema", schema_text=orjson.dumps(schema).decode(), name=name, strict=strict)
    except ValidationError as exc:
        raise bad_request(
            f"Invalid request: text.format: {exc.errors()[0]['msg']}.", param="text.format.schema"
        ) from exc
    problem = grammar.check(fmt)
    if problem:
        raise bad_request(
            f"Invalid request: text.format.schema cannot be generated: {problem}", param="text.format.schema"
        )


# -- input items as chat messages -------------------------------------------------------------------------------


def _text(content: Any, where: str) -> str:
    """A message's content (a string, or text parts) as its text."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise bad_request(f"Invalid request: {where} must be a string or a list of parts.", param=where)
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in MEDIA_PARTS:
            raise unsupported_parameter(f"{where}[{j}]", f"{kind} content (gridserve's models read text only)")
        if kind not in TEXT_PARTS or not isinstance(part.get("text"), str):
            raise bad_request(
                f"Invalid request: {where}[{j}] must be an input_text or output_text part with a text.",
                param=f"{where}[{j}]",
            )
        texts.append(part["text"])
    return "".join(texts)


def _message(item: dict[str, Any], where: str) -> dict[str, Any]:
    role = item.get("role")
    if role not in ROLES:
        raise bad_request(
            f"Invalid request: {where}.role must be user, assistant, system or developer.", param=f"{where}.role"
        )
    return {"role": ROLES[role], "content": _text(item.get("content"), f"{where}.content")}


def _string(item: dict[str, Any], key: str, where: str) -> str:
    value = item.get(key)
    if not isinstance(value, str) or not value:
        raise bad_request(f"Invalid request: {where}.{key} must be a non-empty string.", param=f"{where}.{key}")
    return value


def _function_call(item: dict[str, Any], where: str) -> dict[str, Any]:
    """A function_call item as a chat tool call."""
    call_id, name = _string(item, "call_id", where), _string(item, "name", where)
    arguments = item.get("arguments")
    if not isinstance(arguments, str):
        raise bad_request(f"Invalid request: {where}.arguments must be a JSON string.", param=f"{where}.arguments")
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def _call_output(item: dict[str, Any], where: str, calls: set[str]) -> dict[str, Any]:
    """A function_call_output item as a chat tool message (its call must come before it)."""
    call_id = _string(item, "call_id", where)
    if call_id not in calls:
        raise bad_request(
            f"Invalid request: no function call with call_id {call_id!r} comes before {where}.",
            param=f"{where}.call_id",
        )
    return {"role": "tool", "tool_call_id": call_id, "content": _text(item.get("output"), f"{where}.output")}


def _calls_in(messages: list[dict[str, Any]]) -> set[str]:
    return {str(c.get("id")) for m in messages for c in m.get("tool_calls") or []}


def _items(given: str | list[dict[str, Any]], before: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`input` as chat messages (`before`: the conversation it continues); consecutive function calls are one
    assistant message's tool calls."""
    if isinstance(given, str):
        return [{"role": "user", "content": given}]
    if not given:
        raise bad_request("Invalid request: input must have at least one item.", param="input")
    messages: list[dict[str, Any]] = []
    calls = _calls_in(before)
    for i, item in enumerate(given):
        where = f"input[{i}]"
        kind = item.get("type", "message" if "role" in item else None)
        if kind == "message":
            messages.append(_message(item, where))
        elif kind == "function_call":
            call = _function_call(item, where)
            calls.add(call["id"])
            last = messages[-1] if messages else None
            if last is not None and last.get("tool_calls"):
                last["tool_calls"].append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            messages.append(_call_output(item, where, calls))
        elif isinstance(kind, str) and kind:
            raise unsupported_parameter(f"{where}.type", f"{kind!r} input items")
        else:
            raise bad_request(
                f"Invalid request: {where} must be a message, function_call or function_call_output item.",
                param=f"{where}.type",
            )
    return messages


# -- read -------------------------------------------------------------------------------------------------------


async def _previous(ctx: ApiContext, response_id: str | None) -> list[dict[str, Any]]:
    """The stored conversation a continuation starts from ([] without one; a 404 when there is no such response)."""
    if response_id is None:
        return []
    found = await ctx.responses.get(response_id, CALLER.get()) if ctx.responses is not None else None
    if found is None:
        raise APIError(
            404,
            f"Previous response with id '{response_id}' not found.",
            param="previous_response_id",
            code="previous_response_not_found",
        )
    status = found.response.get("status")
    if status not in ("completed", "incomplete"):  # a background one under way, failed or cancelled: no answer
        raise bad_request(
            f"Previous response with id '{response_id}' is {status}: only a finished response can be continued.",
            param="previous_response_id",
        )
    return found.conversation


async def read(ctx: ApiContext, body: bytes) -> SamplingFields:
    """A Responses request as the chat completion request it becomes (a 4xx APIError when it cannot be)."""
    req = _parse(body)
    converted = [_tool(raw, i) for i, raw in enumerate(req.tools or [])]
    choice, choice_echo = _tool_choice(req.tool_choice)
    response_format, format_echo = _text_format(req.text.format if req.text is not None else None)
    before = await _previous(ctx, req.previous_response_id)
    conversation = [*before, *_items(req.input, before)]
    system = [{"role": "system", "content": req.instructions}] if req.instructions is not None else []
    fields = {
        "model": req.model,
        "messages": system + conversation,
        "max_completion_tokens": req.max_output_tokens,
        "tools": [chat for chat, _ in converted] or None,
        "tool_choice": choice,
        "parallel_tool_calls": req.parallel_tool_calls,
        "response_format": response_format,
        "stream": bool(req.stream),
        "seed": req.seed,
        "gridserve": req.gridserve,
    }
    fields |= {k: v for k, v in (("temperature", req.temperature), ("top_p", req.top_p)) if v is not None}
    try:
        chat = ResponsesChat.model_validate(fields)
    except ValidationError as exc:  # what the checks above let through and chat's own bounds refuse
        first = exc.errors()[0]
        param = CHAT_NAMES.get(str(first["loc"][0]), str(first["loc"][0])) if first["loc"] else None
        raise bad_request(f"Invalid request: {param}: {first['msg']}", param=param) from exc
    tools_echo = [echo for _, echo in converted]
    chat._spec = Spec(req, conversation, tools_echo, choice_echo, format_echo, before=len(before))
    return chat


# -- the Response object ----------------------------------------------------------------------------------------


def _usage(answer: Answer) -> dict[str, Any]:
    cached = max(0, min(answer.cached_tokens, answer.prompt_tokens))
    return {
        "input_tokens": answer.prompt_tokens,
        "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": 0},
        "output_tokens": answer.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": answer.prompt_tokens + answer.completion_tokens,
    }


def _output_text(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _message_item(item_id: str, status: str, content: list[dict[str, Any]]) -> dict[str, Any]:
    return {"type": "message", "id": item_id, "status": status, "role": "assistant", "content": content}


def _call_item(item_id: str, call_id: str, name: str, arguments: str, status: str) -> dict[str, Any]:
    return {
        "type": "function_call",
        "id": item_id,
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
        "status": status,
    }


def _status(answer: Answer) -> str:
    return "incomplete" if answer.reason == "length" else "completed"


def _assistant(answer: Answer) -> dict[str, Any]:
    """The answer as the conversation's next chat message."""
    if answer.calls:
        return {"role": "assistant", "content": answer.text or None, "tool_calls": [c.openai() for c in answer.calls]}
    return {"role": "assistant", "content": answer.text}


class ResponseWriter:
    """One answer as a Response object, whole or as OpenAI's `response.*` server-sent events (a Renderer), kept
    in the store unless the request said `store: false`."""

    def __init__(self, ctx: ApiContext, spec: Spec, response_id: str, model: str) -> None:
        self.spec, self.id, self.model = spec, response_id, model
        self.store = ctx.responses if spec.request.store is not False else None
        self.created_at = spec.created_at or int(time.time())
        self.message_id = "msg_" + secrets.token_hex(24)
        self.sequence = 0
        self.opened = False
        """Whether the message item has been announced (its first text streamed)."""
        self.said: list[str] = []
        self.streamed: list[list[str]] = []
        """Per call streamed as it was made (`call_delta`): [its item's id, its arguments so far]."""
        self.output: list[dict[str, Any]] | None = None
        self.final: dict[str, Any] | None = None
        self.store_error = ""
        head = {"type": "response.output_text.delta", "item_id": self.message_id, "output_index": 0}
        self._delta = (
            b"event: response.output_text.delta\ndata: "
            + orjson.dumps({**head, "content_index": 0, "logprobs": []})[:-1]
        )

    # -- the object

    def body(self, status: str, output: list[dict[str, Any]], answer: Answer | None = None) -> dict[str, Any]:
        req = self.spec.request
        length = answer is not None and answer.reason == "length"
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "background": req.background is True,
            "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if length else None,
            "instructions": req.instructions,
            "max_output_tokens": req.max_output_tokens,
            "max_tool_calls": None,
            "model": self.model,
            "output": output,
            "parallel_tool_calls": req.parallel_tool_calls is not False,
            "previous_response_id": req.previous_response_id,
            "prompt_cache_key": req.prompt_cache_key,
            "reasoning": {"effort": None, "summary": None},
            "safety_identifier": req.safety_identifier,
            "service_tier": "default",
            "store": self.store is not None,
            "temperature": 1.0 if req.temperature is None else req.temperature,
            "text": {"format": self.spec.text_format, "verbosity": "medium"},
            "tool_choice": self.spec.tool_choice,
            "tools": self.spec.tools,
            "top_logprobs": 0,
            "top_p": 1.0 if req.top_p is None else req.top_p,
            "truncation": req.truncation or "disabled",
            "usage": _usage(answer) if answer is not None else None,
            "user": req.user,
            "metadata": req.metadata or {},
        }

    def items(self, answer: Answer) -> list[dict[str, Any]]:
        """The answer's output items (made once: the stream's and the stored object's ids are the same)."""
        if self.output is None:
            output = []
            if self.opened or not answer.calls:
                output.append(_message_item(self.message_id, _status(answer), [_output_text(answer.text)]))
            for i, call in enumerate(answer.calls):
                item_id = self.streamed[i][0] if i < len(self.streamed) else "fc_" + secrets.token_hex(24)
                output.append(_call_item(item_id, call.id, call.name, call.arguments_text, "completed"))
            self.output = output
        return self.output

    def settle(self, answer: Answer) -> dict[str, Any]:
        if self.final is None:
            self.final = self.body(_status(answer), self.items(answer), answer)
            if _status(answer) == "completed":
                self.final["completed_at"] = int(time.time())
        return self.final

    # -- the Renderer

    def event(self, kind: str, **fields: Any) -> bytes:
        data = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"

    def start(self) -> bytes:
        snapshot = self.body("in_progress", [])
        return self.event("response.created", response=snapshot) + self.event("response.in_progress", response=snapshot)

    def _open(self) -> bytes:
        self.opened = True
        item = _message_item(self.message_id, "in_progress", [])
        where = {"item_id": self.message_id, "output_index": 0, "content_index": 0}
        return self.event("response.output_item.added", output_index=0, item=item) + self.event(
            "response.content_part.added", **where, part=_output_text("")
        )

    def text(self, text: str) -> bytes:
        opening = b"" if self.opened else self._open()
        self.said.append(text)
        number = self.sequence
        self.sequence += 1
        return opening + self._delta + b',"delta":' + orjson.dumps(text) + b',"sequence_number":%d}\n\n' % number

    def call_delta(self, delta: CallDelta) -> bytes:
        """A call's `function_call` item added, or more of its arguments (a CallStreamer: gateway/api/surface.py)."""
        index = delta.index + (1 if self.opened else 0)
        if delta.name is not None:
            self.streamed.append(["fc_" + secrets.token_hex(24), ""])
            item = _call_item(self.streamed[-1][0], delta.id, delta.name, "", "in_progress")
            return self.event("response.output_item.added", output_index=index, item=item)
        item_id = self.streamed[delta.index][0]
        self.streamed[delta.index][1] += delta.arguments
        return self.event(
            "response.function_call_arguments.delta", item_id=item_id, output_index=index, delta=delta.arguments
        )

    def end(self, answer: Answer) -> bytes:
        out = []
        for index, item in enumerate(self.items(answer)):
            if item["type"] == "message":
                out.append(self._message_done(item))
            elif index - (1 if self.opened else 0) < len(self.streamed):
                out.append(self._call_done(index, item))
            else:
                out.append(self._call_added(index, item) + self._call_done(index, item))
        return b"".join(out)

    def _message_done(self, item: dict[str, Any]) -> bytes:
        opening = b"" if self.opened else self._open()
        text = item["content"][0]["text"]
        where = {"item_id": self.message_id, "output_index": 0, "content_index": 0}
        return (
            opening
            + self.event("response.output_text.done", **where, text=text, logprobs=[])
            + self.event("response.content_part.done", **where, part=_output_text(text))
            + self.event("response.output_item.done", output_index=0, item=item)
        )

    def _call_added(self, index: int, item: dict[str, Any]) -> bytes:
        """A call's item and its arguments at once (a call not streamed as it was made)."""
        where = {"item_id": item["id"], "output_index": index}
        return self.event(
            "response.output_item.added", output_index=index, item={**item, "arguments": "", "status": "in_progress"}
        ) + self.event("response.function_call_arguments.delta", **where, delta=item["arguments"])

    def _call_done(self, index: int, item: dict[str, Any]) -> bytes:
        where = {"item_id": item["id"], "output_index": index}
        return self.event("response.function_call_arguments.done", **where, arguments=item["arguments"]) + self.event(
            "response.output_item.done", output_index=index, item=item
        )

    def stopped(self, status: str, message: str = "", code: str = "") -> dict[str, Any]:
        """The object of a response that did not end by itself: `queued` or `in_progress` (nothing yet),
        `cancelled`, or `failed` with an error (`message`, `code`)."""
        out = self.body(status, [])
        if message:
            out["error"] = {"code": code or "server_error", "message": message}
        return out

    async def keep(self, answer: Answer) -> None:
        final = self.settle(answer)
        if self.store is None:
            return
        try:
            turn = self.spec.turn(_assistant(answer))
            if self.spec.request.background:  # stored as queued: moves on unless cancelled or deleted meanwhile
                await self.store.advance(final, turn.messages)
            else:
                await self.store.put(final, turn, CALLER.get())
        except Exception as exc:  # the client is told (close, whole): never an answer it believes stored
            log.exception("could not store response %s", self.id)
            self.store_error = f"the response could not be stored ({type(exc).__name__}); send it again"

    def close(self) -> bytes:
        if self.final is None:
            return self.error("the answer ended without a finish reason", "no_finish")
        if self.store_error:
            return self.error(self.store_error, "store_unavailable")
        kind = "response.completed" if self.final["status"] == "completed" else "response.incomplete"
        return self.event(kind, response=self.final)

    def error(self, message: str, code: str) -> bytes:
        partial = [_message_item(self.message_id, "incomplete", [_output_text("".join(self.said))])]
        failed = self.body("failed", partial if self.opened else [])
        failed["error"] = {"code": "server_error", "message": f"{message} ({code})"}
        return self.event("response.failed", response=failed)

    def whole(self, answer: Answer) -> dict[str, Any]:
        if self.store_error:
            raise APIError(503, self.store_error, type_="service_unavailable", code="store_unavailable")
        return self.settle(answer)


def renderer(ctx: ApiContext, req: SamplingFields, response_id: str, model: str) -> Renderer:
    assert isinstance(req, ResponsesChat), "read() makes the request"
    return ResponseWriter(ctx, req.spec(), response_id, model)


RESPONSES = Surface(
    "responses",
    "chat",
    "resp_",
    read,
    renderer,
    openai_error,
    detached=lambda ctx, req, surface, key: _detached(ctx, req, surface, key),
    params=(
        ("response_format.json_schema", "text.format"),
        ("response_format", "text.format"),
        ("max_completion_tokens", "max_output_tokens"),
        ("max_tokens", "max_output_tokens"),
        ("messages", "input"),
    ),
)


# -- the store --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Turn:
    """What a stored response adds to a conversation: the stored response it continues (None: none) and its own
    chat messages (its input, then its answer). A chain of responses stores each turn once: O(turns), where storing
    each response's whole conversation took O(turns^2)."""

    previous_id: str | None
    messages: list[dict[str, Any]]


@dataclass(frozen=True)
class Stored:
    response: dict[str, Any]
    conversation: list[dict[str, Any]]
    """The whole conversation up to and including its answer (its chain's turns, oldest first)."""
    turn: list[dict[str, Any]]
    """Its own turn's messages, as stored."""


@dataclass(frozen=True)
class Background:
    """A background response to run: its writer, its owner (an API key's id), the request's admission (closed
    when it ends), the work (the request placed, generated and kept) and how its errors are named."""

    writer: "ResponseWriter"
    owner: str | None
    admission: Admission | None
    work: Callable[[], Any]
    rename: Callable[[APIError], APIError]


TERMINAL = ("completed", "incomplete", "failed", "cancelled")
"""A response in one of these states has ended."""
UNDER_WAY = ("queued", "in_progress")
"""A background response in one of these states has not."""
STOPPED = "the gateway stopped before the response was done; create it again"


class ResponseStore:
    """Stored responses (store/db.py `responses`), read and written off the event loop; writes that come
    together are committed in one transaction, each caller returning once its own is committed. The owner of the
    background responses this gateway runs (`run`, `cancel`, `stop`)."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._commit: GroupCommit[dict[str, Any]] = GroupCommit(store.put_responses)
        self.running: dict[str, asyncio.Task[None]] = {}
        """Background responses this gateway is running, by id."""
        self._forgotten: set[str] = set()
        """Deleted while running: nothing is stored when they end."""
        self._stopping = False

    async def put(self, response: dict[str, Any], turn: Turn, owner: str | None) -> None:
        row = {
            "response_id": response["id"],
            "created_at": float(response["created_at"]),
            "response": response,
            "conversation": turn.messages,
            "owner": owner,
            "previous_id": turn.previous_id,
        }
        await self._commit.commit([row])

    async def get(self, response_id: str, owner: str | None) -> Stored | None:
        """The response, if `owner` (an API key's id) made it: another key's is not found."""
        row = await asyncio.to_thread(self._store.get_response, response_id)
        if row is None or row["owner"] not in (None, owner):
            return None
        return Stored(row["response"], row["conversation"], row["turn"])

    async def delete(self, response_id: str, owner: str | None) -> bool:
        task = self.running.get(response_id)
        if task is not None and await self.get(response_id, owner) is not None:  # its own owner's: stopped first
            self._forgotten.add(response_id)
            task.cancel()
            await asyncio.wait([task])
        return await asyncio.to_thread(self._store.delete_response, response_id, owner)

    async def advance(self, response: dict[str, Any], turn: list[dict[str, Any]]) -> bool:
        """A background response moves on (in progress, done, failed, cancelled), with its turn's messages, if it is
        still under way: one cancelled or deleted meanwhile, here or through another gateway, stays so."""
        advance = self._store.advance_response
        return await asyncio.to_thread(advance, response, turn, from_status=UNDER_WAY)

    def run(self, job: "Background") -> "asyncio.Future[None]":
        """Run `job.work()` in the background: stored `queued` (the future returned is done then, or holds the
        store's error), `in_progress` as it starts, then what the writer's renderer keeps, or `failed` or
        `cancelled` when it does not end by itself; its admission is closed when it ends, whatever happens."""
        queued: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        response_id = job.writer.id
        task = asyncio.create_task(self._background(job, queued))
        self.running[response_id] = task

        def ended(_: object) -> None:
            self.running.pop(response_id, None)
            self._forgotten.discard(response_id)

        task.add_done_callback(ended)
        return queued

    async def _background(self, job: "Background", queued: "asyncio.Future[None]") -> None:
        writer, admission = job.writer, job.admission
        CURRENT.set(admission)
        turn = writer.spec.turn()
        conversation = turn.messages  # (the turn as it is before an answer)
        try:
            try:
                await self.put(writer.stopped("queued"), turn, job.owner)
            except Exception as exc:
                queued.set_exception(exc)
                return
            queued.set_result(None)
            await self.advance(writer.stopped("in_progress"), conversation)
            await job.work()
        except asyncio.CancelledError:
            if not queued.done():
                queued.cancel()
            elif writer.id not in self._forgotten:
                stopped = ("failed", STOPPED, "gateway_stopped") if self._stopping else ("cancelled",)
                await self._advance_quietly(writer.stopped(*stopped), conversation)
        except APIError as exc:
            named = job.rename(exc)
            failed = writer.stopped("failed", named.message, named.code or "server_error")
            await self._advance_quietly(failed, conversation)
        except Exception as exc:
            log.exception("background response %s failed", writer.id)
            why = f"internal error: {type(exc).__name__}"
            await self._advance_quietly(writer.stopped("failed", why, "server_error"), conversation)
        finally:
            if admission is not None:  # the request is over: its key's place in flight frees
                admission.close()

    async def _advance_quietly(self, response: dict[str, Any], conversation: list[dict[str, Any]]) -> None:
        try:
            await self.advance(response, conversation)
        except Exception:
            log.exception("could not store background response %s as %s", response["id"], response["status"])

    async def cancel(self, found: Stored, owner: str | None) -> dict[str, Any]:
        """Cancel a background response under way: here, its task; one another gateway runs, marked cancelled in
        the store (that gateway keeps the mark when it ends). The response after."""
        response_id = found.response["id"]
        task = self.running.get(response_id)
        if task is not None:
            task.cancel()
            await asyncio.wait([task])
        else:
            await self.advance({**found.response, "status": "cancelled"}, found.turn)
        after = await self.get(response_id, owner)
        return after.response if after is not None else {**found.response, "status": "cancelled"}

    async def stop(self, drain_s: float) -> None:
        """The gateway stops: background responses get `drain_s` to end, then are stored as failed."""
        if self.running:
            await asyncio.wait(list(self.running.values()), timeout=drain_s)
        self._stopping = True
        left = list(self.running.values())
        for task in left:
            task.cancel()
        if left:
            await asyncio.wait(left)

    async def prune_forever(self, keep_s: float, every_s: float = 600.0) -> None:
        """Delete responses older than `keep_s`, now and every `every_s`."""
        while True:
            try:
                gone = await asyncio.to_thread(self._store.prune_responses, time.time() - keep_s)
                if gone:
                    log.info("deleted %d stored responses older than %.0f days", gone, keep_s / 86_400)
            except Exception as exc:  # the database may be restarting: the next round tries again
                log.warning("pruning stored responses failed: %s", exc)
            await asyncio.sleep(every_s)


def not_found(response_id: str) -> APIError:
    return APIError(404, f"Response with id '{response_id}' not found.", param="response_id", code="not_found")


def _no_query(query: Mapping[str, str]) -> None:
    """GET and DELETE take no query parameters gridserve would not honour (`stream=true` replays events)."""
    for name, value in query.items():
        if name == "include_obfuscation" or (name == "stream" and value.lower() == "false"):
            continue
        raise unsupported_parameter(name, "replaying or extending a stored response")


async def retrieve_response(
    store: ResponseStore | None, response_id: str, query: Mapping[str, str], owner: str
) -> dict[str, Any]:
    """`GET /v1/responses/{id}`: the stored Response object of `owner`'s (404 when there is none)."""
    _no_query(query)
    found = await store.get(response_id, owner) if store is not None else None
    if found is None:
        raise not_found(response_id)
    return found.response


async def list_input_items(
    store: ResponseStore | None, response_id: str, query: Mapping[str, str], owner: str
) -> dict[str, Any]:
    """`GET /v1/responses/{id}/input_items` of `owner`'s stored response (404 when there is none): its input items,
    as a page (gateway/api/input_items.py)."""
    found = await store.get(response_id, owner) if store is not None else None
    if found is None:
        raise not_found(response_id)
    return input_items.page(input_items.items_of(response_id, found.conversation), query)


async def cancel_response(
    store: ResponseStore | None, response_id: str, query: Mapping[str, str], owner: str
) -> dict[str, Any]:
    """`POST /v1/responses/{id}/cancel` of `owner`'s background response (404 when there is none; 400 for one
    that was not made in the background): the response after, `cancelled` unless it had already ended."""
    _no_query(query)
    found = await store.get(response_id, owner) if store is not None else None
    if store is None or found is None:
        raise not_found(response_id)
    if not found.response.get("background"):
        raise APIError(
            400,
            "Only responses created with background=true can be cancelled.",
            param="response_id",
            code="not_background",
        )
    if found.response.get("status") in TERMINAL:
        return found.response
    return await store.cancel(found, owner)


async def _detached(ctx: ApiContext, req: SamplingFields, surface: Surface, key: ApiKey | None) -> Reply | None:
    """A `background` request: admitted now (a key over its limits hears so at once), stored as `queued` and
    answered so; then placed, generated and stored by a task of its own (`ResponseStore.run`). None for the others."""
    assert isinstance(req, ResponsesChat), "read() makes the request"
    spec = req.spec()
    if not spec.request.background:
        return None
    if ctx.responses is None:
        raise unsupported_parameter("background", "background responses (this gateway stores no responses)")
    req._spec = spec = dataclasses.replace(spec, created_at=int(time.time()))
    job, prompt_tokens = to_job(req, surface.kind, surface.id_prefix + secrets.token_hex(12))
    headers = await admit(ctx, req, job, prompt_tokens, key)
    admission = CURRENT.get()
    CURRENT.set(None)  # the background task owns the admission from here, and closes it when it ends
    writer = ResponseWriter(ctx, spec, job.request_id, job.model)
    work = lambda: run_admitted(ctx, req, job, prompt_tokens, surface)  # noqa: E731
    stored = ctx.responses.run(Background(writer, CALLER.get(), admission, work, surface.renamed))
    try:
        await asyncio.shield(stored)  # a client gone meanwhile leaves it running: stored, it can be polled
    except Exception as exc:
        log.exception("could not store background response %s", job.request_id)
        why = "the response could not be stored; send it again"
        raise APIError(503, why, type_="service_unavailable", code="store_unavailable") from exc
    body = orjson.dumps(writer.stopped("queued"))
    return Reply(headers=[*headers, (b"content-type", b"application/json")], body=body)


async def delete_response(
    store: ResponseStore | None, response_id: str, query: Mapping[str, str], owner: str
) -> dict[str, Any]:
    """`DELETE /v1/responses/{id}` of `owner`'s (404 when there is none). Responses continued from it keep their
    conversation."""
    _no_query(query)
    if store is None or not await store.delete(response_id, owner):
        raise not_found(response_id)
    return {"id": response_id, "object": "response", "deleted": True}


__all__ = [
    "RESPONSES",
    "TERMINAL",
    "ResponseStore",
    "ResponsesRequest",
    "cancel_response",
    "delete_response",
    "list_input_items",
    "read",
    "retrieve_response",
]
