"""`GET /v1/responses/{id}/input_items` (OpenAI's Responses API): the items a stored response answered, as the
Responses API names them. They are its stored conversation without its own answer: the input it was given and,
for a response continued from another (`previous_response_id`), the conversation before it. The `instructions`
are not items (as in OpenAI's API). Each item's id is derived from the response's id and its place, so it stays
the same from call to call and from gateway to gateway, and `after` pages by it.

Query: `order` (`desc`, newest first, by default; or `asc`), `limit` (1 to 100, 20 by default), `after` (an item id:
the items after it in that order). `include` asks for fields gridserve's text-only items do not have: refused, not
ignored."""

import hashlib
from collections.abc import Mapping
from typing import Any

from gridserve.gateway.api.errors import bad_request, unsupported_parameter

DEFAULT_LIMIT = 20
MAX_LIMIT = 100
PREFIXES = {"message": "msg", "function_call": "fc", "function_call_output": "fco"}


def _id(response_id: str, place: int, kind: str) -> str:
    digest = hashlib.blake2b(f"{response_id}/{place}".encode(), digest_size=12).hexdigest()
    return f"{PREFIXES[kind]}_{digest}"


def _text_part(role: str, text: str) -> dict[str, Any]:
    if role == "assistant":
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
    return {"type": "input_text", "text": text}


def items_of(response_id: str, conversation: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The conversation's chat messages (its last, the response's own answer, left out) as Responses items, oldest
    first: a message item per text turn, a function_call item per tool call, a function_call_output item per tool
    result."""
    items: list[dict[str, Any]] = []

    def add(kind: str, **fields: Any) -> None:
        items.append({"type": kind, "id": _id(response_id, len(items), kind), **fields, "status": "completed"})

    for message in conversation[:-1]:
        role = str(message.get("role", "user"))
        if role == "tool":
            add("function_call_output", call_id=message.get("tool_call_id", ""), output=message.get("content") or "")
            continue
        if message.get("content"):
            add("message", role=role, content=[_text_part(role, str(message["content"]))])
        for call in message.get("tool_calls") or []:
            function = call.get("function", {})
            add(
                "function_call",
                call_id=call.get("id", ""),
                name=function.get("name", ""),
                arguments=function.get("arguments", ""),
            )
    return items


def _limit(query: Mapping[str, str]) -> int:
    raw = query.get("limit")
    if raw is None:
        return DEFAULT_LIMIT
    try:
        limit = int(raw)
    except ValueError:
        limit = 0
    if not 1 <= limit <= MAX_LIMIT:
        raise bad_request(f"Invalid request: limit must be an integer from 1 to {MAX_LIMIT}.", param="limit")
    return limit


def page(items: list[dict[str, Any]], query: Mapping[str, str]) -> dict[str, Any]:
    """OpenAI's list object of `items` (oldest first) as `query` asks for it (a 400 naming what it cannot honour)."""
    for name in query:
        if name == "include":
            raise unsupported_parameter("include", "extra fields on input items (gridserve's items are text)")
        if name not in ("order", "limit", "after"):
            raise bad_request(
                f"Invalid request: unknown query parameter {name[:40]!r} (order, limit and after are).", param=name
            )
    order = query.get("order", "desc")
    if order not in ("asc", "desc"):
        raise bad_request("Invalid request: order must be asc or desc.", param="order")
    limit = _limit(query)
    ordered = items if order == "asc" else items[::-1]
    after = query.get("after")
    if after is not None:
        ids = [item["id"] for item in ordered]
        if after not in ids:
            raise bad_request(f"Invalid request: no input item with id {after!r} in this response.", param="after")
        ordered = ordered[ids.index(after) + 1 :]
    data = ordered[:limit]
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": len(ordered) > limit,
    }


__all__ = ["items_of", "page"]
