"""Anthropic's Messages API through the official anthropic SDK on a running grid (the tiny model): a greedy answer
is the one the OpenAI chat endpoint gives for the same conversation, whole and streamed; stop sequences and the
system prompt reach the node; forced tool use comes back as `tool_use` blocks whose input validates against the
tool's input_schema, streamed and not; a conversation carrying tool_use and tool_result blocks continues as the
chat endpoint's does; count_tokens gives the input tokens a message with that input is given; a wrong key and bad or
unsupported input are Anthropic's errors naming what is wrong."""

import json
from typing import Any

import anthropic
import jsonschema
import pytest
from anthropic import Anthropic
from openai import OpenAI
from tests.conftest import API_KEY

from gridserve.cli.grid import LocalGrid
from gridserve.engines.tiny import TINY_MODEL

WEATHER_SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["c", "f"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
CLOCK_SCHEMA = {
    "type": "object",
    "properties": {"zone": {"type": "string", "maxLength": 8}},
    "required": ["zone"],
    "additionalProperties": False,
}
TOOLS: Any = [
    {"name": "weather", "description": "The weather in a city", "input_schema": WEATHER_SCHEMA},
    {"name": "clock", "description": "The time in a zone", "input_schema": CLOCK_SCHEMA},
]
SCHEMAS = {"weather": WEATHER_SCHEMA, "clock": CLOCK_SCHEMA}
ASK: Any = [{"role": "user", "content": "What is the weather in Paris?"}]
GREEDY_TOKENS = 24
GREEDY: Any = {"extra_body": {"temperature": 0}}
"""Sampling parameters are not arguments of the SDK's `messages.create` (2.x): sent in the body as Anthropic's
API takes them."""


@pytest.fixture(scope="module")
def client(tiny_grid: LocalGrid) -> Anthropic:
    return Anthropic(base_url=tiny_grid.url, api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def chat(tiny_grid: LocalGrid) -> OpenAI:
    return OpenAI(base_url=tiny_grid.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


def text_of(message: anthropic.types.Message) -> str:
    assert all(block.type == "text" for block in message.content), message.content
    return "".join(block.text for block in message.content if block.type == "text")


def greedy_chat(chat: OpenAI, messages: Any, max_tokens: int = GREEDY_TOKENS, **extra: Any) -> Any:
    return chat.chat.completions.create(
        model=TINY_MODEL, messages=messages, max_tokens=max_tokens, temperature=0, **extra
    ).choices[0]


def test_a_greedy_answer_is_the_chat_endpoints_answer(client: Anthropic, chat: OpenAI) -> None:
    message = client.messages.create(model=TINY_MODEL, max_tokens=GREEDY_TOKENS, **GREEDY, messages=ASK)
    assert message.type == "message" and message.role == "assistant" and message.model == TINY_MODEL
    assert message.id.startswith("msg_") and message.stop_sequence is None
    choice = greedy_chat(chat, ASK)
    assert text_of(message) == choice.message.content and text_of(message)
    assert message.stop_reason == {"stop": "end_turn", "length": "max_tokens"}[choice.finish_reason]
    usage = message.usage
    assert 0 < usage.output_tokens <= GREEDY_TOKENS and usage.cache_creation_input_tokens == 0
    assert usage.input_tokens + (usage.cache_read_input_tokens or 0) > len("What is the weather in Paris?") // 4


def test_the_system_prompt_is_the_chat_endpoints_system_message(client: Anthropic, chat: OpenAI) -> None:
    system = "You answer in French."
    message = client.messages.create(model=TINY_MODEL, max_tokens=GREEDY_TOKENS, **GREEDY, system=system, messages=ASK)
    with_system = greedy_chat(chat, [{"role": "system", "content": system}, *ASK]).message.content
    assert text_of(message) == with_system and with_system != greedy_chat(chat, ASK).message.content


def test_a_stop_sequence_ends_the_answer_before_it(client: Anthropic) -> None:
    full = text_of(client.messages.create(model=TINY_MODEL, max_tokens=GREEDY_TOKENS, **GREEDY, messages=ASK))
    assert len(full) >= 6, full
    stop = full[3:6]
    cut = client.messages.create(
        model=TINY_MODEL, max_tokens=GREEDY_TOKENS, **GREEDY, messages=ASK, stop_sequences=[stop]
    )
    assert text_of(cut) == full[: full.index(stop)]
    assert cut.stop_reason == "stop_sequence" and cut.stop_sequence == stop
    with client.messages.stream(
        model=TINY_MODEL, max_tokens=GREEDY_TOKENS, **GREEDY, messages=ASK, stop_sequences=["~never~", stop]
    ) as stream:
        assert "".join(stream.text_stream) == text_of(cut)
        final = stream.get_final_message()
    assert (final.stop_reason, final.stop_sequence) == ("stop_sequence", stop)
    ended = client.messages.create(model=TINY_MODEL, max_tokens=3, **GREEDY, messages=ASK, stop_sequences=["~never~"])
    assert (ended.stop_reason, ended.stop_sequence) == ("max_tokens", None)


def test_a_streamed_answer_is_the_whole_answer(client: Anthropic) -> None:
    whole = client.messages.create(model=TINY_MODEL, max_tokens=GREEDY_TOKENS, **GREEDY, messages=ASK)
    with client.messages.stream(model=TINY_MODEL, max_tokens=GREEDY_TOKENS, **GREEDY, messages=ASK) as stream:
        streamed = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert streamed == text_of(final) == text_of(whole) and streamed
    assert final.stop_reason == whole.stop_reason and final.id.startswith("msg_")
    assert final.usage.output_tokens == whole.usage.output_tokens
    assert final.usage.input_tokens + (final.usage.cache_read_input_tokens or 0) == whole.usage.input_tokens + (
        whole.usage.cache_read_input_tokens or 0
    )


def tool_uses(message: anthropic.types.Message) -> list[tuple[str, dict[str, Any]]]:
    assert message.stop_reason == "tool_use" and message.content
    made = []
    for block in message.content:
        assert block.type == "tool_use", block
        assert block.id.startswith("toolu_")
        jsonschema.validate(block.input, SCHEMAS[block.name])
        made.append((block.name, dict(block.input)))
    assert len({b.id for b in message.content if b.type == "tool_use"}) == len(made)
    return made


def test_tool_choice_any_comes_back_as_valid_tool_use_blocks(client: Anthropic) -> None:
    for _ in range(2):  # sampled: two different answers, each a valid call
        message = client.messages.create(
            model=TINY_MODEL, max_tokens=600, messages=ASK, tools=TOOLS, tool_choice={"type": "any"}
        )
        assert 1 <= len(tool_uses(message)) <= 8


def test_a_named_tool_is_the_one_used_once(client: Anthropic) -> None:
    message = client.messages.create(
        model=TINY_MODEL, max_tokens=200, messages=ASK, tools=TOOLS, tool_choice={"type": "tool", "name": "clock"}
    )
    assert [name for name, _ in tool_uses(message)] == ["clock"]


def test_streamed_tool_use_is_tool_use_blocks_made_as_they_come_and_no_text(client: Anthropic) -> None:
    with client.messages.stream(
        model=TINY_MODEL,
        max_tokens=300,
        messages=ASK,
        tools=TOOLS,
        tool_choice={"type": "any", "disable_parallel_tool_use": True},
    ) as stream:
        events = list(stream)
        final = stream.get_final_message()
    assert len(tool_uses(final)) == 1
    starts = [e.content_block.type for e in events if e.type == "content_block_start"]
    assert starts == ["tool_use"] and not [e for e in events if e.type == "text"]
    deltas = [e.delta for e in events if e.type == "content_block_delta"]
    assert {d.type for d in deltas} == {"input_json_delta"} and len(deltas) > 1, "the input as it is made"
    assert json.loads("".join(d.partial_json for d in deltas)) == final.content[0].input  # type: ignore[union-attr]


def test_a_conversation_with_a_tool_result_continues_as_the_chat_endpoints(client: Anthropic, chat: OpenAI) -> None:
    arguments = {"city": "Paris", "unit": "c"}
    history: Any = [
        *ASK,
        {
            "role": "assistant",
            "content": [{"type": "tool_use", "id": "toolu_1", "name": "weather", "input": arguments}],
        },
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "18 degrees, clear"}],
        },
    ]
    follow = client.messages.create(
        model=TINY_MODEL,
        max_tokens=12,
        **GREEDY,
        messages=history,
        tools=TOOLS,
        tool_choice={"type": "none"},
    )
    call = {"id": "toolu_1", "type": "function", "function": {"name": "weather", "arguments": json.dumps(arguments)}}
    openai_history: Any = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "toolu_1", "content": "18 degrees, clear"},
    ]
    openai_tools = [
        {
            "type": "function",
            "function": {"name": t["name"], "description": t["description"], "parameters": t["input_schema"]},
        }
        for t in TOOLS
    ]
    expected = greedy_chat(chat, openai_history, 12, tools=openai_tools, tool_choice="none").message.content
    assert text_of(follow) == expected and expected
    without_result = greedy_chat(chat, ASK, 12, tools=openai_tools, tool_choice="none").message.content
    assert expected != without_result  # the result did reach the model


