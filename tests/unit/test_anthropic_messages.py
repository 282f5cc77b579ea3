"""Anthropic's Messages API (gateway/api/anthropic_api.py) without processes or sockets: every request field read
into the chat core's request and job, each bad or unsupported input a 4xx in Anthropic's error format naming what
is wrong, and the answer in Anthropic's shapes, whole and streamed through the core's own stream loop (the SDK's
accumulator rebuilds the same message from the events); the gateway in process answers /v1/messages with
Anthropic's errors and documents the route."""

import asyncio
import json
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import httpx
import orjson
import pytest
from tests.answer_support import CTX, Scripted
from tests.conftest import API_KEY

from gridserve.gateway.api import answers, openai_api
from gridserve.gateway.api.anthropic_api import (
    ERROR_TYPES,
    MESSAGES,
    REFUSED,
    STOP_REASONS,
    MessageFormatter,
    error,
    tool_use_id,
    translate,
)
from gridserve.gateway.api.errors import APIError, model_not_found, no_capacity, unauthorized, upstream_failed
from gridserve.gateway.api.hotpath import ROUTES
from gridserve.gateway.api.schemas import ChatCompletionRequest
from gridserve.gateway.api.surface import Answer
from gridserve.gateway.api.tools import TOOLS_PREAMBLE, ToolCall
from gridserve.gateway.app import Gateway, build_gateway_app
from gridserve.gateway.config import GatewayConfig
from gridserve.store import Store
from gridserve.trust import Identity
from gridserve.types import StreamEvent
from gridserve.types.wire import TOOL_CALL_TAG

