"""Tool calling through the official openai SDK on a running grid (the tiny model and an emulated card): calls
come back in OpenAI's shape, streamed (their arguments as they are made) and not, each naming a declared tool with
arguments valid under its parameters (the node decodes under their grammar); a conversation carrying calls and
their results continues; bad tool input is a 400 naming the field."""

import json
from typing import Any

import jsonschema
import openai
import pytest
from openai import OpenAI
from tests.conftest import API_KEY, streamed_calls

from gridserve.cli.grid import LocalGrid
from gridserve.engines.tiny import TINY_MODEL

EMULATED = "llama-3-8b"
WEATHER_PARAMS = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["c", "f"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TIME_PARAMS = {
    "type": "object",
    "properties": {"zone": {"type": "string", "maxLength": 8}},
    "required": ["zone"],
    "additionalProperties": False,
}
TOOLS: Any = [
    {
        "type": "function",
        "function": {"name": "weather", "description": "The weather in a city", "parameters": WEATHER_PARAMS},
    },
    {"type": "function", "function": {"name": "clock", "description": "The time in a zone", "parameters": TIME_PARAMS}},
]
PARAMS = {"weather": WEATHER_PARAMS, "clock": TIME_PARAMS}
ASK: Any = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def client(tiny_grid: LocalGrid) -> OpenAI:
    return OpenAI(base_url=tiny_grid.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


def valid(calls: Any) -> list[tuple[str, dict[str, Any]]]:
    made = []
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        arguments = json.loads(call.function.arguments)
        jsonschema.validate(arguments, PARAMS[call.function.name])
        made.append((call.function.name, arguments))
    return made


@pytest.mark.parametrize("model", [TINY_MODEL, EMULATED])
def test_a_required_call_comes_back_as_openais_tool_calls(client: OpenAI, model: str) -> None:
    for seed in range(3):
        reply = client.chat.completions.create(
            model=model, messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=600, seed=seed
        )
        choice = reply.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        assert choice.message.tool_calls and 1 <= len(valid(choice.message.tool_calls)) <= 8


def test_a_named_function_is_the_one_called_once(client: OpenAI) -> None:
    for seed in range(3):
        reply = client.chat.completions.create(
            model=TINY_MODEL,
            messages=ASK,
            tools=TOOLS,
            tool_choice={"type": "function", "function": {"name": "clock"}},
            max_tokens=120,
            seed=seed,
        )
        assert [name for name, _ in valid(reply.choices[0].message.tool_calls)] == ["clock"]


def test_streamed_calls_arrive_in_openais_chunk_shape(client: OpenAI) -> None:
    stream = client.chat.completions.create(
        model=TINY_MODEL,
        messages=ASK,
        tools=TOOLS,
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=200,
        stream=True,
    )
    chunks = list(stream)
    deltas = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or []]
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    calls = streamed_calls(chunks)
    assert reasons == ["tool_calls"] and len(calls) == 1
    assert len(deltas) > 2, "the arguments come as they are made, not whole at the end"
    assert not any(c.choices[0].delta.content for c in chunks if c.choices), "calls, not text"
    valid(calls)


def test_auto_answers_text_or_valid_calls_and_a_conversation_with_results_continues(client: OpenAI) -> None:
    for seed in range(4):
        reply = client.chat.completions.create(model=TINY_MODEL, messages=ASK, tools=TOOLS, max_tokens=60, seed=seed)
        message = reply.choices[0].message
        if message.tool_calls:
            valid(message.tool_calls)
    history: Any = [
        *ASK,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "weather", "arguments": '{"city":"Paris","unit":"c"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees, clear"},
    ]
    follow = client.chat.completions.create(
        model=TINY_MODEL, messages=history, tools=TOOLS, tool_choice="none", max_tokens=12, temperature=0
    )
    assert follow.choices[0].message.tool_calls is None and follow.choices[0].message.content


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"tools": [{"type": "function", "function": {}}]}, "tools[0]"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
    ],
)
def test_bad_tool_input_is_a_400_naming_the_field(client: OpenAI, extra: dict[str, Any], param: str) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=TINY_MODEL, messages=ASK, max_tokens=8, extra_body=extra)
    assert refused.value.body is not None and refused.value.body["param"] == param, refused.value.body  # type: ignore[index]


def test_tools_on_the_text_completions_endpoint_are_refused(client: OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        client.completions.create(model=TINY_MODEL, prompt="x", max_tokens=4, extra_body={"tools": TOOLS})
    assert refused.value.body["code"] == "unsupported_parameter" and refused.value.body["param"] == "tools"  # type: ignore[index]