def test_a_wrong_key_is_an_authentication_error(tiny_grid: LocalGrid) -> None:
    wrong = Anthropic(base_url=tiny_grid.url, api_key="wrong-key", max_retries=0, timeout=30)
    with pytest.raises(anthropic.AuthenticationError) as refused:
        wrong.messages.create(model=TINY_MODEL, max_tokens=4, messages=ASK)
    assert refused.value.status_code == 401
    body: Any = refused.value.body
    assert body["type"] == "error" and body["error"]["type"] == "authentication_error" and body["error"]["message"]


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"max_tokens": anthropic.omit}, "max_tokens"),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": "What is this?"},
                            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AA=="}},
                        ],
                    }
                ]
            },
            "messages[0].content[1]",
        ),
        ({"thinking": {"type": "enabled", "budget_tokens": 1024}}, "thinking"),
        ({"extra_body": {"temperature": 1.5}}, "temperature"),
        ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "tools[0]"),
        ({"messages": [*ASK, {"role": "assistant", "content": "It is"}]}, "messages"),
    ],
    ids=["no max_tokens", "an image block", "thinking", "temperature over 1", "a server tool", "prefill"],
)
def test_bad_input_is_a_bad_request_naming_the_parameter(client: Anthropic, fields: dict[str, Any], named: str) -> None:
    body: dict[str, Any] = {"model": TINY_MODEL, "max_tokens": 8, "messages": ASK, **fields}
    with pytest.raises(anthropic.BadRequestError) as refused:
        client.messages.create(**body)
    error = refused.value.body["error"]  # type: ignore[index]
    assert error["type"] == "invalid_request_error" and named in error["message"], error


