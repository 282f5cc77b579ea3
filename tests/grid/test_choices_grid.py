"""`n` > 1 through the official openai SDK on a running grid: each choice is the answer a request with the seed
plus its index gets, streamed and whole; the usage counts the prompt once; too many choices is a 400 naming `n`."""

from typing import Any

import openai
import pytest
from openai import OpenAI
from tests.conftest import API_KEY

from gridserve.cli.grid import LocalGrid
from gridserve.engines.tiny import TINY_MODEL

ASK: Any = [{"role": "user", "content": "Once upon a time"}]


@pytest.fixture(scope="module")
def client(tiny_grid: LocalGrid) -> OpenAI:
    return OpenAI(base_url=tiny_grid.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


def test_each_choice_is_the_answer_to_its_seed(client: OpenAI) -> None:
    asked: dict[str, Any] = {"model": TINY_MODEL, "messages": ASK, "max_tokens": 10, "extra_body": {"ignore_eos": True}}
    whole = client.chat.completions.create(**asked, n=3, seed=7)
    assert [c.index for c in whole.choices] == [0, 1, 2]
    alone = [client.chat.completions.create(**asked, seed=7 + i).choices[0].message.content for i in range(3)]
    assert [c.message.content for c in whole.choices] == alone
    assert len(set(alone)) > 1, "three seeds, three draws"
    assert whole.usage is not None and whole.usage.completion_tokens == 30
    single = client.chat.completions.create(**asked, seed=7)
    assert single.usage is not None and whole.usage.prompt_tokens == single.usage.prompt_tokens, "counted once"
    texts = ["", "", ""]
    usage = None
    for chunk in client.chat.completions.create(
        **asked, n=3, seed=7, stream=True, stream_options={"include_usage": True}
    ):
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
        usage = chunk.usage or usage
    assert texts == alone and usage is not None and usage.completion_tokens == 30


def test_text_completions_take_n_too(client: OpenAI) -> None:
    answer = client.completions.create(model=TINY_MODEL, prompt="One", max_tokens=6, n=2, seed=3, temperature=0)
    assert [c.index for c in answer.choices] == [0, 1]
    assert answer.choices[0].text == answer.choices[1].text, "greedy: the same answer twice"


def test_too_many_choices_is_a_400_naming_n(client: OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=TINY_MODEL, messages=ASK, max_tokens=4, n=17)
    assert refused.value.param == "n"
