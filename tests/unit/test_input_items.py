"""`GET /v1/responses/{id}/input_items` (gateway/api/input_items.py): a stored conversation, less the response's
own answer, as Responses items with stable ids, paged as OpenAI pages them; what it cannot honour is a 400."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gridserve.gateway.api.errors import APIError
from gridserve.gateway.api.input_items import items_of, page

CALL = {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": '{"city":"Paris"}'}}
CONVERSATION = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [CALL]},
    {"role": "tool", "tool_call_id": "call_1", "content": "18 C"},
    {"role": "assistant", "content": "It is 18 C."},
    {"role": "user", "content": "Thanks"},
    {"role": "assistant", "content": "You are welcome."},  # the response's own answer: not an input item
]


def test_each_turn_becomes_its_item_and_the_answer_is_left_out() -> None:
    items = items_of("resp_1", CONVERSATION)
    assert [(i["type"], i.get("role")) for i in items] == [
        ("message", "user"),
        ("function_call", None),
        ("function_call_output", None),
        ("message", "assistant"),
        ("message", "user"),
    ]
    assert items[0]["content"] == [{"type": "input_text", "text": "Weather in Paris?"}]
    assert items[1] | {"id": ""} == {
        "type": "function_call",
        "id": "",
        "call_id": "call_1",
        "name": "weather",
        "arguments": '{"city":"Paris"}',
        "status": "completed",
    }
    assert (items[2]["call_id"], items[2]["output"]) == ("call_1", "18 C")
    assert items[3]["content"][0]["type"] == "output_text" and items[3]["content"][0]["text"] == "It is 18 C."
    assert [i["id"].split("_")[0] for i in items] == ["msg", "fc", "fco", "msg", "msg"]


def test_ids_are_stable_and_differ_between_responses() -> None:
    ids = [i["id"] for i in items_of("resp_1", CONVERSATION)]
    assert ids == [i["id"] for i in items_of("resp_1", CONVERSATION)]
    assert len(set(ids)) == len(ids)
    assert not set(ids) & {i["id"] for i in items_of("resp_2", CONVERSATION)}


@settings(max_examples=60, deadline=None)
@given(count=st.integers(0, 30), limit=st.integers(1, 100), asc=st.booleans())
def test_paging_with_after_walks_every_item_once_in_order(count: int, limit: int, asc: bool) -> None:
    items = [{"id": f"msg_{i}", "type": "message"} for i in range(count)]
    query = {"limit": str(limit), "order": "asc" if asc else "desc"}
    seen: list[str] = []
    listed = page(items, query)
    while True:
        seen += [i["id"] for i in listed["data"]]
        assert len(listed["data"]) <= limit
        if not listed["has_more"]:
            break
        assert listed["last_id"] == listed["data"][-1]["id"]
        listed = page(items, query | {"after": listed["last_id"]})
    expected = [i["id"] for i in items]
    assert seen == (expected if asc else expected[::-1])


def test_the_default_is_twenty_newest_first() -> None:
    items = [{"id": f"msg_{i}", "type": "message"} for i in range(25)]
    listed = page(items, {})
    assert [i["id"] for i in listed["data"]] == [f"msg_{i}" for i in range(24, 4, -1)]
    assert (listed["first_id"], listed["last_id"], listed["has_more"]) == ("msg_24", "msg_5", True)
    assert page([], {}) == {"object": "list", "data": [], "first_id": None, "last_id": None, "has_more": False}


@pytest.mark.parametrize(
    ("query", "param"),
    [
        ({"limit": "0"}, "limit"),
        ({"limit": "101"}, "limit"),
        ({"limit": "ten"}, "limit"),
        ({"order": "newest"}, "order"),
        ({"after": "msg_nope"}, "after"),
        ({"include": "message.input_image.image_url"}, "include"),
        ({"before": "msg_1"}, "before"),
    ],
)
def test_what_it_cannot_honour_is_a_400_naming_it(query: dict[str, str], param: str) -> None:
    with pytest.raises(APIError) as refused:
        page([{"id": "msg_1", "type": "message"}], query)
    assert (refused.value.status, refused.value.param) == (400, param)