def test_an_unknown_model_is_not_found(client: Anthropic) -> None:
    with pytest.raises(anthropic.NotFoundError) as missing:
        client.messages.create(model="no-such-model", max_tokens=4, messages=ASK)
    assert missing.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]


def test_count_tokens_is_the_input_a_message_with_it_is_given(client: Anthropic) -> None:
    system = "You answer in one word."
    counted = client.messages.count_tokens(model=TINY_MODEL, messages=ASK, system=system)
    answered = client.messages.create(model=TINY_MODEL, max_tokens=4, messages=ASK, system=system, **GREEDY)
    given = answered.usage.input_tokens + (answered.usage.cache_read_input_tokens or 0)
    assert counted.input_tokens == given > 0
    with_tools = client.messages.count_tokens(model=TINY_MODEL, messages=ASK, system=system, tools=TOOLS)
    calling = client.messages.create(model=TINY_MODEL, max_tokens=4, messages=ASK, system=system, tools=TOOLS)
    assert with_tools.input_tokens == calling.usage.input_tokens + (calling.usage.cache_read_input_tokens or 0)
    assert with_tools.input_tokens > counted.input_tokens, "the tools are described to the model"
    longer = client.messages.count_tokens(
        model=TINY_MODEL, messages=[*ASK, {"role": "assistant", "content": "Sunny."}, *ASK], system=system
    )
    assert longer.input_tokens > counted.input_tokens


@pytest.mark.parametrize(("extra", "param"), [({"max_tokens": 8}, "max_tokens"), ({"stream": True}, "stream")])
def test_count_tokens_refuses_an_answers_parameters_by_name(client: Anthropic, extra: Any, param: str) -> None:
    with pytest.raises(anthropic.BadRequestError) as refused:
        client.messages.count_tokens(model=TINY_MODEL, messages=ASK, extra_body=extra)
    assert refused.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]
    assert param in refused.value.body["error"]["message"]  # type: ignore[index]
    with pytest.raises(anthropic.NotFoundError):
        client.messages.count_tokens(model="no-such-model", messages=ASK)