WEATHER = {
    "name": "weather",
    "description": "The weather in a city",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["c", "f"]}},
        "required": ["city", "unit"],
        "additionalProperties": False,
    },
}
CLOCK = {"name": "clock", "input_schema": {"type": "object", "properties": {"zone": {"type": "string"}}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
BASE: dict[str, Any] = {"model": "m", "max_tokens": 32, "messages": ASK}
HISTORY: list[dict[str, Any]] = [
    *ASK,
    {
        "role": "assistant",
        "content": [
            {"type": "text", "text": "Let me look."},
            {"type": "tool_use", "id": "toolu_1", "name": "weather", "input": {"city": "Paris", "unit": "c"}},
        ],
    },
    {
        "role": "user",
        "content": [
            {"type": "tool_result", "tool_use_id": "toolu_1", "content": "18 degrees"},
            {"type": "text", "text": "And tomorrow?"},
        ],
    },
]


def sdk() -> ModuleType:
    """The anthropic SDK, imported by the tests that use it: at module level it cost ~1 s of every `make unit`
    worker's collection (`make test` collects the grid tests too, which import it at module level)."""
    import anthropic

    return anthropic


def read(**fields: Any) -> ChatCompletionRequest:
    return translate({**BASE, **fields})


def job(**fields: Any) -> Any:
    built, _ = openai_api.to_job(read(**fields), "chat", "msg_test")
    return built


def refused(body: dict[str, Any]) -> APIError:
    with pytest.raises(APIError) as caught:
        asyncio.run(MESSAGES.read(SimpleNamespace(), orjson.dumps(body)))  # type: ignore[arg-type]
    return caught.value


# -- the request -------------------------------------------------------------------------------------------------


def test_a_plain_request_becomes_a_chat_request_with_anthropics_defaults() -> None:
    req = read()
    assert (req.model, req.max_tokens, req.stream, req.stop) == ("m", 32, False, None)
    assert req.temperature == 1.0 and req.top_p == 1.0 and req.top_k is None  # Anthropic's defaults
    assert [(m.role, m.content) for m in req.messages] == [("user", "What is the weather in Paris?")]
    assert req.tools is None and req.tool_choice is None and req.response_format is None


def test_sampling_fields_reach_the_nodes_job() -> None:
    built = job(temperature=0, top_p=0.5, top_k=7, stop_sequences=["\n\n", "END"], stream=True)
    sampling = built.sampling
    assert (sampling.temperature, sampling.top_p, sampling.top_k, sampling.stop) == (0, 0.5, 7, ("\n\n", "END"))
    assert sampling.max_tokens == 32 and sampling.greedy and read(stream=True).stream
    assert "top_k" in sampling.features()


def test_the_system_prompt_string_or_text_blocks_is_the_first_turn() -> None:
    first = job(system="Be brief.").messages[0]
    assert (first.role, first.content) == ("system", "Be brief.")
    blocks = [{"type": "text", "text": "Be "}, {"type": "text", "text": "brief.", "cache_control": {"type": "x"}}]
    assert job(system=blocks).messages[0].content == "Be brief."
    assert job(system="").messages[0].role == "user"  # an empty system prompt is no turn
    assert job(system=None).messages[0].role == "user"


def test_content_blocks_of_text_are_joined() -> None:
    content = [{"type": "text", "text": "What is "}, {"type": "text", "text": "2+2?"}]
    assert [m.content for m in job(messages=[{"role": "user", "content": content}]).messages] == ["What is 2+2?"]


def test_metadata_service_tier_and_cache_control_are_accepted_with_no_effect() -> None:
    plain = job()
    extra = job(
        metadata={"user_id": "u1"},
        service_tier="standard_only",
        cache_control={"type": "ephemeral"},
        thinking={"type": "disabled"},
        user_profile_id="p",
        workspace_id="w",
        mcp_servers=[],
        speed="standard",
    )
    assert extra.messages == plain.messages and extra.sampling == plain.sampling.model_copy(
        update={"seed": extra.sampling.seed}
    )


def test_tools_become_function_tools_the_model_reads() -> None:
    req = read(tools=[WEATHER, {**CLOCK, "type": "custom", "strict": True, "cache_control": {"type": "ephemeral"}}])
    assert req.tools == [
        {
            "type": "function",
            "function": {
                "name": "weather",
                "description": "The weather in a city",
                "parameters": WEATHER["input_schema"],
            },
        },
        {"type": "function", "function": {"name": "clock", "description": "", "parameters": CLOCK["input_schema"]}},
    ]
    built = job(tools=[WEATHER, CLOCK])
    assert built.messages[0].role == "system" and built.messages[0].content.startswith(TOOLS_PREAMBLE)
    fmt = built.sampling.response_format
    assert fmt is not None and fmt.type == "tool_calls" and fmt.optional  # no tool_choice: auto


@pytest.mark.parametrize(
    ("choice", "openai", "parallel"),
    [
        ({"type": "auto"}, "auto", None),
        ({"type": "auto", "disable_parallel_tool_use": True}, "auto", False),
        ({"type": "any"}, "required", None),
        ({"type": "any", "disable_parallel_tool_use": True}, "required", False),
        ({"type": "tool", "name": "clock"}, {"type": "function", "function": {"name": "clock"}}, None),
        ({"type": "none"}, "none", None),
    ],
)
def test_tool_choice_becomes_openais(choice: dict[str, Any], openai: Any, parallel: bool | None) -> None:
    req = read(tools=[WEATHER, CLOCK], tool_choice=choice)
    assert (req.tool_choice, req.parallel_tool_calls) == (openai, parallel)


def test_tool_choice_shapes_the_calls_grammar() -> None:
    def calls(choice: dict[str, Any]) -> dict[str, Any]:
        fmt = job(tools=[WEATHER, CLOCK], tool_choice=choice).sampling.response_format
        assert fmt is not None and fmt.type == "tool_calls" and not fmt.optional
        return fmt.answer_schema()

    assert calls({"type": "any"})["maxItems"] == 8
    assert calls({"type": "any", "disable_parallel_tool_use": True})["maxItems"] == 1
    named = calls({"type": "tool", "name": "clock"})
    assert named["maxItems"] == 1 and [o["properties"]["name"] for o in named["items"]["anyOf"]] == [{"const": "clock"}]
    assert job(tools=[WEATHER], tool_choice={"type": "none"}).sampling.response_format is None


def test_tool_use_and_tool_result_blocks_become_calls_and_results() -> None:
    req = read(messages=HISTORY)
    shaped = [m.model_dump(exclude_none=True) for m in req.messages]
    assert shaped == [
        {"role": "user", "content": "What is the weather in Paris?"},
        {
            "role": "assistant",
            "content": "Let me look.",
            "tool_calls": [
                {
                    "id": "toolu_1",
                    "type": "function",
                    "function": {"name": "weather", "arguments": '{"city":"Paris","unit":"c"}'},
                }
            ],
        },
        {"role": "tool", "content": "18 degrees", "tool_call_id": "toolu_1"},
        {"role": "user", "content": "And tomorrow?"},
    ]
    turns = job(messages=HISTORY).messages
    assert [t.role for t in turns] == ["user", "assistant", "user"]
    assert turns[1].content == 'Let me look.<tool_call>[{"name":"weather","arguments":{"city":"Paris","unit":"c"}}]'
    assert turns[2].content == "<tool_response name='weather'>18 degrees</tool_response>\nAnd tomorrow?"


def test_a_tool_result_with_text_blocks_and_is_error_reaches_the_model_as_an_error() -> None:
    result = {
        "type": "tool_result",
        "tool_use_id": "toolu_1",
        "is_error": True,
        "content": [{"type": "text", "text": "city "}, {"type": "text", "text": "unknown"}],
    }
    messages = [*HISTORY[:2], {"role": "user", "content": [result]}]
    turns = job(messages=messages).messages
    assert turns[-1].content == "<tool_response name='weather'>Error: city unknown</tool_response>"
    assert [m.role for m in read(messages=messages).messages][-1] == "tool"  # no empty user turn after it


def test_an_assistant_turn_of_calls_alone_has_no_text() -> None:
    calls_only = {"role": "assistant", "content": [HISTORY[1]["content"][1]]}
    req = read(messages=[*ASK, calls_only, HISTORY[2]])
    assert req.messages[1].content is None and req.messages[1].model_extra
    assert job(messages=[*ASK, calls_only, HISTORY[2]]).messages[1].content.startswith(TOOL_CALL_TAG)


def test_output_config_format_is_a_json_schema_answer() -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    req = read(output_config={"format": {"type": "json_schema", "schema": schema}})
    assert req.response_format == {
        "type": "json_schema",
        "json_schema": {"name": "output", "schema": schema, "strict": True},
    }
    fmt = job(output_config={"format": {"type": "json_schema", "schema": schema}}).sampling.response_format
    assert fmt is not None and fmt.type == "json_schema" and fmt.answer_schema() == schema
    assert read(output_config={"format": None}).response_format is None


BAD: list[tuple[str, dict[str, Any], str]] = [
    ("no max_tokens", {"max_tokens": None}, "max_tokens"),
    ("max_tokens 0", {"max_tokens": 0}, "max_tokens"),
    ("max_tokens a string", {"max_tokens": "5"}, "max_tokens"),
    ("max_tokens a boolean", {"max_tokens": True}, "max_tokens"),
    ("no model", {"model": None}, "model"),
    ("no messages", {"messages": []}, "messages"),
    ("temperature over 1", {"temperature": 1.5}, "temperature"),
    ("top_p 0", {"top_p": 0}, "top_p"),
    ("top_k negative", {"top_k": -1}, "top_k"),
    ("stream a string", {"stream": "yes"}, "stream"),
    ("five stop sequences", {"stop_sequences": ["a", "b", "c", "d", "e"]}, "stop_sequences"),
    ("an empty stop sequence", {"stop_sequences": ["a", ""]}, "stop_sequences[1]"),
    ("an unknown parameter", {"seed": 1}, "seed"),
    ("an OpenAI penalty", {"frequency_penalty": 0.5}, "frequency_penalty"),
    ("thinking enabled", {"thinking": {"type": "enabled", "budget_tokens": 2048}}, "thinking"),
    ("adaptive thinking", {"thinking": {"type": "adaptive"}}, "thinking"),
    ("a container", {"container": "c1"}, "container"),
    ("MCP servers", {"mcp_servers": [{"type": "url", "url": "http://x", "name": "x"}]}, "mcp_servers"),
    ("fast mode", {"speed": "fast"}, "speed"),
    ("an inference region", {"inference_geo": "us"}, "inference_geo"),
    ("context management", {"context_management": {"edits": []}}, "context_management"),
    ("an unknown service tier", {"service_tier": "priority"}, "service_tier"),
    ("metadata a string", {"metadata": "x"}, "metadata"),
    ("a system role message", {"messages": [{"role": "system", "content": "x"}]}, "messages[0].role"),
    ("content a number", {"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ("no content", {"messages": [{"role": "user"}]}, "messages[0].content"),
    ("an extra message key", {"messages": [{"role": "user", "content": "x", "name": "n"}]}, "messages[0].name"),
    (
        "an image block",
        {"messages": [{"role": "user", "content": [{"type": "image", "source": {"type": "base64"}}]}]},
        "messages[0].content[0]",
    ),
    (
        "a document block",
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "x"}, {"type": "document"}]}]},
        "messages[0].content[1]",
    ),
    ("a block without a type", {"messages": [{"role": "user", "content": [{"text": "x"}]}]}, "messages[0].content[0]"),
    ("a block not an object", {"messages": [{"role": "user", "content": ["x"]}]}, "messages[0].content[0]"),
    ("a text block without text", {"messages": [{"role": "user", "content": [{"type": "text"}]}]}, "messages[0]"),
    (
        "a text block with an unknown key",
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "x", "tone": "y"}]}]},
        "messages[0].content[0].tone",
    ),
    ("a final assistant turn", {"messages": [*ASK, {"role": "assistant", "content": "The"}]}, "messages"),
    (
        "a thinking block",
        {"messages": [{"role": "assistant", "content": [{"type": "thinking", "thinking": "."}]}, *ASK]},
        "messages[0].content[0]",
    ),
    (
        "tool_use in a user turn",
        {"messages": [{"role": "user", "content": [{"type": "tool_use", "id": "t", "name": "w", "input": {}}]}]},
        "messages[0].content[0]",
    ),
    (
        "tool_result in an assistant turn",
        {"messages": [{"role": "assistant", "content": [{"type": "tool_result", "tool_use_id": "t"}]}, *ASK]},
        "messages[0].content[0]",
    ),
    (
        "a tool_use without input",
        {"messages": [{"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "w"}]}, *ASK]},
        "messages[0].content[0]",
    ),
    (
        "a tool_result for no call",
        {"messages": [*HISTORY[:2], {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_9"}]}]},
        "messages[2].content[0].tool_use_id",
    ),
    (
        "an image in a tool_result",
        {
            "messages": [
                *HISTORY[:2],
                {
                    "role": "user",
                    "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "image"}]}],
                },
            ]
        },
        "messages[2].content[0].content[0]",
    ),
    (
        "is_error a string",
        {
            "messages": [
                *HISTORY[:2],
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "is_error": "yes"}]},
            ]
        },
        "messages[2].content[0].is_error",
    ),
    ("system a number", {"system": 5}, "system"),
    ("an image in system", {"system": [{"type": "image"}]}, "system[0]"),
    ("a server tool", {"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "tools[0]"),
    ("a tool without input_schema", {"tools": [{"name": "w"}]}, "tools[0].input_schema"),
    ("a tool schema not an object", {"tools": [{"name": "w", "input_schema": {"type": "string"}}]}, "tools[0]"),
    ("a tool with a bad name", {"tools": [{**WEATHER, "name": "a b"}]}, "tools[0].name"),
    ("a tool name ending in a newline", {"tools": [{**WEATHER, "name": "weather\n"}]}, "tools[0].name"),
    ("a tool not an object", {"tools": ["weather"]}, "tools[0]"),
    ("a deferred tool", {"tools": [{**WEATHER, "defer_loading": True}]}, "tools[0].defer_loading"),
    ("a tool with an unknown key", {"tools": [{**WEATHER, "color": "red"}]}, "tools[0].color"),
    ("two tools of one name", {"tools": [WEATHER, CLOCK, WEATHER]}, "tools[2].name"),
    ("tool_choice any without tools", {"tool_choice": {"type": "any"}}, "tool_choice"),
    ("tool_choice of no tool", {"tools": [WEATHER], "tool_choice": {"type": "tool", "name": "clock"}}, "tool_choice"),
    ("tool_choice sometimes", {"tools": [WEATHER], "tool_choice": {"type": "sometimes"}}, "tool_choice.type"),
    ("tool_choice a string", {"tools": [WEATHER], "tool_choice": "auto"}, "tool_choice"),
    (
        "disable_parallel_tool_use a string",
        {"tools": [WEATHER], "tool_choice": {"type": "any", "disable_parallel_tool_use": "y"}},
        "tool_choice.disable_parallel_tool_use",
    ),
    ("an effort level", {"output_config": {"effort": "high"}}, "output_config.effort"),
    ("an output format of text", {"output_config": {"format": {"type": "text"}}}, "output_config.format"),
    (
        "an output format and tools",
        {"tools": [WEATHER], "output_config": {"format": {"type": "json_schema", "schema": {"type": "object"}}}},
        "output_config.format",
    ),
    (
        "an output schema that cannot be generated",
        {"output_config": {"format": {"type": "json_schema", "schema": {"type": "object", "not": {}}}}},
        "output_config.format.schema",
    ),
    ("gridserve options misspelt", {"gridserve": {"teir": "x"}}, "gridserve.teir"),
]


@pytest.mark.parametrize(("change", "param"), [(c, p) for _, c, p in BAD], ids=[why for why, _, _ in BAD])
def test_bad_or_unsupported_input_is_a_400_naming_the_parameter(change: dict[str, Any], param: str) -> None:
    body = {**BASE, **change}
    body = {k: v for k, v in body.items() if v is not None or k not in ("max_tokens", "model")}
    exc = refused(body)
    assert exc.status == 400 and exc.param is not None and exc.param.startswith(param), (exc.param, exc.message)
    sent = orjson.loads(error(exc))
    assert sent["type"] == "error" and sent["error"]["type"] == "invalid_request_error"
    assert param in sent["error"]["message"], sent


def test_every_refused_parameter_is_refused_on_and_accepted_off() -> None:
    on = {
        "thinking": {"type": "enabled", "budget_tokens": 1024},
        "container": "c",
        "context_management": {"edits": [{"type": "clear"}]},
        "mcp_servers": [{}],
        "inference_geo": "eu",
        "diagnostics": {"previous_message_id": "m"},
        "speed": "fast",
    }
    assert set(on) == set(REFUSED)
    for name, value in on.items():
        exc = refused({**BASE, name: value})
        assert exc.code == "unsupported_parameter" and f"'{name}'" in exc.message
        assert isinstance(read(**{name: None}), ChatCompletionRequest)


@pytest.mark.parametrize("body", [b"{not json", b"[1, 2]", b'"text"'])
def test_a_body_that_is_not_a_json_object_is_a_400(body: bytes) -> None:
    with pytest.raises(APIError) as caught:
        asyncio.run(MESSAGES.read(SimpleNamespace(), body))  # type: ignore[arg-type]
    assert caught.value.status == 400 and orjson.loads(error(caught.value))["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (unauthorized(), "authentication_error"),
        (APIError(403, "no"), "permission_error"),
        (model_not_found("x"), "not_found_error"),
        (APIError(413, "too big", code="request_too_large"), "request_too_large"),
        (APIError(429, "slow down"), "rate_limit_error"),
        (APIError(500, "Internal error", type_="api_error"), "api_error"),
        (upstream_failed("node died"), "api_error"),
        (no_capacity("no node"), "overloaded_error"),
        (APIError(409, "conflict"), "invalid_request_error"),
    ],
)
def test_errors_are_in_anthropics_format_by_status(exc: APIError, kind: str) -> None:
    assert orjson.loads(error(exc)) == {"type": "error", "error": {"type": kind, "message": exc.message}}
    assert ERROR_TYPES.get(exc.status, kind) == kind


def test_an_error_message_names_its_parameter_when_it_does_not_already() -> None:
    named = orjson.loads(error(APIError(400, "no live node meets the options", param="gridserve.tier")))
    assert named["error"]["message"] == "no live node meets the options (parameter: gridserve.tier)"
    said = orjson.loads(error(APIError(400, "max_tokens (9) exceeds the context", param="max_tokens")))
    assert said["error"]["message"] == "max_tokens (9) exceeds the context"


# -- the answer --------------------------------------------------------------------------------------------------

CALLS = (ToolCall("weather", {"city": "Paris", "unit": "c"}, "call_abc"), ToolCall("clock", {"zone": "CET"}, "call_d"))


def test_stop_reasons_map_to_anthropics() -> None:
    fmt = MessageFormatter("msg_1", "m")
    assert STOP_REASONS == {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}
    for reason, anthropics in STOP_REASONS.items():
        whole = fmt.whole(Answer(reason, 5, 2, text="hi" if reason != "tool_calls" else ""))
        assert (whole["stop_reason"], whole["stop_sequence"]) == (anthropics, None)


def test_a_stop_sequence_is_reported_only_when_the_request_had_it() -> None:
    fmt = MessageFormatter("msg_1", "m", ("END", "\n\n"))
    said = fmt.whole(Answer("stop", 5, 2, text="hi", stop_sequence="END"))
    assert (said["stop_reason"], said["stop_sequence"]) == ("stop_sequence", "END")
    for claimed in ("OTHER", None):  # a node naming a string the request did not have, or none: end_turn
        said = fmt.whole(Answer("stop", 5, 2, text="hi", stop_sequence=claimed))
        assert (said["stop_reason"], said["stop_sequence"]) == ("end_turn", None)
    assert fmt.whole(Answer("length", 5, 2, text="hi", stop_sequence="END"))["stop_reason"] == "max_tokens"
    streamed = fmt.end(Answer("stop", 5, 2, text="hi", stop_sequence="\n\n"))
    assert b'"stop_reason":"stop_sequence","stop_sequence":"\\n\\n"' in streamed


def test_a_whole_text_answer_is_anthropics_message() -> None:
    whole = MessageFormatter("msg_1", "m").whole(Answer("stop", 70, 5, 64, "Hello there"))
    assert whole == {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": "m",
        "content": [{"type": "text", "text": "Hello there"}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {
            "input_tokens": 6,
            "output_tokens": 5,
            "cache_read_input_tokens": 64,
            "cache_creation_input_tokens": 0,
        },
    }
    message = sdk().types.Message.model_validate(whole)
    assert message.content[0].type == "text" and message.content[0].text == "Hello there"


def test_a_whole_tool_answer_is_tool_use_blocks() -> None:
    whole = MessageFormatter("msg_1", "m").whole(Answer("tool_calls", 9, 20, calls=CALLS))
    assert whole["stop_reason"] == "tool_use"
    assert whole["content"] == [
        {"type": "tool_use", "id": "toolu_abc", "name": "weather", "input": {"city": "Paris", "unit": "c"}},
        {"type": "tool_use", "id": "toolu_d", "name": "clock", "input": {"zone": "CET"}},
    ]
    assert [b.type for b in sdk().types.Message.model_validate(whole).content] == ["tool_use", "tool_use"]
    assert tool_use_id("toolu_x") == "toolu_x" and tool_use_id("call_x") == "toolu_x"


def test_an_empty_answer_has_no_content_blocks() -> None:
    assert MessageFormatter("msg_1", "m").whole(Answer("stop", 3, 1))["content"] == []


FINAL: StreamEvent = {"finish_reason": "stop", "prompt_tokens": 12, "completion_tokens": 3, "cached_tokens": 4}


def served(node: list[StreamEvent], **fields: Any) -> tuple[list[tuple[str, dict[str, Any]]], dict[str, Any]]:
    """(the streamed events as (name, data), the whole message) of the node's events through the core's loops."""
    req = read(**fields)
    fmt = job(**fields).sampling.response_format
    calls = (lambda: answers.Calls(CTX, Scripted(node), fmt)) if fmt is not None else (lambda: None)

    async def streamed() -> bytes:
        renderer = MESSAGES.renderer(CTX, req, "msg_1", "m")
        return b"".join([c async for c in answers.sse(CTX, Scripted(node), renderer, calls())])

    raw = asyncio.run(streamed())
    whole = asyncio.run(answers.collect(CTX, Scripted(node), MESSAGES.renderer(CTX, req, "msg_1", "m"), calls()))
    return sse(raw), whole


def sse(raw: bytes) -> list[tuple[str, dict[str, Any]]]:
    assert raw.endswith(b"\n\n")
    events = []
    for chunk in raw[:-2].split(b"\n\n"):
        head, data = chunk.split(b"\n")
        assert head.startswith(b"event: ") and data.startswith(b"data: ")
        body = json.loads(data[len(b"data: ") :])
        assert body["type"] == head[len(b"event: ") :].decode()
        events.append((body["type"], body))
    return events


def rebuilt(events: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    """The message the anthropic SDK's stream accumulator makes of the events."""
    from anthropic.lib.streaming._messages import accumulate_event

    snapshot = None
    for _, data in events:
        snapshot = accumulate_event(event=data, current_snapshot=snapshot, json_bufs={})  # type: ignore[arg-type]
    assert snapshot is not None
    return snapshot.to_dict(exclude_none=True)  # type: ignore[no-any-return]


def test_a_streamed_text_answer_is_anthropics_event_sequence() -> None:
    node: list[StreamEvent] = [{"text": "Hel"}, {"text": ""}, {"text": "lo"}, FINAL]
    events, whole = served(node)
    assert [name for name, _ in events] == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    start = events[0][1]["message"]
    assert start["content"] == [] and start["stop_reason"] is None and start["id"] == "msg_1"
    assert events[1][1] == {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
    assert [d["delta"] for _, d in events[2:4]] == [{"type": "text_delta", "text": t} for t in ("Hel", "lo")]
    assert events[5][1]["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}
    assert (
        events[5][1]["usage"]
        == whole["usage"]
        == {
            "input_tokens": 8,
            "output_tokens": 3,
            "cache_read_input_tokens": 4,
            "cache_creation_input_tokens": 0,
        }
    )
    assert whole["content"] == [{"type": "text", "text": "Hello"}]
    assert rebuilt(events) == sdk().types.Message.model_validate(whole).to_dict(exclude_none=True)


def test_a_streamed_answer_cut_by_max_tokens_says_so() -> None:
    events, whole = served([{"text": "abc"}, {**FINAL, "finish_reason": "length"}])
    assert events[-2][1]["delta"]["stop_reason"] == whole["stop_reason"] == "max_tokens"


def test_streamed_tool_calls_are_tool_use_blocks_without_a_text_block() -> None:
    said = TOOL_CALL_TAG + '[{"name":"weather","arguments":{"city":"Paris","unit":"c"}},{"name":"clock","arguments":'
    node: list[StreamEvent] = [{"text": said[:9]}, {"text": said[9:]}, {"text": '{"zone":"CET"}}]'}, FINAL]
    events, whole = served(node, tools=[WEATHER, CLOCK], tool_choice={"type": "any"})
    assert [name for name, _ in events] == [
        "message_start",
        *["content_block_start", "content_block_delta", "content_block_stop"] * 2,
        "message_delta",
        "message_stop",
    ]
    starts = [d["content_block"] for name, d in events if name == "content_block_start"]
    assert [(b["type"], b["name"], b["input"]) for b in starts] == [
        ("tool_use", "weather", {}),
        ("tool_use", "clock", {}),
    ]
    assert all(b["id"].startswith("toolu_") for b in starts) and starts[0]["id"] != starts[1]["id"]
    deltas = [d for name, d in events if name == "content_block_delta"]
    assert [(d["index"], d["delta"]["type"]) for d in deltas] == [(0, "input_json_delta"), (1, "input_json_delta")]
    assert [json.loads(d["delta"]["partial_json"]) for d in deltas] == [{"city": "Paris", "unit": "c"}, {"zone": "CET"}]
    assert events[-2][1]["delta"]["stop_reason"] == whole["stop_reason"] == "tool_use"
    assert [(b["type"], b["name"], b["input"]) for b in whole["content"]] == [
        ("tool_use", "weather", {"city": "Paris", "unit": "c"}),
        ("tool_use", "clock", {"zone": "CET"}),
    ]
    mine = rebuilt(events)["content"]
    assert [(b["name"], b["input"]) for b in mine] == [(b["name"], b["input"]) for b in whole["content"]]


def test_a_text_answer_under_auto_tools_is_one_text_block() -> None:
    events, whole = served([{"text": "Sunny"}, FINAL], tools=[WEATHER])
    assert [name for name, _ in events][1:5] == [
        "content_block_start",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
    ]
    assert whole["content"] == [{"type": "text", "text": "Sunny"}] and whole["stop_reason"] == "end_turn"


def test_a_node_failing_mid_stream_ends_it_with_an_error_event() -> None:
    node: list[StreamEvent] = [{"text": "Hel"}, {"error": {"message": "engine crashed"}}]
    req = read()

    async def streamed() -> bytes:
        return b"".join([c async for c in answers.sse(CTX, Scripted(node), MESSAGES.renderer(CTX, req, "i", "m"))])

    events = sse(asyncio.run(streamed()))
    assert [name for name, _ in events] == ["message_start", "content_block_start", "content_block_delta", "error"]
    assert events[-1][1] == {"type": "error", "error": {"type": "api_error", "message": "engine crashed"}}
    with pytest.raises(APIError) as whole:
        asyncio.run(answers.collect(CTX, Scripted(node), MESSAGES.renderer(CTX, req, "i", "m")))
    assert whole.value.status == 502 and orjson.loads(error(whole.value))["error"]["type"] == "api_error"


# -- the route, in process ---------------------------------------------------------------------------------------


def with_gateway(tmp: Path, check: Any) -> None:
    """Run `check(client)` against an in-process gateway (no nodes) over ASGI."""
    store = Store(f"sqlite:///{tmp / 'gateway.db'}")
    store.migrate()
    gw = Gateway(GatewayConfig(api_keys=(API_KEY,), max_body_bytes=4000), store, Identity.generate())

    async def go() -> None:
        transport = httpx.ASGITransport(app=build_gateway_app(gw))
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
            await check(client)

    try:
        asyncio.run(go())
    finally:
        gw.writer.close()
        store.close()


def test_the_route_answers_in_anthropics_format(tmp_path: Path) -> None:
    assert ROUTES["/v1/messages"] is MESSAGES
    key = {"x-api-key": API_KEY, "anthropic-version": "2023-06-01"}

    async def check(client: httpx.AsyncClient) -> None:
        async def post(body: Any, headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
            resp = await client.post("/v1/messages", content=orjson.dumps(body), headers=headers)
            assert resp.headers["content-type"] == "application/json"
            return resp.status_code, resp.json()["error"]

        assert await post(BASE, {"x-api-key": "wrong"}) == (
            401,
            {"type": "authentication_error", "message": unauthorized().message},
        )
        status, err = await post({**BASE, "max_tokens": None}, key)
        assert (status, err["type"]) == (400, "invalid_request_error") and "max_tokens" in err["message"]
        status, err = await post(BASE, {"authorization": f"Bearer {API_KEY}"})  # no node serves "m"
        assert (status, err["type"]) == (404, "not_found_error") and "'m'" in err["message"]
        status, err = await post({**BASE, "system": "x" * 5000}, key)
        assert (status, err["type"]) == (413, "request_too_large")

    with_gateway(tmp_path, check)


def test_the_openapi_document_has_the_route(tmp_path: Path) -> None:
    async def check(client: httpx.AsyncClient) -> None:
        doc = (await client.get("/openapi.json")).json()
        op = doc["paths"]["/v1/messages"]["post"]
        assert op["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/MessagesRequest")
        assert op["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/AnthropicMessage")
        assert "message_start" in op["responses"]["200"]["content"]["text/event-stream"]["schema"]["description"]
        for status in ("400", "401", "404", "413", "502", "503"):
            assert op["responses"][status]["content"]["application/json"]["schema"]["$ref"].endswith("/AnthropicError")
        request = doc["components"]["schemas"]["MessagesRequest"]
        assert request["additionalProperties"] is False and {"model", "max_tokens", "messages"} <= set(
            request["required"]
        )
        count = doc["paths"]["/v1/messages/count_tokens"]["post"]
        assert count["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/CountTokensRequest")
        assert set(count["responses"]["200"]["content"]) == {"application/json"}, "never streamed"
        assert count["responses"]["400"]["content"]["application/json"]["schema"]["$ref"].endswith("/AnthropicError")
        counting = doc["components"]["schemas"]["CountTokensRequest"]
        assert {"model", "messages"} <= set(counting["required"]) and "max_tokens" not in counting["properties"]
        chat = doc["paths"]["/v1/chat/completions"]["post"]["responses"]["400"]["content"]["application/json"]
        assert chat["schema"]["$ref"].endswith("/ErrorResponse")  # the OpenAI routes keep OpenAI's errors

    with_gateway(tmp_path, check)
