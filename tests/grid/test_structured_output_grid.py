"""Structured output through the official openai SDK on a running grid: `chat.completions.parse` with a pydantic
model (strict json_schema), a raw json_schema streamed, and json_object, on the tiny model and an emulated card;
every answer that ends by itself parses and validates."""

import json

import jsonschema
import pytest
from openai import OpenAI
from pydantic import BaseModel, Field
from tests.conftest import API_KEY

from gridserve.cli.grid import LocalGrid
from gridserve.engines.tiny import TINY_MODEL

EMULATED = "llama-3-8b"
INVOICE = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 1, "maximum": 9999},
        "paid": {"type": "boolean"},
        "lines": {
            "type": "array",
            "maxItems": 3,
            "items": {
                "type": "object",
                "properties": {
                    "sku": {"type": "string", "maxLength": 6},
                    "qty": {"type": "integer", "minimum": 1, "maximum": 9},
                },
                "required": ["sku", "qty"],
                "additionalProperties": False,
            },
        },
    },
    "required": ["id", "paid", "lines"],
    "additionalProperties": False,
}


class City(BaseModel):
    name: str = Field(max_length=12)
    population: int = Field(ge=0, le=10_000_000)
    capital: bool


@pytest.fixture(scope="module")
def client(tiny_grid: LocalGrid) -> OpenAI:
    return OpenAI(base_url=tiny_grid.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.mark.parametrize("model", [TINY_MODEL, EMULATED])
def test_the_sdks_parse_returns_the_pydantic_object(client: OpenAI, model: str) -> None:
    for seed in range(3):
        completion = client.chat.completions.parse(
            model=model,
            messages=[{"role": "user", "content": "Name a city."}],
            response_format=City,
            max_tokens=120,
            seed=seed,
        )
        choice = completion.choices[0]
        assert choice.finish_reason == "stop" and isinstance(choice.message.parsed, City), choice


def test_a_json_schema_answer_streams_and_validates(client: OpenAI) -> None:
    response_format = {"type": "json_schema", "json_schema": {"name": "invoice", "schema": INVOICE, "strict": True}}
    for seed in range(4):
        stream = client.chat.completions.create(
            model=TINY_MODEL,
            messages=[{"role": "user", "content": "An invoice, please."}],
            response_format=response_format,  # type: ignore[arg-type]
            max_tokens=160,
            seed=seed,
            temperature=0 if seed == 0 else 1,
            stream=True,
        )
        chunks = list(stream)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
        jsonschema.validate(json.loads(text), INVOICE)


def test_json_object_answers_are_objects(client: OpenAI) -> None:
    ended = 0
    for seed in range(3):
        answer = client.completions.create(
            model=TINY_MODEL,
            prompt="{",
            max_tokens=100,
            seed=seed,
            extra_body={"response_format": {"type": "json_object"}},
        )
        if answer.choices[0].finish_reason == "stop":
            assert isinstance(json.loads(answer.choices[0].text), dict)
            ended += 1
    assert ended, "an object ends within 100 tokens"


def test_a_schema_that_cannot_be_generated_is_a_400(client: OpenAI) -> None:
    import openai

    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(
            model=TINY_MODEL,
            messages=[{"role": "user", "content": "x"}],
            response_format={"type": "json_schema", "json_schema": {"name": "bad", "schema": {"type": "frobnicate"}}},  # type: ignore[arg-type, typeddict-item]
        )
    assert refused.value.body is not None and refused.value.body["param"] == "response_format.json_schema.schema"  # type: ignore[index]
