"""Bad input gets a precise status and an OpenAI-format error; nothing crashes."""

from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI
from tests.conftest import API_KEY

from gridserve.cli.grid import LocalGrid
from gridserve.engines.tiny import TINY_CONTEXT, TINY_MODEL


def post(
    grid: LocalGrid, path: str, body: Any = None, *, content: bytes | None = None, key: str | None = API_KEY
) -> httpx.Response:
    headers = {"content-type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    if content is None:
        return httpx.post(grid.url + path, json=body, headers=headers, timeout=30)
    return httpx.post(grid.url + path, content=content, headers=headers, timeout=30)


def assert_openai_error(resp: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    if code is not None:
        assert error["code"] == code
    return dict(error)


CHAT = {"model": TINY_MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def test_an_anthropic_style_key_opens_every_public_route(tiny_grid: LocalGrid) -> None:
    """`x-api-key` (as the Anthropic SDK sends the key) is taken wherever `Authorization: Bearer` is."""
    for key, status in ((API_KEY, 200), ("wrong", 401)):
        headers = {"x-api-key": key}
        assert httpx.get(tiny_grid.url + "/v1/models", headers=headers, timeout=30).status_code == status
        body = {"model": TINY_MODEL, "input": "hi"}
        assert (
            httpx.post(tiny_grid.url + "/v1/embeddings", json=body, headers=headers, timeout=30).status_code == status
        )
        assert (
            httpx.post(tiny_grid.url + "/v1/chat/completions", json=CHAT, headers=headers, timeout=30).status_code
            == status
        )


def test_missing_and_wrong_api_key_are_401(tiny_grid: LocalGrid) -> None:
    assert_openai_error(post(tiny_grid, "/v1/chat/completions", CHAT, key=None), 401, "invalid_api_key")
    assert_openai_error(post(tiny_grid, "/v1/chat/completions", CHAT, key="nope"), 401, "invalid_api_key")
    resp = httpx.get(tiny_grid.url + "/v1/models", timeout=10)
    assert_openai_error(resp, 401, "invalid_api_key")
    with pytest.raises(openai.AuthenticationError):
        OpenAI(base_url=tiny_grid.url + "/v1", api_key="wrong", max_retries=0).models.list()


def test_unknown_model_is_404(tiny_grid: LocalGrid) -> None:
    error = assert_openai_error(
        post(tiny_grid, "/v1/chat/completions", {**CHAT, "model": "gpt-9"}), 404, "model_not_found"
    )
    assert error["param"] == "model" and "gpt-9" in error["message"]
    with pytest.raises(openai.NotFoundError):
        OpenAI(base_url=tiny_grid.url + "/v1", api_key=API_KEY, max_retries=0).completions.create(
            model="gpt-9", prompt="x"
        )


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (b'{"model": "gridserve-tiny", "messages": [', "not valid JSON"),
        (b"[1, 2, 3]", "JSON object"),
        (b"", "not valid JSON"),
    ],
)
def test_malformed_json_is_400(tiny_grid: LocalGrid, content: bytes, needle: str) -> None:
    error = assert_openai_error(post(tiny_grid, "/v1/chat/completions", content=content), 400)
    assert needle in error["message"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": TINY_MODEL}, "messages"),
        ({**CHAT, "temperature": 5}, "temperature"),
        ({**CHAT, "max_tokens": 0}, "max_tokens"),
        ({**CHAT, "max_tokens": "many"}, "max_tokens"),
        ({**CHAT, "n": 17}, "n"),
        ({**CHAT, "messages": []}, "messages"),
        ({**CHAT, "messages": [{"content": "no role"}]}, "messages.0.role"),
        ({**CHAT, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ],
)
def test_invalid_fields_are_400_naming_the_param(tiny_grid: LocalGrid, body: dict[str, Any], param: str) -> None:
    error = assert_openai_error(post(tiny_grid, "/v1/chat/completions", body), 400)
    assert error["param"] == param


WEATHER = {
    "type": "function",
    "function": {"name": "weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}},
}


def test_what_gridserve_cannot_do_is_refused_naming_the_parameter_not_dropped(tiny_grid: LocalGrid) -> None:
    """With the official SDK, as an agent would send it: a request asking for what gridserve does not do (legacy
    `functions`, `logit_bias`) is refused with a 400 naming it, never answered as if it had not been sent."""
    client = OpenAI(base_url=tiny_grid.url + "/v1", api_key=API_KEY, max_retries=0)
    messages: Any = [{"role": "user", "content": "Weather in Paris?"}]
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(
            model=TINY_MODEL, messages=messages, functions=[WEATHER["function"]], max_tokens=8
        )
    assert refused.value.param == "functions" and refused.value.code == "unsupported_parameter"
    assert "send tools" in refused.value.message
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=TINY_MODEL, messages=messages, logit_bias={"5": 10}, max_tokens=8)
    assert refused.value.param == "logit_bias" and "logit bias" in refused.value.message
    # the same parameters at their defaults ask for nothing gridserve lacks: served
    reply = client.chat.completions.create(
        model=TINY_MODEL,
        messages=messages,
        max_tokens=3,
        temperature=0,
        tool_choice="none",
        logprobs=False,
        logit_bias={},
        response_format={"type": "text"},
        presence_penalty=0,
        extra_body={"ignore_eos": False, "top_k": -1},
    )
    assert reply.choices[0].message.content is not None


def test_invalid_completion_prompt_is_400(tiny_grid: LocalGrid) -> None:
    body = {"model": TINY_MODEL, "prompt": ["a", "b"], "max_tokens": 2}
    assert_openai_error(post(tiny_grid, "/v1/completions", body), 400)


def test_body_over_the_limit_is_413(tiny_grid: LocalGrid) -> None:
    big = {**CHAT, "messages": [{"role": "user", "content": "x" * 30_000}]}
    assert_openai_error(post(tiny_grid, "/v1/chat/completions", big), 413, "request_too_large")
    chunked = httpx.post(
        tiny_grid.url + "/v1/chat/completions",
        content=iter([b"{" + b" " * 25_000, b"}"]),
        headers={"Authorization": f"Bearer {API_KEY}", "content-type": "application/json"},
    )
    assert_openai_error(chunked, 413, "request_too_large")


def test_max_tokens_beyond_context_is_400(tiny_grid: LocalGrid) -> None:
    error = assert_openai_error(post(tiny_grid, "/v1/chat/completions", {**CHAT, "max_tokens": TINY_CONTEXT + 1}), 400)
    assert error["param"] == "max_tokens" and str(TINY_CONTEXT) in error["message"]
    with pytest.raises(openai.BadRequestError):
        OpenAI(base_url=tiny_grid.url + "/v1", api_key=API_KEY, max_retries=0).completions.create(
            model=TINY_MODEL, prompt="x", max_tokens=10**6
        )


def test_prompt_plus_max_tokens_beyond_context_is_400(tiny_grid: LocalGrid) -> None:
    body = {**CHAT, "messages": [{"role": "user", "content": "y" * 3000}], "max_tokens": TINY_CONTEXT - 100}
    error = assert_openai_error(post(tiny_grid, "/v1/chat/completions", body), 400)
    assert "context" in error["message"]


def test_unknown_route_is_openai_404(tiny_grid: LocalGrid) -> None:
    assert_openai_error(post(tiny_grid, "/v1/nothing", CHAT), 404)


def test_gateway_still_serves_after_bad_input(tiny_grid: LocalGrid) -> None:
    client = OpenAI(base_url=tiny_grid.url + "/v1", api_key=API_KEY, max_retries=0)
    reply = client.chat.completions.create(
        model=TINY_MODEL, messages=[{"role": "user", "content": "ok?"}], max_tokens=3, temperature=0
    )
    assert reply.choices[0].finish_reason in ("length", "stop")
