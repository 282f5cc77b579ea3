"""OpenAI's Responses API through the official openai SDK on a running grid (the tiny model): a greedy answer is
the chat endpoint's for the same conversation, whole and streamed; `previous_response_id` continues a stored
response (also through another gateway on the same PostgreSQL database); function tools come back as
function_call items and a json_schema format as JSON that validates; stored responses are retrieved and deleted;
bad input is a 400 and an unknown response a 404."""

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import openai
import pytest
from openai import OpenAI
from tests.conftest import API_KEY, admin_get, two_gateways_on_pg

from gridserve.cli.grid import LocalGrid
from gridserve.engines.tiny import TINY_MODEL

WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["c", "f"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TOOLS: Any = [{"type": "function", "name": "weather", "description": "The weather in a city", "parameters": WEATHER}]
CITY = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "population": {"type": "integer", "minimum": 0, "maximum": 9999999},
        "capital": {"type": "boolean"},
    },
    "required": ["name", "population", "capital"],
    "additionalProperties": False,
}
GREEDY: Any = {"model": TINY_MODEL, "temperature": 0, "max_output_tokens": 12}


@pytest.fixture(scope="module")
def client(tiny_grid: LocalGrid) -> OpenAI:
    return OpenAI(base_url=tiny_grid.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


def chat_answer(client: OpenAI, messages: Any, max_tokens: int = 12) -> tuple[str, str, int, int]:
    """The chat endpoint's greedy answer: (text, finish reason, prompt tokens, completion tokens)."""
    reply = client.chat.completions.create(model=TINY_MODEL, messages=messages, temperature=0, max_tokens=max_tokens)
    choice, usage = reply.choices[0], reply.usage
    assert usage is not None
    return choice.message.content or "", choice.finish_reason, usage.prompt_tokens, usage.completion_tokens


def test_a_greedy_answer_is_the_chat_endpoints(client: OpenAI) -> None:
    prompt = "Tell me about the sea."
    response = client.responses.create(input=prompt, **GREEDY)
    text, reason, prompt_tokens, completion_tokens = chat_answer(client, [{"role": "user", "content": prompt}])
    assert response.output_text == text and text, "the same greedy answer, and not an empty one"
    assert response.status == ("incomplete" if reason == "length" else "completed")
    assert response.id.startswith("resp_") and response.object == "response" and response.model == TINY_MODEL
    assert response.usage is not None
    assert (response.usage.input_tokens, response.usage.output_tokens) == (prompt_tokens, completion_tokens)
    assert response.usage.total_tokens == prompt_tokens + completion_tokens
    (message,) = response.output
    assert message.type == "message" and message.id.startswith("msg_") and message.role == "assistant"


def test_a_streamed_answer_is_the_whole_ones(client: OpenAI) -> None:
    prompt = "Tell me about the sea."
    whole = client.responses.create(input=prompt, **GREEDY)
    events = list(client.responses.create(input=prompt, stream=True, **GREEDY))
    numbers = [e.sequence_number for e in events]
    assert numbers == sorted(set(numbers)) and numbers[0] == 0
    assert events[0].type == "response.created" and events[-1].type in ("response.completed", "response.incomplete")
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    last = events[-1]
    assert last.type in ("response.completed", "response.incomplete")
    assert deltas == last.response.output_text == whole.output_text and deltas
    assert client.responses.retrieve(last.response.id).output_text == deltas


def test_previous_response_id_continues_the_conversation(client: OpenAI) -> None:
    first_ask, second_ask = "The sea is", "And the sky?"
    first = client.responses.create(input=first_ask, instructions="You are a poet.", **GREEDY)
    second = client.responses.create(input=second_ask, previous_response_id=first.id, **GREEDY)
    assert first.usage is not None and second.usage is not None
    assert second.previous_response_id == first.id and second.instructions is None
    assert second.usage.input_tokens >= first.usage.input_tokens + first.usage.output_tokens
    conversation = [  # the instructions are not carried over
        {"role": "user", "content": first_ask},
        {"role": "assistant", "content": first.output_text},
        {"role": "user", "content": second_ask},
    ]
    text, _, prompt_tokens, _ = chat_answer(client, conversation)
    assert second.output_text == text and second.usage.input_tokens == prompt_tokens
    with_poet = chat_answer(client, [{"role": "system", "content": "You are a poet."}, *conversation])
    assert with_poet[2] > prompt_tokens, "the instructions would have counted"
    third = client.responses.create(input="And the land?", previous_response_id=second.id, **GREEDY)
    assert third.usage is not None and third.usage.input_tokens >= prompt_tokens + second.usage.output_tokens
    items = list(client.responses.input_items.list(second.id, order="asc"))  # the conversation it answered
    seen = [(i.type, i.role, "".join(p.text for p in i.content)) for i in items]  # type: ignore[union-attr]
    assert seen == [("message", m["role"], m["content"]) for m in conversation]
    newest = client.responses.input_items.list(third.id, limit=2)  # newest first by default, two a page
    assert [i.content[0].text for i in newest.data] == ["And the land?", second.output_text]  # type: ignore[union-attr]
    assert newest.has_more and newest.last_id == newest.data[-1].id
    rest = client.responses.input_items.list(third.id, limit=2, after=newest.last_id)
    assert [i.content[0].text for i in rest.data] == [second_ask, first.output_text]  # type: ignore[union-attr]


def valid_calls(output: Any) -> list[Any]:
    calls = [item for item in output if item.type == "function_call"]
    assert calls and len(calls) == len(output), "only function calls"
    for call in calls:
        assert call.name == "weather" and call.call_id.startswith("call_") and call.id.startswith("fc_")
        jsonschema.validate(json.loads(call.arguments), WEATHER)
    return calls


def test_function_tools_give_function_call_items_and_take_their_outputs(client: OpenAI) -> None:
    asked = client.responses.create(
        model=TINY_MODEL,
        input="What is the weather in Paris?",
        tools=TOOLS,
        tool_choice="required",
        max_output_tokens=400,
        temperature=0,  # sampled, the tiny model may go on making calls past 400 tokens
    )
    assert asked.status == "completed" and asked.output_text == ""
    calls = valid_calls(asked.output)
    named = client.responses.create(
        model=TINY_MODEL,
        input="Weather?",
        tools=TOOLS,
        tool_choice={"type": "function", "name": "weather"},
        parallel_tool_calls=False,
        max_output_tokens=400,
        stream=True,
    )
    events = list(named)
    done = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert len(done) == 1 and events[-1].type == "response.completed"
    assert valid_calls(events[-1].response.output)[0].arguments == done[0].arguments
    added = [e.item for e in events if e.type == "response.output_item.added"]
    deltas = [e for e in events if e.type == "response.function_call_arguments.delta"]
    assert len(deltas) > 1 and "".join(d.delta for d in deltas) == done[0].arguments, "arguments as they are made"
    assert {d.item_id for d in deltas} == {added[0].id, done[0].item_id} == {events[-1].response.output[0].id}
    assert events.index(next(e for e in events if e.type == "response.output_item.added")) < events.index(deltas[0])
    outputs: Any = [{"type": "function_call_output", "call_id": c.call_id, "output": "18 C, clear"} for c in calls]
    follow = client.responses.create(
        previous_response_id=asked.id, input=outputs, tools=TOOLS, tool_choice="none", **GREEDY
    )
    assert follow.usage is not None and asked.usage is not None
    assert follow.usage.input_tokens > asked.usage.input_tokens + asked.usage.output_tokens
    assert all(item.type == "message" for item in follow.output)
    items = list(client.responses.input_items.list(follow.id, order="asc"))
    assert [i.type for i in items] == ["message"] + ["function_call"] * len(calls) + ["function_call_output"] * len(
        calls
    )
    made = [(i.call_id, i.name, i.arguments) for i in items if i.type == "function_call"]  # type: ignore[union-attr]
    assert made == [(c.call_id, c.name, c.arguments) for c in calls]
    answered = [(i.call_id, i.output) for i in items if i.type == "function_call_output"]  # type: ignore[union-attr]
    assert answered == [(c.call_id, "18 C, clear") for c in calls]


def test_a_json_schema_format_answers_json_that_validates(client: OpenAI) -> None:
    text: Any = {"format": {"type": "json_schema", "name": "city", "schema": CITY, "strict": True}}
    for temperature in (0, 1):
        response = client.responses.create(
            model=TINY_MODEL, input="Name a city.", text=text, temperature=temperature, max_output_tokens=200
        )
        assert response.status == "completed" and response.text is not None
        assert response.text.format is not None and response.text.format.type == "json_schema"
        jsonschema.validate(json.loads(response.output_text), CITY)
    with client.responses.stream(model=TINY_MODEL, input="Name a city.", text=text, max_output_tokens=200) as stream:
        deltas = "".join(e.delta for e in stream if e.type == "response.output_text.delta")
        final = stream.get_final_response()  # the SDK's own accumulation of the events
    assert final.status == "completed" and final.output_text == deltas
    jsonschema.validate(json.loads(deltas), CITY)


def test_stored_responses_are_retrieved_and_deleted(client: OpenAI) -> None:
    response = client.responses.create(input="Hello", metadata={"case": "retrieve"}, **GREEDY)
    found = client.responses.retrieve(response.id)
    assert (found.id, found.output_text, found.metadata) == (response.id, response.output_text, {"case": "retrieve"})
    assert found.usage == response.usage and found.store is True
    client.responses.delete(response.id)
    for gone in (
        lambda: client.responses.retrieve(response.id),
        lambda: client.responses.delete(response.id),
        lambda: client.responses.create(input="Hi", previous_response_id=response.id, **GREEDY),
    ):
        with pytest.raises(openai.NotFoundError):
            gone()
    unkept = client.responses.create(input="Hello", store=False, **GREEDY)
    assert unkept.store is False
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unkept.id)


