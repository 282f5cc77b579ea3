"""Tool calling for the chat API: OpenAI's `tools` and `tool_choice` as a grammar the node decodes under, the
conversation's tool calls and results as text the model reads, and the answer back as OpenAI's `tool_calls`.

The node sees only messages and a ResponseFormat of type `tool_calls`: a calling answer is TOOL_CALL_TAG then a
JSON array of {"name", "arguments"}, each an object of one declared tool with arguments valid under its
parameters schema (`tool_choice` required or a named function: the answer must call; auto: it may be plain text
not starting with "<" instead). So receipts, commitments and audits cover tool calls as they cover text, and an
answer that ends by itself always parses into valid calls; the gateway checks each anyway (`validate`), and an
invalid one from a node is an integrity incident."""

import functools
import secrets
from dataclasses import dataclass
from typing import Any

import jsonschema
import orjson

from gridserve.engines import grammar
from gridserve.gateway.api.errors import bad_request
from gridserve.types import ChatMessage
from gridserve.types.wire import TOOL_CALL_TAG, ResponseFormat

MAX_TOOLS = 64
MAX_PARALLEL_CALLS = 8
TOOLS_PREAMBLE = (
    "You can call these tools. To call, answer with "
    + TOOL_CALL_TAG
    + ' then a JSON array of calls, each {"name": a tool\'s name, "arguments": an object of its parameters}.\nTools: '
)


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict[str, Any]
    id: str
    made: str = ""
    """The arguments' JSON as the model made it ("": made from `arguments`): a streamed call's arguments are this
    text piece by piece, so the whole answer says the same."""

    @property
    def arguments_text(self) -> str:
        return self.made or orjson.dumps(self.arguments).decode()

    def openai(self, index: int | None = None) -> dict[str, Any]:
        call: dict[str, Any] = {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments_text},
        }
        return call if index is None else {"index": index, **call}


@dataclass(frozen=True)
class CallDelta:
    """A streamed call's next piece: its start (`name`, with `arguments` ""), or more of its arguments' text."""

    index: int
    id: str
    name: str | None
    arguments: str


class CallStream:
    """An answer's calls read as they are made, for streamed tool calls: TOOL_CALL_TAG, then a JSON array of
    {"name": ..., "arguments": {...}} objects, name first (the form the calls' grammar makes; whitespace between
    JSON tokens is allowed, as other engines' grammars make it). Each call starts once its name is whole, and its
    arguments come as their text arrives, so the client reads them as the model writes them (OpenAI's streamed
    `tool_calls`). Text in another form stops the reading (`broken`); what it read stays valid."""

    _NAME = '{"name":'
    _ARGUMENTS = ',"arguments":'

    def __init__(self) -> None:
        self.text = ""
        self.pos = 0
        self.state = "tag"
        self.calls: list[list[str]] = []
        """Per call: [id, name, arguments' text so far]."""
        self.depth = 0
        self.in_string = self.escaped = False
        self.broken = False

    @property
    def done(self) -> bool:
        """The array closed: the calls are whole (what follows would break it)."""
        return self.state == "done" and not self.broken

    def feed(self, piece: str) -> list[CallDelta]:
        """The answer's next piece of text; the deltas it completes."""
        self.text += piece
        out: list[CallDelta] = []
        steps = {"tag": self._tag, "call": self._call, "args": self._args, "close": self._close, "next": self._next}
        while not self.broken and self.pos < len(self.text):
            if self.state == "done":
                self.broken = not self.text[self.pos :].isspace()
                self.pos = len(self.text)
            elif not steps[self.state](out):
                break
        return out

    def made(self) -> list[ToolCall] | None:
        """The calls, when the whole answer was read as calls (None otherwise)."""
        if not self.done:
            return None
        calls = []
        for call_id, name, text in self.calls:
            try:
                arguments = orjson.loads(text)
            except orjson.JSONDecodeError:
                return None
            if not isinstance(arguments, dict):
                return None
            calls.append(ToolCall(name, arguments, call_id, made=text))
        return calls

    def _skip(self) -> bool:
        """Past whitespace; whether text is left to read."""
        while self.pos < len(self.text) and self.text[self.pos] in " \t\r\n":
            self.pos += 1
        return self.pos < len(self.text)

    def _expect(self, literal: str) -> bool | None:
        """Past `literal` (whitespace allowed between its characters outside strings): True; None: not yet here;
        False: other text (broken)."""
        at, inside = self.pos, False
        for char in literal:
            while not inside and at < len(self.text) and self.text[at] in " \t\r\n":
                at += 1
            if at == len(self.text):
                return None
            if self.text[at] != char:
                self.broken = True
                return False
            at += 1
            inside ^= char == '"'
        self.pos = at
        return True

    def _tag(self, out: list[CallDelta]) -> bool:
        tag = self.text[: len(TOOL_CALL_TAG)]
        if tag != TOOL_CALL_TAG[: len(tag)]:
            self.broken = True
        if len(tag) < len(TOOL_CALL_TAG) or self.broken:
            return False
        self.pos = max(self.pos, len(TOOL_CALL_TAG))
        if not self._expect("["):
            return False
        self.state = "call"
        return True

    def _call(self, out: list[CallDelta]) -> bool:
        start = self.pos
        if not self._expect(self._NAME) or not self._skip():
            self.pos = start
            return False
        end = _string_end(self.text, self.pos)
        if end is None:
            self.pos, self.broken = start, self.text[self.pos] != '"'
            return False
        literal = self.text[self.pos : end]
        self.pos = end
        found = self._expect(self._ARGUMENTS)
        if not found:
            self.pos = start
            return False
        try:
            name = orjson.loads(literal)
        except orjson.JSONDecodeError:
            self.broken = True
            return False
        call_id = "call_" + secrets.token_hex(12)
        self.calls.append([call_id, name, ""])
        out.append(CallDelta(len(self.calls) - 1, call_id, name, ""))
        self.state, self.depth, self.in_string, self.escaped = "args", 0, False, False
        return True

    def _args(self, out: list[CallDelta]) -> bool:
        if self.depth == 0 and (not self._skip() or self.text[self.pos] != "{"):
            self.broken = self.pos < len(self.text)
            return False
        begin, closed = self.pos, False
        while self.pos < len(self.text) and not closed:
            char = self.text[self.pos]
            self.pos += 1
            if self.in_string:
                self.escaped, self.in_string = (False, True) if self.escaped else (char == "\\", char != '"')
            elif char == '"':
                self.in_string = True
            elif char in "{[":
                self.depth += 1
            elif char in "}]":
                self.depth -= 1
                closed = self.depth == 0
        piece = self.text[begin : self.pos]
        call = self.calls[-1]
        call[2] += piece
        out.append(CallDelta(len(self.calls) - 1, call[0], None, piece))
        if closed:
            self.state = "close"
        return closed

    def _close(self, out: list[CallDelta]) -> bool:
        if not self._expect("}"):
            return False
        self.state = "next"
        return True

    def _next(self, out: list[CallDelta]) -> bool:
        if not self._skip():
            return False
        char = self.text[self.pos]
        self.pos += 1
        if char not in ",]":
            self.broken = True
            return False
        self.state = "call" if char == "," else "done"
        return True


