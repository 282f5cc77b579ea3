"""Tool calling's parts without a grid: OpenAI's tools and tool_choice as the node's grammar, the conversation
rendered for the model, the tiny engine decoding calls under the grammar (every call that ends by itself is valid),
the gateway's check of a call, and audits of calling answers."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest

from gridserve.engines.tiny import TINY_MODEL
from gridserve.engines.torch_engine import TorchEngine
from gridserve.gateway.api.errors import APIError
from gridserve.gateway.api.schemas import Message
from gridserve.gateway.api.tools import TOOLS_PREAMBLE, parse_calls, render, tool_format, uses_tools, validate
from gridserve.gateway.integrity.audit import Verifier
from gridserve.trust import proofs
from gridserve.trust.testing import unsigned_receipt
from gridserve.types import GenerateRequest, SamplingParams, TokenEvent
from gridserve.types.wire import TOOL_CALL_TAG, ResponseFormat

ADD = {
    "type": "object",
    "properties": {
        "a": {"type": "integer", "minimum": 0, "maximum": 99},
        "b": {"type": "integer", "minimum": 0, "maximum": 99},
    },
    "required": ["a", "b"],
    "additionalProperties": False,
}
SAY = {
    "type": "object",
    "properties": {"text": {"type": "string", "maxLength": 10}},
    "required": ["text"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "add", "description": "Adds", "parameters": ADD}},
    {"type": "function", "function": {"name": "say", "parameters": SAY}},
]


def calls_schema(fmt: ResponseFormat | None) -> dict[str, Any]:
    assert fmt is not None and fmt.type == "tool_calls"
    return fmt.answer_schema()


def test_tool_choice_sets_how_many_calls_of_which_tools_and_whether_text_may_answer() -> None:
    required, described = tool_format(TOOLS, "required", None)
    schema = calls_schema(required)
    assert (
        required is not None
        and not required.optional
        and schema["maxItems"] == 8
        and len(schema["items"]["anyOf"]) == 2
    )
    assert described.startswith(TOOLS_PREAMBLE) and '"name":"add"' in described and '"description":"Adds"' in described
    auto, _ = tool_format(TOOLS, None, None)
    assert auto is not None and auto.optional
    single, _ = tool_format(TOOLS, "auto", False)
    assert calls_schema(single)["maxItems"] == 1
    named, _ = tool_format(TOOLS, {"type": "function", "function": {"name": "say"}}, True)
    items = calls_schema(named)["items"]["anyOf"]
    assert [i["properties"]["name"]["const"] for i in items] == ["say"] and calls_schema(named)["maxItems"] == 1
    none, described_anyway = tool_format(TOOLS, "none", None)
    assert none is None and described_anyway == described
    assert tool_format(None, None, None) == (None, "")


@pytest.mark.parametrize(
    ("tools", "choice", "param"),
    [
        ([{"type": "function"}], None, "tools[0]"),
        ([{"type": "retrieval", "function": {"name": "x"}}], None, "tools[0]"),
        ([TOOLS[0], TOOLS[0]], None, "tools"),
        ("add", None, "tools"),
        (TOOLS, {"type": "function", "function": {"name": "mul"}}, "tool_choice"),
        (TOOLS, "maybe", "tool_choice"),
        (None, "required", "tool_choice"),
        ([{"type": "function", "function": {"name": "x", "parameters": "none"}}], None, "tools[0]"),
        ([{"type": "function", "function": {"name": "x", "parameters": {"type": "frobnicate"}}}], None, "tools"),
    ],
)
def test_bad_tools_are_a_400_naming_the_field(tools: Any, choice: Any, param: str) -> None:
    with pytest.raises(APIError) as refused:
        tool_format(tools, choice, None)
    assert (refused.value.status, refused.value.param) == (400, param)


def test_a_conversation_with_calls_and_results_reads_as_alternating_turns() -> None:
    messages = [
        Message(role="system", content="Be exact."),
        Message(role="user", content="2+3?"),
        Message.model_validate(
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [{"id": "c1", "function": {"name": "add", "arguments": '{"a":2,"b":3}'}}],
            }
        ),
        Message.model_validate({"role": "tool", "tool_call_id": "c1", "content": "5"}),
        Message(role="user", content="Thanks"),
    ]
    assert uses_tools(messages) and not uses_tools(messages[:2])
    _, described = tool_format(TOOLS, "auto", None)
    turns = render(messages, described)
    assert [t.role for t in turns] == ["system", "user", "assistant", "user"]
    assert turns[0].content == described + "\nBe exact."
    assert turns[2].content == TOOL_CALL_TAG + '[{"name":"add","arguments":{"a":2,"b":3}}]'
    assert turns[3].content == "<tool_response name='add'>5</tool_response>\nThanks"


def test_the_gateway_checks_a_call_against_its_tools() -> None:
    fmt, _ = tool_format(TOOLS, "required", None)
    assert fmt is not None
    good = TOOL_CALL_TAG + '[{"name":"add","arguments":{"a":1,"b":2}},{"name":"say","arguments":{"text":"hi"}}]'
    assert validate(good, fmt) == ""
    calls = parse_calls(good)
    assert calls is not None and [(c.name, c.arguments) for c in calls] == [
        ("add", {"a": 1, "b": 2}),
        ("say", {"text": "hi"}),
    ]
    assert len({c.id for c in calls}) == 2
    assert "does not match" in validate(TOOL_CALL_TAG + '[{"name":"mul","arguments":{"a":1,"b":2}}]', fmt)
    assert "does not match" in validate(TOOL_CALL_TAG + '[{"name":"add","arguments":{"a":"1","b":2}}]', fmt)
    assert validate("plain words", fmt) == "the answer is not tool calls"
    auto, _ = tool_format(TOOLS, "auto", None)
    assert auto is not None and validate("plain words", auto) == ""


def run(engine: TorchEngine, request: GenerateRequest) -> tuple[list[int], list[TokenEvent]]:
    async def go() -> list[TokenEvent]:
        return [e async for e in engine.generate(request)]

    events = asyncio.run(go())
    return [t for e in events for t in e.token_ids], events


def job(fmt: ResponseFormat, seed: int, temperature: float = 1.0) -> GenerateRequest:
    sampling = SamplingParams(max_tokens=600, temperature=temperature, seed=seed, response_format=fmt)
    return GenerateRequest(request_id=f"t{seed}", model=TINY_MODEL, prompt="Call: ", sampling=sampling)


def test_every_call_the_tiny_engine_ends_by_itself_is_valid(tiny: TorchEngine) -> None:
    for choice in ("required", {"type": "function", "function": {"name": "add"}}):
        fmt, _ = tool_format(TOOLS, choice, None)
        assert fmt is not None
        for seed in range(12):
            _, events = run(tiny, job(fmt, seed, temperature=0.0 if seed == 0 else 1.0))
            text = "".join(e.text for e in events)
            assert events[-1].finish_reason == "stop" and validate(text, fmt) == "", (choice, seed, text)


needs_proofs = pytest.mark.skipif(not proofs.AVAILABLE, reason="toploc is not built here (make installs it)")


@needs_proofs
def test_calling_answers_pass_audit_and_an_altered_argument_does_not(tiny: TorchEngine) -> None:
    fmt, _ = tool_format(TOOLS, "required", None)
    assert fmt is not None
    verifier = Verifier(threads=1)
    for seed in range(4):
        request = job(fmt, seed, temperature=0.0 if seed % 2 else 1.0)
        ids, events = run(tiny, request)
        assert verifier.check(request, ids, unsigned_receipt(events[-1], TINY_MODEL)).ok
    request = job(fmt, 1, temperature=0.0)
    ids, events = run(tiny, request)
    text = "".join(e.text for e in events)
    digit = next(i for i, ch in enumerate(text) if ch.isdigit())  # a token inside the arguments
    altered = [*ids[:digit], ids[digit] ^ 1 if chr(ids[digit] - 3) != "9" else ids[digit] - 1, *ids[digit + 1 :]]
    result = verifier.check(request, altered, unsigned_receipt(events[-1], TINY_MODEL))
    assert not result.ok and any(f"greedy token {digit}" in p for p in result.problems), result.problems


def test_the_format_survives_the_wire() -> None:
    fmt, _ = tool_format(TOOLS, "auto", None)
    assert fmt is not None
    again = ResponseFormat.model_validate_json(orjson.dumps(fmt.model_dump(mode="json")))
    assert again == fmt and SamplingParams(response_format=fmt).features() == ("tools",)


def test_a_malformed_call_in_the_conversation_is_a_400_not_a_crash() -> None:
    with pytest.raises(APIError) as refused:
        render([Message.model_validate({"role": "assistant", "content": None, "tool_calls": ["add(1, 2)"]})], "")
    assert (refused.value.status, refused.value.param) == (400, "messages")
    odd = render(
        [Message.model_validate({"role": "assistant", "content": None, "tool_calls": [{"id": 1, "function": "f"}]})], ""
    )
    assert odd[0].content == TOOL_CALL_TAG + '[{"name":"","arguments":{}}]', (
        "a call without a function object names nothing"
    )