def test_an_unknown_previous_response_is_a_404_naming_it(client: OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as missing:
        client.responses.create(input="Hi", previous_response_id="resp_0123456789abcdef", **GREEDY)
    assert isinstance(missing.value.body, dict) and missing.value.body["param"] == "previous_response_id"
    assert missing.value.body["code"] == "previous_response_not_found"


@pytest.mark.parametrize(
    ("patch", "param"),
    [
        ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "https://x/y.png"}]}]}, "input"),
        ({"tools": [{"type": "web_search"}]}, "tools[0]"),
        ({"reasoning": {"effort": "high"}}, "reasoning"),
        ({"background": True, "stream": True}, "stream"),
        ({"background": True, "store": False}, "store"),
        ({"include": ["message.output_text.logprobs"]}, "include"),
        ({"text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "frobnicate"}}}}, "text.format"),
        ({"temperature": 5}, "temperature"),
    ],
)
def test_bad_input_is_a_400_naming_it(client: OpenAI, patch: dict[str, Any], param: str) -> None:
    body: Any = {"input": "Hi", **GREEDY, **patch}
    with pytest.raises(openai.BadRequestError) as refused:
        client.responses.create(**body)
    assert isinstance(refused.value.body, dict) and str(refused.value.body["param"]).startswith(param)