def _string_end(text: str, at: int) -> int | None:
    """Where the JSON string starting at `at` (its opening quote) ends (past its closing quote); None: not yet."""
    if text[at] != '"':
        return None
    escaped = False
    for i in range(at + 1, len(text)):
        char = text[i]
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == '"':
            return i + 1
    return None


def _tool(raw: Any, i: int) -> tuple[str, dict[str, Any], str]:
    """(name, parameters schema, description) of tools[i], or a 400 naming what is wrong."""
    function = raw.get("function") if isinstance(raw, dict) and raw.get("type", "function") == "function" else None
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str) or not name or len(name) > 64:
        raise bad_request(
            f'Invalid request: tools[{i}] must be {{"type": "function", "function": {{"name": ...}}}} with a name '
            "of 1 to 64 characters.",
            param=f"tools[{i}]",
        )
    assert isinstance(function, dict)
    parameters = function.get("parameters") or {"type": "object", "properties": {}}
    if not isinstance(parameters, dict):
        raise bad_request(
            f"Invalid request: tools[{i}].function.parameters must be a JSON schema.", param=f"tools[{i}]"
        )
    return name, parameters, str(function.get("description") or "")


def tool_format(tools: Any, tool_choice: Any, parallel: Any) -> tuple[ResponseFormat | None, str]:
    """The calls' grammar for the node (None: the answer is plain text) and the tools described for the model ("":
    no tools)."""
    if not tools:
        if tool_choice not in (None, "none", "auto"):
            raise bad_request("Invalid request: tool_choice needs tools.", param="tool_choice")
        return None, ""
    if not isinstance(tools, list) or len(tools) > MAX_TOOLS:
        raise bad_request(f"Invalid request: tools must be a list of at most {MAX_TOOLS}.", param="tools")
    declared = [_tool(raw, i) for i, raw in enumerate(tools)]
    names = [name for name, _, _ in declared]
    if len(set(names)) != len(names):
        raise bad_request("Invalid request: two tools have the same name.", param="tools")
    described = (
        TOOLS_PREAMBLE + orjson.dumps([{"name": n, "description": d, "parameters": p} for n, p, d in declared]).decode()
    )
    choice = tool_choice if tool_choice is not None else "auto"
    if choice == "none":
        return None, described
    forced = _forced(choice, names)
    if forced is None and choice not in ("auto", "required"):
        raise bad_request(
            'Invalid request: tool_choice must be none, auto, required or {"type": "function", "function": '
            '{"name": ...}}.',
            param="tool_choice",
        )
    allowed = [(n, p) for n, p, _ in declared if forced is None or n == forced]
    most = 1 if parallel is False or forced is not None else MAX_PARALLEL_CALLS
    calls = {
        "type": "array",
        "minItems": 1,
        "maxItems": most,
        "items": {"anyOf": [_call_schema(n, p) for n, p in allowed]},
    }
    fmt = ResponseFormat(type="tool_calls", schema_text=orjson.dumps(calls).decode(), optional=choice == "auto")
    problem = grammar.check(fmt)
    if problem:
        raise bad_request(f"Invalid request: a tool's parameters cannot be generated: {problem}", param="tools")
    return fmt, described


