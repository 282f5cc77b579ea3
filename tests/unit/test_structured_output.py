"""Structured output (`response_format`) on gridserve's own engines: generated under the schema's grammar
(llguidance), so an answer that ends by itself parses and validates (jsonschema), even from the tiny model; the
grammar is part of the TokenRule the verifier re-executes; failover continues an answer inside its format; the
gateway turns OpenAI's `response_format` into the node's, with a 400 naming what is wrong."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import jsonschema
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tests.json_schemas import bounded_schemas, instances

from gridserve.engines.grammar import Constraint, check
from gridserve.engines.tiny import EOS, TINY_MODEL, ByteCodec
from gridserve.engines.torch_engine import TorchEngine
from gridserve.gateway.api.errors import APIError
from gridserve.gateway.api.openai_api import parse, to_job
from gridserve.gateway.api.schemas import ChatCompletionRequest
from gridserve.gateway.integrity.audit import Verifier
from gridserve.trust import proofs
from gridserve.trust.testing import unsigned_receipt
from gridserve.types import GenerateRequest, SamplingParams, TokenEvent
from gridserve.types.wire import ResponseFormat

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}


def fmt_of(schema: dict[str, Any] | None) -> ResponseFormat:
    if schema is None:
        return ResponseFormat(type="json_object")
    return ResponseFormat(type="json_schema", schema_text=json.dumps(schema))


def run(engine: TorchEngine, request: GenerateRequest) -> tuple[list[int], list[TokenEvent]]:
    async def go() -> list[TokenEvent]:
        return [e async for e in engine.generate(request)]

    events = asyncio.run(go())
    return [t for e in events for t in e.token_ids], events


def job(
    fmt: ResponseFormat, seed: int = 0, temperature: float = 1.0, max_tokens: int = 400, resume: tuple[int, ...] = ()
) -> GenerateRequest:
    sampling = SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed, response_format=fmt)
    prompt = "Answer in JSON: "
    return GenerateRequest(request_id=f"json-{seed}", model=TINY_MODEL, prompt=prompt, sampling=sampling, resume=resume)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(schema=bounded_schemas, seed=st.integers(0, 2**32), greedy=st.booleans())
def test_every_answer_under_a_json_schema_parses_and_validates(
    tiny: TorchEngine, schema: dict[str, Any], seed: int, greedy: bool
) -> None:
    _, events = run(tiny, job(fmt_of(schema), seed, temperature=0.0 if greedy else 1.0))
    final = events[-1]
    assert final.finish_reason == "stop", "a bounded schema's answer ends by itself"
    jsonschema.validate(json.loads("".join(e.text for e in events)), schema)


@settings(max_examples=60, deadline=None)
@given(data=st.data(), schema=bounded_schemas)
def test_the_grammar_accepts_every_compact_instance_of_its_schema(data: st.DataObject, schema: dict[str, Any]) -> None:
    """Not narrower than the schema: any valid instance, written compactly in the schema's property order, is a
    path through the grammar to its end."""
    instance = data.draw(instances(schema))
    jsonschema.validate(instance, schema)
    constraint = Constraint(fmt_of(schema), ByteCodec())
    codec = ByteCodec()
    tokens = codec.encode_prompt(json.dumps(instance, separators=(",", ":"), ensure_ascii=False))[1:]
    assert all(constraint.accept(t) for t in tokens), (instance, constraint.error)
    assert constraint.accept(EOS), "the instance is complete"


def test_json_object_gives_an_object(tiny: TorchEngine) -> None:
    for seed in range(6):
        _, events = run(tiny, job(fmt_of(None), seed))
        if events[-1].finish_reason == "stop":
            assert isinstance(json.loads("".join(e.text for e in events)), dict)


def test_failover_continues_inside_the_format_token_exact(tiny: TorchEngine) -> None:
    for seed in range(3):
        whole, events = run(tiny, job(fmt_of(PERSON), seed))
        text = "".join(e.text for e in events)
        for cut in (1, len(whole) // 2, len(whole) - 1):
            rest, tail = run(tiny, job(fmt_of(PERSON), seed, resume=tuple(whole[:cut])))
            assert whole[:cut] + rest == whole, (seed, cut)
            assert "".join(e.text for e in tail) == text[len(ByteCodec().decode(whole[:cut])) :]


needs_proofs = pytest.mark.skipif(not proofs.AVAILABLE, reason="toploc is not built here (make installs it)")


@needs_proofs
def test_structured_answers_pass_audit_and_one_that_leaves_its_format_does_not(tiny: TorchEngine) -> None:
    verifier = Verifier(threads=1)
    for seed in range(6):
        request = job(fmt_of(PERSON), seed, temperature=0.0 if seed % 2 else 1.0, max_tokens=64)
        ids, events = run(tiny, request)
        assert verifier.check(request, ids, unsigned_receipt(events[-1], TINY_MODEL)).ok
    free = job(fmt_of(PERSON), 7, temperature=0.0, max_tokens=40)
    plain = free.model_copy(update={"sampling": free.sampling.model_copy(update={"response_format": None})})
    ids, events = run(tiny, plain)  # the same request answered without its grammar
    result = verifier.check(free, ids, unsigned_receipt(events[-1], TINY_MODEL))
    assert not result.ok and any("greedy token 0" in p for p in result.problems), result.problems


# --- the gateway ---------------------------------------------------------------------------------------------------

CHAT: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def test_openais_response_format_becomes_the_nodes() -> None:
    body = {
        **CHAT,
        "response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}},
    }
    request, _ = to_job(parse(orjson.dumps(body), ChatCompletionRequest), "chat", "r")
    fmt = request.sampling.response_format
    assert fmt is not None and (fmt.type, fmt.name, fmt.strict) == ("json_schema", "person", True)
    assert fmt.answer_schema() == PERSON and "response_format" in request.sampling.features()
    assert fmt.openai() == {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    plain, _ = to_job(
        parse(orjson.dumps({**CHAT, "response_format": {"type": "text"}}), ChatCompletionRequest), "chat", "r"
    )
    assert plain.sampling.response_format is None and plain.sampling.features() == ()
    anything, _ = to_job(
        parse(orjson.dumps({**CHAT, "response_format": {"type": "json_object"}}), ChatCompletionRequest), "chat", "r"
    )
    assert anything.sampling.response_format == ResponseFormat(type="json_object")


@pytest.mark.parametrize(
    ("response_format", "extra", "param"),
    [
        ({"type": "xml"}, {}, "response_format.type"),
        ({"type": "json_schema"}, {}, "response_format.json_schema.schema"),
        ({"type": "json_schema", "json_schema": {"schema": "not a schema"}}, {}, "response_format.json_schema.schema"),
        (
            {"type": "json_schema", "json_schema": {"schema": {"type": "object"}, "name": 7}},
            {},
            "response_format.json_schema",
        ),
        (
            {"type": "json_schema", "json_schema": {"schema": {"type": "frobnicate"}}},
            {},
            "response_format.json_schema.schema",
        ),
        ({"type": "json_object"}, {"ignore_eos": True}, "response_format"),
        ({"type": "json_object"}, {"min_tokens": 3}, "response_format"),
    ],
)
def test_a_format_that_cannot_be_generated_is_a_400_naming_what(
    response_format: Any, extra: dict[str, Any], param: str
) -> None:
    with pytest.raises(APIError) as refused:
        to_job(
            parse(orjson.dumps({**CHAT, "response_format": response_format, **extra}), ChatCompletionRequest),
            "chat",
            "r",
        )
    assert (refused.value.status, refused.value.param) == (400, param), refused.value.message


def test_check_says_why_a_schema_cannot_be_generated() -> None:
    assert check(fmt_of(PERSON)) == "" and check(fmt_of(None)) == ""
    assert check(fmt_of({"type": "frobnicate"}))