def until_done(client: OpenAI, response_id: str, within_s: float = 60.0) -> Any:
    """The background response, read again until it has ended (or `within_s` passed)."""
    deadline = time.monotonic() + within_s
    found = client.responses.retrieve(response_id)
    while found.status in ("queued", "in_progress") and time.monotonic() < deadline:
        time.sleep(0.05)
        found = client.responses.retrieve(response_id)
    return found


def test_a_background_response_is_queued_then_polled_to_the_same_answer(client: OpenAI) -> None:
    prompt = "Tell me about the sea."
    queued = client.responses.create(input=prompt, background=True, metadata={"case": "background"}, **GREEDY)
    assert queued.status in ("queued", "in_progress") and queued.background is True and queued.output == []
    done = until_done(client, queued.id)
    text, reason, prompt_tokens, completion_tokens = chat_answer(client, [{"role": "user", "content": prompt}])
    assert done.status == ("incomplete" if reason == "length" else "completed"), done
    assert (done.id, done.created_at, done.background, done.metadata) == (
        queued.id,
        queued.created_at,
        True,
        {"case": "background"},
    )
    assert done.output_text == text and text and done.usage is not None
    assert (done.usage.input_tokens, done.usage.output_tokens) == (prompt_tokens, completion_tokens)
    items = client.responses.input_items.list(queued.id)
    assert [i.type for i in items.data] == ["message"]
    later = client.responses.create(input="And the sky?", previous_response_id=queued.id, **GREEDY)
    assert later.output_text, "a background response is continued like any other"
    assert client.responses.cancel(queued.id).status == done.status, "an ended response is returned as it is"