def _forced(choice: Any, names: list[str]) -> str | None:
    if not isinstance(choice, dict):
        return None
    name = (choice.get("function") or {}).get("name") if isinstance(choice.get("function"), dict) else None
    if choice.get("type") != "function" or name not in names:
        raise bad_request(f"Invalid request: tool_choice names no declared tool ({name!r}).", param="tool_choice")
    return str(name)


def _call_schema(name: str, parameters: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {"name": {"const": name}, "arguments": parameters},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


def render(messages: list[Any], described: str) -> tuple[ChatMessage, ...]:
    """The conversation as role/text turns the model reads: the tools described in the system turn, an assistant's
    calls as TOOL_CALL_TAG + JSON, a tool's result as a user turn; consecutive turns of one role joined (chat
    templates such as Gemma's require user and model turns to alternate)."""
    names: dict[str, str] = {}
    turns: list[tuple[str, str]] = [("system", described)] if described else []
    for message in messages:
        role, text = message.role, message.text()
        calls = (message.model_extra or {}).get("tool_calls")
        if role == "assistant" and calls:
            listed = []
            for call in calls if isinstance(calls, list) else []:
                if not isinstance(call, dict):
                    raise bad_request(
                        "Invalid request: an assistant message's tool_calls must be objects.", param="messages"
                    )
                found = call.get("function")
                function: dict[str, Any] = found if isinstance(found, dict) else {}
                names[str(call.get("id", ""))] = str(function.get("name", ""))
                listed.append({"name": function.get("name", ""), "arguments": _arguments(function.get("arguments"))})
            text = text + TOOL_CALL_TAG + orjson.dumps(listed).decode()
        elif role == "tool":
            call_id = str((message.model_extra or {}).get("tool_call_id", ""))
            role, text = "user", f"<tool_response name={names.get(call_id, call_id)!r}>{text}</tool_response>"
        if turns and turns[-1][0] == role:
            turns[-1] = (role, turns[-1][1] + "\n" + text)
        else:
            turns.append((role, text))
    return tuple(ChatMessage(role=role, content=text) for role, text in turns)


def _arguments(raw: Any) -> Any:
    if isinstance(raw, str):
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            return raw
    return raw if raw is not None else {}


def uses_tools(messages: list[Any]) -> bool:
    return any(m.role == "tool" or (m.model_extra or {}).get("tool_calls") for m in messages)


def parse_calls(text: str) -> list[ToolCall] | None:
    """The calls an answer makes (None: it is plain text, or not whole calls), their arguments as the model wrote
    them where the answer is in the calls' form (CallStream), else as JSON of their parsed values."""
    if not text.startswith(TOOL_CALL_TAG):
        return None
    stream = CallStream()
    stream.feed(text)
    read = stream.made()
    if read is not None:
        return read
    try:
        listed = orjson.loads(text[len(TOOL_CALL_TAG) :])
    except orjson.JSONDecodeError:
        return None
    if not isinstance(listed, list):
        return None
    calls = []
    for item in listed:
        if (
            not isinstance(item, dict)
            or not isinstance(item.get("name"), str)
            or not isinstance(item.get("arguments"), dict)
        ):
            return None
        calls.append(ToolCall(item["name"], item["arguments"], "call_" + secrets.token_hex(12)))
    return calls


def validate(text: str, fmt: ResponseFormat) -> str:
    """Why an answer that ended by itself is not what its tool grammar allows ("" when it is): parses, names a
    declared tool, and its arguments match that tool's parameters."""
    if fmt.optional and not text.startswith("<"):
        return ""
    calls = parse_calls(text)
    if calls is None:
        return "the answer is not tool calls"
    problem = next(_validator(fmt).iter_errors([{"name": c.name, "arguments": c.arguments} for c in calls]), None)
    return f"a tool call does not match its tool: {problem.message}" if problem is not None else ""


@functools.lru_cache(maxsize=256)
def _validator(fmt: ResponseFormat) -> Any:
    """The calls' schema as a validator, made once (jsonschema.validate checks the schema itself every time)."""
    schema = fmt.answer_schema()
    return jsonschema.validators.validator_for(schema)(schema)
