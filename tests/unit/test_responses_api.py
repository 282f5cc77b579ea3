"""OpenAI's Responses API over the chat core (gateway/api/responses_api.py), without processes or sockets: a
request's input items become the chat messages the node reads (a stored conversation first, instructions never
carried), every input gridserve cannot honour is a 4xx naming its parameter, and the answer is a Response object,
whole or streamed as `response.*` events, that the official SDK's types accept."""

import asyncio
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import openai.types.responses as sdk
import orjson
import pytest
from pydantic import TypeAdapter

from gridserve.gateway.api.errors import APIError, bad_request
from gridserve.gateway.api.openai_api import ApiContext, to_job
from gridserve.gateway.api.responses_api import (
    RESPONSES,
    Background,
    ResponsesChat,
    ResponseStore,
    ResponseWriter,
    Stored,
    Turn,
    cancel_response,
    delete_response,
    read,
    renderer,
    retrieve_response,
)
from gridserve.gateway.api.surface import Answer
from gridserve.gateway.api.tools import ToolCall
from gridserve.gateway.tenancy.limits import CALLER
from gridserve.store import Store

PARAMS = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
WEATHER = {"type": "function", "name": "weather", "description": "The weather", "parameters": PARAMS}
EVENTS: TypeAdapter[Any] = TypeAdapter(sdk.ResponseStreamEvent)


class FakeStore:
    """ResponseStore's interface over a dict (`fail`: every write raises)."""

    def __init__(self, fail: bool = False) -> None:
        self.kept: dict[str, Stored] = {}
        self.fail = fail

    async def put(self, response: dict[str, Any], turn: Turn, owner: str | None) -> None:
        if self.fail:
            raise OSError("disk full")
        before = self.kept[turn.previous_id].conversation if turn.previous_id is not None else []
        messages = orjson.loads(orjson.dumps(turn.messages))
        self.kept[response["id"]] = Stored(orjson.loads(orjson.dumps(response)), [*before, *messages], messages)

    async def get(self, response_id: str, owner: str | None) -> Stored | None:
        return self.kept.get(response_id)

    async def delete(self, response_id: str, owner: str | None) -> bool:
        return self.kept.pop(response_id, None) is not None


def context(store: FakeStore | ResponseStore | None = None) -> ApiContext:
    return cast(ApiContext, SimpleNamespace(responses=store))


def request(store: FakeStore | None = None, /, **body: Any) -> ResponsesChat:
    chat = asyncio.run(read(context(store), orjson.dumps({"model": "m", **body})))
    assert isinstance(chat, ResponsesChat)
    return chat


def turns(chat: ResponsesChat) -> list[tuple[str, str, dict[str, Any]]]:
    return [(m.role, m.text(), dict(m.model_extra or {})) for m in chat.messages]


def refused(body: dict[str, Any], store: FakeStore | None = None) -> APIError:
    """The error a request gets: from reading it, or from the chat core making its job (the tools' grammar)."""
    with pytest.raises(APIError) as caught:
        to_job(request(store, **body), "chat", "resp_x")
    return caught.value


def answer(text: str = "Hello there.", reason: str = "stop", calls: tuple[ToolCall, ...] = ()) -> Answer:
    return Answer(reason=reason, prompt_tokens=11, completion_tokens=4, cached_tokens=3, text=text, calls=calls)


def writer(chat: ResponsesChat, store: FakeStore | None = None, response_id: str = "resp_1") -> ResponseWriter:
    made = renderer(context(store), chat, response_id, "m")
    assert isinstance(made, ResponseWriter)
    return made


def kept(chat: ResponsesChat, store: FakeStore, said: Answer, response_id: str) -> dict[str, Any]:
    out = writer(chat, store, response_id)
    asyncio.run(out.keep(said))
    return out.whole(said)


# -- input ------------------------------------------------------------------------------------------------------


def test_a_string_input_is_one_user_message_and_instructions_a_system_message_first() -> None:
    assert turns(request(input="Hi")) == [("user", "Hi", {})]
    assert turns(request(input="Hi", instructions="Be brief.")) == [("system", "Be brief.", {}), ("user", "Hi", {})]