def test_a_background_response_cancelled_under_way_stays_cancelled(client: OpenAI, tiny_grid: LocalGrid) -> None:
    """On the emulated card, 400 tokens of llama-3-8b take seconds: the cancel lands while it runs."""
    queued = client.responses.create(model="llama-3-8b", input="A long story", max_output_tokens=400, background=True)
    until = time.monotonic() + 30
    while client.responses.retrieve(queued.id).status == "queued" and time.monotonic() < until:
        time.sleep(0.02)
    cancelled = client.responses.cancel(queued.id)
    assert cancelled.status == "cancelled" and cancelled.id == queued.id and cancelled.output == []
    time.sleep(0.5)
    assert client.responses.retrieve(queued.id).status == "cancelled"
    nodes = admin_get(tiny_grid, "/admin/nodes").json()["nodes"]
    assert sum(int(n["outstanding"]) for n in nodes) == 0, "the node's work was stopped too"
    whole = client.responses.create(input="Hello", **GREEDY)
    with pytest.raises(openai.BadRequestError) as refused:
        client.responses.cancel(whole.id)
    assert isinstance(refused.value.body, dict) and refused.value.body["code"] == "not_background"
    with pytest.raises(openai.NotFoundError):
        client.responses.cancel("resp_0123456789abcdef")


def test_an_error_from_the_core_names_the_responses_parameter(client: OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(model=TINY_MODEL, input="The sea is", max_output_tokens=100_000)
    error = caught.value.body
    assert isinstance(error, dict) and error["param"] == "max_output_tokens", error
    assert "max_output_tokens" in error["message"] and "max_tokens" not in error["message"], error


# -- two gateways on one database ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_gateways(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalGrid, LocalGrid]]:
    """Gateways A and B on one PostgreSQL schema, with one tiny node that registered with A (B adopts it)."""
    with two_gateways_on_pg(Path(tmp_path_factory.mktemp("responses-pair"))) as pair:
        yield pair


def test_a_response_made_on_one_gateway_continues_on_the_other(two_gateways: tuple[LocalGrid, LocalGrid]) -> None:
    a, b = (OpenAI(base_url=g.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120) for g in two_gateways)
    first = a.responses.create(input="The sea is", **GREEDY)
    second = b.responses.create(input="And the sky?", previous_response_id=first.id, **GREEDY)
    assert first.usage is not None and second.usage is not None
    assert second.usage.input_tokens >= first.usage.input_tokens + first.usage.output_tokens
    conversation: Any = [
        {"role": "user", "content": "The sea is"},
        {"role": "assistant", "content": first.output_text},
        {"role": "user", "content": "And the sky?"},
    ]
    assert second.output_text == chat_answer(a, conversation)[0]
    assert a.responses.retrieve(second.id).output_text == second.output_text
    b.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        a.responses.retrieve(first.id)
