"""Parameters gridserve cannot honour are refused with a 400 naming them (gateway/api/schemas.py UNSUPPORTED), in
either endpoint's body; at their defaults they are accepted."""

from typing import Any

import orjson
import pytest

from gridserve.gateway.api.errors import APIError
from gridserve.gateway.api.openai_api import parse
from gridserve.gateway.api.schemas import UNSUPPORTED, ChatCompletionRequest, CompletionRequest, SamplingFields

CHAT: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
COMPLETION: dict[str, Any] = {"model": "m", "prompt": "hi"}
ON: dict[str, Any] = {
    "functions": [{"name": "f"}],
    "function_call": "auto",
    "echo": True,
    "suffix": "end",
    "best_of": 3,
    "logit_bias": {"50256": -100},
    "presence_penalty": 0.5,
    "frequency_penalty": -0.5,
    "min_p": 0.05,
    "audio": {"voice": "alloy", "format": "wav"},
    "modalities": ["text", "audio"],
    "prediction": {"type": "content", "content": "x"},
}
OFF: dict[str, list[Any]] = {
    "functions": [None, []],
    "function_call": [None, "none"],
    "echo": [None, False],
    "suffix": [None, ""],
    "best_of": [None, 1],
    "logit_bias": [None, {}],
    "presence_penalty": [None, 0, 0.0],
    "frequency_penalty": [None, 0],
    "min_p": [None, 0],
    "audio": [None],
    "modalities": [None, ["text"]],
    "prediction": [None],
}


def test_every_refused_parameter_is_listed_here_on_and_off() -> None:
    assert set(ON) == set(UNSUPPORTED) == set(OFF)


@pytest.mark.parametrize("name", sorted(ON))
@pytest.mark.parametrize(("base", "model"), [(CHAT, ChatCompletionRequest), (COMPLETION, CompletionRequest)])
def test_a_parameter_turned_on_is_a_400_naming_it(name: str, base: dict[str, Any], model: type[SamplingFields]) -> None:
    with pytest.raises(APIError) as refused:
        parse(orjson.dumps({**base, name: ON[name]}), model)
    error = refused.value
    assert (error.status, error.param, error.code) == (400, name, "unsupported_parameter")
    assert f"'{name}'" in error.message and UNSUPPORTED[name][1] in error.message


@pytest.mark.parametrize(("name", "value"), [(n, v) for n, values in sorted(OFF.items()) for v in values])
def test_a_parameter_at_its_default_is_accepted(name: str, value: Any) -> None:
    request = parse(orjson.dumps({**CHAT, name: value}), ChatCompletionRequest)
    assert isinstance(request, ChatCompletionRequest)


def test_the_first_refused_parameter_is_named_and_the_rest_of_the_body_still_validates() -> None:
    with pytest.raises(APIError) as refused:
        parse(orjson.dumps({**CHAT, "echo": ON["echo"], "temperature": 9}), ChatCompletionRequest)
    assert refused.value.param == "echo"
    with pytest.raises(APIError) as invalid:
        parse(orjson.dumps({**CHAT, "echo": False, "temperature": 9}), ChatCompletionRequest)
    assert invalid.value.param == "temperature"


@pytest.mark.parametrize(
    ("name", "value"),
    [("tools", [{"type": "function", "function": {"name": "f"}}]), ("tool_choice", "required"), ("top_logprobs", 2)],
)
def test_chat_only_parameters_are_refused_on_text_completions(name: str, value: Any) -> None:
    with pytest.raises(APIError) as refused:
        parse(orjson.dumps({**COMPLETION, name: value}), CompletionRequest)
    assert (refused.value.param, refused.value.code) == (name, "unsupported_parameter")
    assert "/v1/chat/completions" in refused.value.message
    assert isinstance(parse(orjson.dumps({**COMPLETION, name: None}), CompletionRequest), CompletionRequest)