def test_each_item_type_becomes_its_chat_message() -> None:
    chat = request(
        input=[
            {"role": "developer", "content": "Answer in French."},
            {
                "type": "message",
                "role": "user",
                "content": [{"type": "input_text", "text": "Weather in "}, {"type": "input_text", "text": "Paris?"}],
            },
            {
                "type": "message",
                "role": "assistant",
                "content": [{"type": "output_text", "text": "Let me look.", "annotations": []}],
            },
            {"type": "function_call", "call_id": "c1", "name": "weather", "arguments": '{"city":"Paris"}'},
            {
                "type": "function_call",
                "id": "fc_2",
                "call_id": "c2",
                "name": "weather",
                "arguments": '{"city":"Lyon"}',
                "status": "completed",
            },
            {"type": "function_call_output", "call_id": "c1", "output": "18 C"},
            {"type": "function_call_output", "call_id": "c2", "output": [{"type": "input_text", "text": "20 C"}]},
        ],
        tools=[WEATHER],
    )
    calls = [
        {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": '{"city":"Paris"}'}},
        {"id": "c2", "type": "function", "function": {"name": "weather", "arguments": '{"city":"Lyon"}'}},
    ]
    assert turns(chat) == [
        ("system", "Answer in French.", {}),
        ("user", "Weather in Paris?", {}),
        ("assistant", "Let me look.", {}),
        ("assistant", "", {"tool_calls": calls}),  # consecutive calls: one assistant message
        ("tool", "18 C", {"tool_call_id": "c1"}),
        ("tool", "20 C", {"tool_call_id": "c2"}),
    ]
    job, _ = to_job(chat, "chat", "resp_x")  # the chat core renders them for the node
    assert job.messages is not None and job.messages[-1].content.count("<tool_response name='weather'>") == 2


def test_parameters_become_the_chat_requests() -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    chat = request(
        input="Hi",
        max_output_tokens=33,
        temperature=0.5,
        top_p=0.9,
        seed=7,
        tools=[WEATHER],
        tool_choice={"type": "function", "name": "weather"},
        parallel_tool_calls=False,
        stream=True,
    )
    assert chat.tools == [
        {"type": "function", "function": {"name": "weather", "description": "The weather", "parameters": PARAMS}}
    ]
    assert chat.tool_choice == {"type": "function", "function": {"name": "weather"}}
    assert (chat.max_completion_tokens, chat.temperature, chat.top_p, chat.seed) == (33, 0.5, 0.9, 7)
    assert chat.stream and chat.parallel_tool_calls is False
    job, _ = to_job(chat, "chat", "resp_x")
    assert job.sampling.max_tokens == 33 and job.sampling.response_format is not None
    assert job.sampling.response_format.type == "tool_calls"
    formatted = request(
        input="Hi", text={"format": {"type": "json_schema", "name": "n", "schema": schema, "strict": True}}
    )
    assert formatted.response_format == {
        "type": "json_schema",
        "json_schema": {"name": "n", "schema": schema, "strict": True},
    }
    assert request(input="Hi", text={"format": {"type": "json_object"}}).response_format == {"type": "json_object"}
    assert request(input="Hi", text={"format": {"type": "text"}}).response_format is None
    plain = request(input="Hi")
    assert (plain.temperature, plain.top_p, plain.max_completion_tokens, plain.stream) == (1.0, 1.0, None, False)


def test_a_previous_response_comes_first_without_its_instructions() -> None:
    store = FakeStore()
    first = request(store, input="What is 2+2?", instructions="Be brief.")
    kept(first, store, answer("4."), "resp_a")
    assert store.kept["resp_a"].conversation == [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4."},
    ]
    second = request(store, input="And 3+3?", previous_response_id="resp_a")
    assert turns(second) == [("user", "What is 2+2?", {}), ("assistant", "4.", {}), ("user", "And 3+3?", {})]
    third = request(store, input="And 4+4?", previous_response_id="resp_a", instructions="Shout.")
    assert turns(third)[0] == ("system", "Shout.", {}) and len(turns(third)) == 4
    kept(second, store, answer("6."), "resp_b")
    chained = request(store, input="Sum?", previous_response_id="resp_b")
    assert [text for _, text, _ in turns(chained)] == ["What is 2+2?", "4.", "And 3+3?", "6.", "Sum?"]


def test_a_previous_responses_calls_take_their_outputs() -> None:
    store = FakeStore()
    asked = request(store, input="Weather in Paris?", tools=[WEATHER], tool_choice="required")
    call = ToolCall("weather", {"city": "Paris"}, "call_9")
    whole = kept(asked, store, answer("", "tool_calls", (call,)), "resp_c")
    assert [item["type"] for item in whole["output"]] == ["function_call"]
    follow = request(
        store,
        previous_response_id="resp_c",
        input=[{"type": "function_call_output", "call_id": "call_9", "output": "18 C"}],
        tools=[WEATHER],
    )
    assert turns(follow)[1:] == [
        ("assistant", "", {"tool_calls": [call.openai()]}),
        ("tool", "18 C", {"tool_call_id": "call_9"}),
    ]
    assert refused({"input": [{"type": "function_call_output", "call_id": "call_9", "output": "x"}]}).param == (
        "input[0].call_id"
    )


# -- refusals ---------------------------------------------------------------------------------------------------

IMAGE = {
    "role": "user",
    "content": [
        {"type": "input_text", "text": "What is this?"},
        {"type": "input_image", "image_url": "https://x/y.png"},
    ],
}
REFUSED: list[tuple[dict[str, Any], str, str]] = [
    ({"input": [IMAGE]}, "input[0].content[1]", "unsupported_parameter"),
    (
        {"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]},
        "input[0].content[0]",
        "unsupported_parameter",
    ),
    ({"input": [{"role": "user", "content": [{"type": "input_text"}]}]}, "input[0].content[0]", "invalid_request"),
    ({"input": [{"role": "user", "content": 5}]}, "input[0].content", "invalid_request"),
    ({"input": [{"role": "robot", "content": "x"}]}, "input[0].role", "invalid_request"),
    ({"input": [{"type": "reasoning", "summary": []}]}, "input[0].type", "unsupported_parameter"),
    ({"input": [{"text": "no type, no role"}]}, "input[0].type", "invalid_request"),
    (
        {"input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": {}}]},
        "input[0].arguments",
        "invalid_request",
    ),
    ({"input": [{"type": "function_call", "name": "f", "arguments": "{}"}]}, "input[0].call_id", "invalid_request"),
    (
        {"input": [{"type": "function_call_output", "call_id": "nope", "output": "x"}]},
        "input[0].call_id",
        "invalid_request",
    ),
    (
        {
            "input": [
                {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"},
                {"type": "function_call_output", "call_id": "c", "output": {"x": 1}},
            ]
        },
        "input[1].output",
        "invalid_request",
    ),
    ({"input": []}, "input", "invalid_request"),
    ({"input": 5}, "input", "invalid_request"),
    ({"tools": [{"type": "web_search"}]}, "tools[0]", "unsupported_parameter"),
    ({"tools": [WEATHER, {"type": "file_search", "vector_store_ids": ["vs"]}]}, "tools[1]", "unsupported_parameter"),
    ({"tools": [{"type": "function"}]}, "tools[0].name", "invalid_request"),
    ({"tools": [{**WEATHER, "parameters": "x"}]}, "tools[0].parameters", "invalid_request"),
    ({"tools": [WEATHER, WEATHER]}, "tools", "invalid_request"),
    ({"tool_choice": {"type": "file_search"}, "tools": [WEATHER]}, "tool_choice", "unsupported_parameter"),
    ({"tool_choice": {"type": "function", "name": "clock"}, "tools": [WEATHER]}, "tool_choice", "invalid_request"),
    ({"tool_choice": "sometimes"}, "tool_choice", "invalid_request"),
    ({"tool_choice": "required"}, "tool_choice", "invalid_request"),
    ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format.schema", "invalid_request"),
    (
        {"text": {"format": {"type": "json_schema", "schema": {"type": "object"}}}},
        "text.format.name",
        "invalid_request",
    ),
    ({"text": {"format": {"type": "xml"}}}, "text.format.type", "invalid_request"),
    (
        {"text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "nope"}}}},
        "text.format.schema",
        "invalid_request",
    ),
    (
        {"text": {"format": {"type": "json_object"}}, "tools": [WEATHER], "tool_choice": "required"},
        "tool_choice",
        "invalid_request",
    ),
    ({"text": {"verbosity": "high"}}, "text.verbosity", "unsupported_parameter"),
    ({"text": {"formats": {}}}, "text.formats", "unknown_parameter"),
    ({"reasoning": {"effort": "high"}}, "reasoning", "unsupported_parameter"),
    ({"background": True, "stream": True}, "stream", "unsupported_parameter"),
    ({"background": True, "store": False}, "store", "invalid_request"),
    ({"background": "yes"}, "background", "invalid_request"),
    ({"include": ["message.output_text.logprobs"]}, "include", "unsupported_parameter"),
    ({"conversation": "conv_1"}, "conversation", "unsupported_parameter"),
    ({"top_logprobs": 3}, "top_logprobs", "unsupported_parameter"),
    ({"service_tier": "flex"}, "service_tier", "unsupported_parameter"),
    ({"metadata": {str(i): "v" for i in range(17)}}, "metadata", "invalid_request"),
    ({"metadata": {"k": 1}}, "metadata", "invalid_request"),
    ({"metadata": {"k" * 65: "v"}}, "metadata", "invalid_request"),
    ({"temperature": 2.5}, "temperature", "invalid_request"),
    ({"top_p": 0}, "top_p", "invalid_request"),
    ({"max_output_tokens": 0}, "max_output_tokens", "invalid_request"),
    ({"max_output_tokens": "5"}, "max_output_tokens", "invalid_request"),
    ({"truncation": "sometimes"}, "truncation", "invalid_request"),
    ({"store": "yes"}, "store", "invalid_request"),
    ({"frobnicate": 1}, "frobnicate", "unknown_parameter"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "messages", "unknown_parameter"),
    ({"gridserve": {"tier": 5}}, "gridserve.tier", "invalid_request"),
]


@pytest.mark.parametrize(("patch", "param", "code"), REFUSED, ids=[p for _, p, _ in REFUSED])
def test_bad_input_is_a_400_naming_the_parameter(patch: dict[str, Any], param: str, code: str) -> None:
    error = refused({"input": "Hi", **patch})
    assert (error.status, error.param, error.code) == (400, param, code), error.message
    body = orjson.loads(RESPONSES.error(error))  # OpenAI's error format
    assert body["error"] == {"message": error.message, "type": "invalid_request_error", "param": param, "code": code}


def test_an_unknown_previous_response_is_a_404_naming_it() -> None:
    for store in (FakeStore(), None):
        error = refused({"input": "Hi", "previous_response_id": "resp_nope"}, store)
        assert (error.status, error.param, error.code) == (404, "previous_response_id", "previous_response_not_found")
        assert "resp_nope" in error.message


@pytest.mark.parametrize("body", [b"{not json", b"[1, 2]", b'{"input": "Hi"}', b'{"model": "", "input": "Hi"}'])
def test_a_body_that_is_no_request_is_a_400(body: bytes) -> None:
    with pytest.raises(APIError) as caught:
        asyncio.run(read(context(), body))
    assert caught.value.status == 400


@pytest.mark.parametrize(
    "patch",
    [
        {"truncation": "auto"},
        {"truncation": "disabled"},
        {"reasoning": {"effort": None, "summary": None}},
        {"include": []},
        {"background": False},
        {"service_tier": "auto"},
        {"text": {"verbosity": "medium"}},
        {"stream_options": {"include_obfuscation": False}},
        {"user": "u", "safety_identifier": "s", "prompt_cache_key": "k", "store": False},
        {"tool_choice": "none"},
        {
            "input": [
                {"role": "user", "content": "Hi"},
                {
                    "role": "assistant",
                    "content": [{"type": "output_text", "text": "Yo", "annotations": [], "logprobs": []}],
                    "id": "msg_1",
                    "status": "completed",
                    "type": "message",
                },
            ]
        },
    ],
)
def test_parameters_at_their_defaults_are_accepted(patch: dict[str, Any]) -> None:
    assert request(**{"input": "Hi", **patch}).messages


# -- the Response object ----------------------------------------------------------------------------------------


def test_a_whole_answer_is_a_response_object_and_kept_with_its_conversation() -> None:
    store = FakeStore()
    chat = request(
        store, input="Hi", instructions="Be kind.", metadata={"team": "a"}, temperature=0, max_output_tokens=9
    )
    whole = kept(chat, store, answer("Hello there."), "resp_w")
    parsed = sdk.Response.model_validate(whole)
    assert parsed.output_text == "Hello there." and parsed.status == "completed" and parsed.error is None
    assert (whole["object"], whole["id"], whole["model"], whole["instructions"]) == (
        "response",
        "resp_w",
        "m",
        "Be kind.",
    )
    assert (whole["metadata"], whole["temperature"], whole["max_output_tokens"], whole["store"]) == (
        {"team": "a"},
        0.0,
        9,
        True,
    )
    assert (
        "output_text" not in whole
        and whole["incomplete_details"] is None
        and whole["completed_at"] >= whole["created_at"]
    )
    (item,) = whole["output"]
    assert item["type"] == "message" and item["id"].startswith("msg_") and item["status"] == "completed"
    assert item["role"] == "assistant" and item["content"] == [
        {"type": "output_text", "text": "Hello there.", "annotations": [], "logprobs": []}
    ]
    assert whole["usage"] == {
        "input_tokens": 11,
        "input_tokens_details": {"cached_tokens": 3, "cache_write_tokens": 0},
        "output_tokens": 4,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": 15,
    }
    assert store.kept["resp_w"].response == whole
    assert store.kept["resp_w"].conversation[-1] == {"role": "assistant", "content": "Hello there."}


def test_an_answer_cut_by_max_output_tokens_is_incomplete() -> None:
    whole = kept(request(input="Hi"), FakeStore(), answer("Hel", "length"), "resp_l")
    assert whole["status"] == "incomplete" and whole["incomplete_details"] == {"reason": "max_output_tokens"}
    assert whole["output"][0]["status"] == "incomplete" and "completed_at" not in whole
    assert sdk.Response.model_validate(whole).output_text == "Hel"


def test_calls_are_function_call_items_and_the_echo_is_the_responses_shape() -> None:
    chat = request(input="Weather?", tools=[WEATHER], tool_choice={"type": "function", "name": "weather"})
    calls = (ToolCall("weather", {"city": "Paris"}, "call_1"), ToolCall("weather", {"city": "Lyon"}, "call_2"))
    whole = kept(chat, FakeStore(), answer("", "tool_calls", calls), "resp_f")
    assert [
        (i["type"], i["call_id"], i["name"], orjson.loads(i["arguments"]), i["status"]) for i in whole["output"]
    ] == [
        ("function_call", "call_1", "weather", {"city": "Paris"}, "completed"),
        ("function_call", "call_2", "weather", {"city": "Lyon"}, "completed"),
    ]
    assert (
        all(i["id"].startswith("fc_") for i in whole["output"]) and whole["output"][0]["id"] != whole["output"][1]["id"]
    )
    assert whole["tools"] == [{**WEATHER, "strict": True}] and whole["tool_choice"] == {
        "type": "function",
        "name": "weather",
    }
    parsed = sdk.Response.model_validate(whole)
    assert parsed.output_text == "" and parsed.output[0].type == "function_call"


def test_store_false_keeps_nothing_and_says_so() -> None:
    store = FakeStore()
    whole = kept(request(store, input="Hi", store=False), store, answer(), "resp_n")
    assert whole["store"] is False and store.kept == {}


def test_a_store_that_fails_is_never_an_answer_the_client_believes_stored() -> None:
    store = FakeStore(fail=True)
    out = writer(request(store, input="Hi"), store)
    asyncio.run(out.keep(answer()))
    with pytest.raises(APIError) as caught:
        out.whole(answer())
    assert (caught.value.status, caught.value.code) == (503, "store_unavailable")
    streamed = writer(request(store, input="Hi"), store)
    streamed.start()
    asyncio.run(streamed.keep(answer()))
    (last,) = parse_sse(streamed.close())
    assert last["type"] == "response.failed" and "could not be stored" in last["response"]["error"]["message"]


# -- streamed ---------------------------------------------------------------------------------------------------


def parse_sse(raw: bytes) -> list[dict[str, Any]]:
    """Each event's data, checked: `event:` names its type, and the SDK's event types accept it."""
    events = []
    for block in raw.decode().split("\n\n"):
        if not block:
            continue
        name, data = block.split("\n")
        assert name.startswith("event: ") and data.startswith("data: ")
        event = orjson.loads(data[len("data: ") :])
        assert event["type"] == name[len("event: ") :]
        EVENTS.validate_python(event)
        events.append(event)
    return events


def stream(out: ResponseWriter, pieces: list[str], said: Answer | None) -> list[dict[str, Any]]:
    """What the chat core sends through a renderer: start, text..., then end, keep, close (or an error)."""
    raw = out.start() + b"".join(out.text(p) for p in pieces)
    if said is None:
        raw += out.error("node went away", "node_failed")
    else:
        raw += out.end(said)
        asyncio.run(out.keep(said))
        raw += out.close()
    events = parse_sse(raw)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    return events


def test_a_streamed_answer_is_openais_event_sequence() -> None:
    store = FakeStore()
    pieces = ["Hel", "lo", " there."]
    events = stream(writer(request(store, input="Hi", stream=True), store, "resp_s"), pieces, answer("".join(pieces)))
    assert [e["type"] for e in events] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * 3,
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert events[0]["response"]["status"] == "in_progress" and events[0]["response"]["output"] == []
    deltas = [e for e in events if e["type"] == "response.output_text.delta"]
    item_id = events[2]["item"]["id"]
    assert all(
        (d["item_id"], d["output_index"], d["content_index"], d["logprobs"]) == (item_id, 0, 0, []) for d in deltas
    )
    final = events[-1]["response"]
    assert "".join(d["delta"] for d in deltas) == events[7]["text"] == sdk.Response.model_validate(final).output_text
    assert final["output"][0]["id"] == item_id and final["status"] == "completed"
    assert store.kept["resp_s"].response == final


def test_streamed_calls_and_an_empty_answer() -> None:
    chat = request(input="Weather?", tools=[WEATHER], tool_choice="required", stream=True)
    call = ToolCall("weather", {"city": "Paris"}, "call_1")
    events = stream(writer(chat), [], answer("", "tool_calls", (call,)))
    assert [e["type"] for e in events] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    added, delta, done, item_done, completed = events[2:]
    assert added["item"]["status"] == "in_progress" and added["item"]["arguments"] == ""
    assert delta["delta"] == done["arguments"] == item_done["item"]["arguments"] == '{"city":"Paris"}'
    assert delta["item_id"] == done["item_id"] == item_done["item"]["id"] == completed["response"]["output"][0]["id"]
    empty = stream(writer(request(input="Hi", stream=True)), [], answer(""))
    assert [e["type"] for e in empty][2:] == [
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]


def test_a_stream_cut_by_max_output_tokens_ends_incomplete() -> None:
    events = stream(writer(request(input="Hi", stream=True)), ["Hel"], answer("Hel", "length"))
    assert events[-1]["type"] == "response.incomplete"
    assert events[-1]["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
    assert events[-2]["item"]["status"] == "incomplete"


def test_a_node_failure_mid_stream_is_response_failed() -> None:
    store = FakeStore()
    events = stream(writer(request(store, input="Hi", stream=True), store, "resp_x"), ["Hel"], None)
    failed = events[-1]
    assert failed["type"] == "response.failed" and failed["response"]["status"] == "failed"
    assert (
        failed["response"]["error"]["code"] == "server_error"
        and "node went away" in failed["response"]["error"]["message"]
    )
    assert failed["response"]["output"][0]["content"][0]["text"] == "Hel" and store.kept == {}


# -- the store --------------------------------------------------------------------------------------------------


def test_the_store_keeps_gets_and_deletes_responses() -> None:
    store = Store("sqlite://")
    store.migrate()
    try:
        responses = ResponseStore(store)

        spec = request(input="Hi").spec()

        async def scenario() -> None:
            out = ResponseWriter(context(responses), spec, "resp_db", "m")
            CALLER.set("key-a")  # the API key whose request this is
            await out.keep(answer("Stored."))
            found = await retrieve_response(responses, "resp_db", {}, "key-a")
            assert found == out.whole(answer("Stored.")) and found["output"][0]["content"][0]["text"] == "Stored."
            previous = await responses.get("resp_db", "key-a")
            assert previous is not None and previous.conversation[-1] == {"role": "assistant", "content": "Stored."}
            assert await responses.get("resp_db", "key-b") is None, "another key's response is not found"
            for call in (retrieve_response, delete_response):
                with pytest.raises(APIError) as theirs:
                    await call(responses, "resp_db", {}, "key-b")
                assert theirs.value.status == 404
            assert await delete_response(responses, "resp_db", {}, "key-a") == {
                "id": "resp_db",
                "object": "response",
                "deleted": True,
            }
            for call in (retrieve_response, delete_response):
                with pytest.raises(APIError) as gone:
                    await call(responses, "resp_db", {}, "key-a")
                assert (gone.value.status, gone.value.param) == (404, "response_id")
            with pytest.raises(APIError) as replay:
                await retrieve_response(responses, "resp_db", {"stream": "true"}, "key-a")
            assert (replay.value.status, replay.value.param) == (400, "stream")

        asyncio.run(scenario())
    finally:
        store.close()


def test_old_responses_are_pruned() -> None:
    store = Store("sqlite://")
    store.migrate()
    try:
        rows = [
            {"response_id": f"resp_{at}", "created_at": float(at), "response": {}, "conversation": [], "owner": None}
            for at in (100, 200, 300)
        ]
        store.put_responses(rows)
        assert store.prune_responses(250.0) == 2
        assert store.get_response("resp_300") is not None and store.get_response("resp_200") is None
    finally:
        store.close()


def test_errors_from_the_core_name_the_responses_parameters() -> None:
    core = APIError(400, "Invalid request: max_tokens (9000) exceeds the context of m.", param="max_tokens")
    core.headers = [(b"retry-after", b"1")]
    said = RESPONSES.renamed(core)
    assert (said.param, said.message) == (
        "max_output_tokens",
        "Invalid request: max_output_tokens (9000) exceeds the context of m.",
    )
    assert said.headers == core.headers and (said.status, said.code, said.type) == (400, None, core.type)
    schema = RESPONSES.renamed(
        bad_request("response_format.json_schema.schema: bad", "response_format.json_schema.schema")
    )
    assert (schema.param, schema.message) == ("text.format.schema", "text.format.schema: bad")
    untouched = bad_request("temperature: too hot", "temperature")
    assert RESPONSES.renamed(untouched) is untouched
    assert RESPONSES.renamed(bad_request("the max_tokens_x field", "max_tokens_x")).param == "max_tokens_x"


# -- background responses ---------------------------------------------------------------------------------------


def background_store(tmp: Path) -> ResponseStore:
    """A store on a SQLite file: background tasks write from threads at once (an in-memory database is one
    connection shared by every thread, on which two writes at once collide)."""
    store = Store(f"sqlite:///{tmp / 'gateway.db'}")
    store.migrate()
    return ResponseStore(store)


def start(responses: ResponseStore, chat: ResponsesChat, response_id: str, work: Any, admission: Any = None) -> Any:
    """Run `work` as background response `response_id` (the future of its queued row)."""
    made = writer(chat, cast(Any, responses), response_id)
    return responses.run(Background(made, None, admission, work, RESPONSES.renamed))


def held(responses: ResponseStore, chat: ResponsesChat, response_id: str, release: asyncio.Event) -> Any:
    """Work that keeps its answer once `release` is set."""

    async def work() -> None:
        await release.wait()
        await writer(chat, cast(Any, responses), response_id).keep(answer())

    return work


def test_a_background_response_is_in_progress_then_its_answer_or_its_error(tmp_path: Path) -> None:
    """`ResponseStore.run`: `in_progress` stored as it starts, then what the answer's writer keeps; work that fails
    is stored `failed` with its error; the admission is closed either way."""

    chat = request(None, input="Hi", background=True)

    async def main() -> None:
        responses = background_store(tmp_path)
        closed: list[str] = []
        admission = cast(Any, SimpleNamespace(close=lambda: closed.append("x")))
        seen: list[str] = []

        async def answering() -> None:
            found = await responses.get("resp_ok", None)
            assert found is not None
            seen.append(found.response["status"])
            await writer(chat, cast(Any, responses), "resp_ok").keep(answer())

        start(responses, chat, "resp_ok", answering, admission)
        await asyncio.wait(list(responses.running.values()))
        done = await responses.get("resp_ok", None)
        assert seen == ["in_progress"] and done is not None and done.response["status"] == "completed"
        assert done.response["background"] is True and done.response["output"][0]["content"][0]["text"] == answer().text

        async def failing() -> None:  # an error the chat core raises, named as the chat API names it
            raise APIError(400, "max_tokens exceeds the context", param="max_tokens", code="invalid_request")

        start(responses, chat, "resp_no", failing, admission)
        await asyncio.wait(list(responses.running.values()))
        failed = await responses.get("resp_no", None)
        assert failed is not None and failed.response["status"] == "failed"
        error = failed.response["error"]
        assert error == {"code": "invalid_request", "message": "max_output_tokens exceeds the context"}
        assert closed == ["x", "x"] and not responses.running

    asyncio.run(main())


def test_cancelled_here_or_elsewhere_a_background_response_stays_cancelled(tmp_path: Path) -> None:
    """Cancelled on this gateway: its task stops and `cancelled` is stored. Cancelled through another gateway (no
    task here): marked in the store, and the gateway running it keeps the mark when the answer comes."""

    chat = request(None, input="Hi", background=True)

    async def main() -> None:
        responses = background_store(tmp_path)
        release = asyncio.Event()
        start(responses, chat, "resp_c", held(responses, chat, "resp_c", release))
        await asyncio.sleep(0.05)
        found = await responses.get("resp_c", None)
        assert found is not None and found.response["status"] == "in_progress"
        after = await cancel_response(responses, "resp_c", {}, "k")
        assert after["status"] == "cancelled" and not responses.running

        other = ResponseStore(responses._store)  # another gateway on the same database, running nothing
        start(responses, chat, "resp_e", held(responses, chat, "resp_e", release))
        await asyncio.sleep(0.05)
        marked = await responses.get("resp_e", None)
        assert marked is not None
        assert (await other.cancel(marked, None))["status"] == "cancelled"
        release.set()  # the answer comes on the gateway running it: the mark stays
        await asyncio.wait(list(responses.running.values()))
        kept_ = await responses.get("resp_e", None)
        assert kept_ is not None and kept_.response["status"] == "cancelled"

    asyncio.run(main())


def test_a_gateway_that_stops_gives_background_responses_its_drain_then_stores_them_failed(tmp_path: Path) -> None:
    chat = request(None, input="Hi", background=True)

    async def main() -> None:
        responses = background_store(tmp_path)

        async def quick() -> None:
            await asyncio.sleep(0.01)
            await writer(chat, cast(Any, responses), "resp_q").keep(answer())

        async def never() -> None:
            await asyncio.Event().wait()

        start(responses, chat, "resp_q", quick)
        start(responses, chat, "resp_n", never)
        await responses.stop(drain_s=1.0)  # ample for one quick write, even on a loaded machine
        quick_, never_ = await responses.get("resp_q", None), await responses.get("resp_n", None)
        assert quick_ is not None and quick_.response["status"] == "completed"
        assert never_ is not None and never_.response["status"] == "failed"
        assert never_.response["error"]["code"] == "gateway_stopped" and not responses.running

    asyncio.run(main())


def test_only_a_background_response_is_cancelled_and_an_ended_one_is_returned_as_it_is(tmp_path: Path) -> None:
    plain, background = request(None, input="Hi"), request(None, input="Hi", background=True)

    async def main() -> None:
        responses = background_store(tmp_path)
        whole = writer(plain, cast(Any, responses), "resp_w")
        await whole.keep(answer())
        with pytest.raises(APIError) as refused_:
            await cancel_response(responses, "resp_w", {}, "k")
        assert (refused_.value.status, refused_.value.code) == (400, "not_background")
        ended = writer(background, cast(Any, responses), "resp_b")
        await responses.put(ended.stopped("queued"), Turn(None, []), None)  # as a background response starts
        await ended.keep(answer())
        assert (await cancel_response(responses, "resp_b", {}, "k"))["status"] == "completed"
        with pytest.raises(APIError) as missing:
            await cancel_response(responses, "resp_none", {}, "k")
        assert missing.value.status == 404

    asyncio.run(main())


def test_a_background_response_deleted_while_it_runs_stays_deleted_and_is_not_continued_unfinished(
    tmp_path: Path,
) -> None:
    chat = request(None, input="Hi", background=True)

    async def main() -> None:
        responses = background_store(tmp_path)
        release = asyncio.Event()
        stored = start(responses, chat, "resp_d", held(responses, chat, "resp_d", release))
        await stored
        await asyncio.sleep(0.05)
        with pytest.raises(APIError) as unfinished:
            await read(
                context(responses), orjson.dumps({"model": "m", "input": "Go on", "previous_response_id": "resp_d"})
            )
        assert (unfinished.value.status, unfinished.value.param) == (400, "previous_response_id")
        assert "in_progress" in unfinished.value.message
        assert await responses.delete("resp_d", None)
        release.set()
        await asyncio.sleep(0.05)
        assert await responses.get("resp_d", None) is None and not responses.running and not responses._forgotten
        with pytest.raises(APIError) as gone:
            await retrieve_response(responses, "resp_d", {}, "k")
        assert gone.value.status == 404

        other = ResponseStore(responses._store)  # a gateway that deletes it while this one runs it
        stored = start(responses, chat, "resp_o", held(responses, chat, "resp_o", release))
        await stored
        release.clear()
        assert await other.delete("resp_o", None)
        release.set()
        await asyncio.wait(list(responses.running.values()))
        assert await responses.get("resp_o", None) is None, "the answer that came after is not stored again"

    asyncio.run(main())
