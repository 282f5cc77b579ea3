"""Log-probabilities (`logprobs`, `top_logprobs`; the text completions' `logprobs`): the engine's numbers are the
model's own distribution, the gateway writes them in OpenAI's chat and legacy shapes, an upstream's are read in
either shape, and the verifier re-computes them (a node that invents them fails its audit)."""

from __future__ import annotations

import asyncio
import math
from typing import Any

import orjson
import pytest
import torch

from gridserve.engines.sampling import log_probs, token_logprob
from gridserve.engines.tiny import TINY_MODEL
from gridserve.engines.torch_engine import TorchEngine
from gridserve.engines.upstream import UpstreamEngine, _logprobs
from gridserve.gateway.api.errors import APIError
from gridserve.gateway.api.openai_api import parse, to_job
from gridserve.gateway.api.schemas import ChatCompletionRequest, CompletionRequest
from gridserve.gateway.api.sse import ChunkFormatter
from gridserve.gateway.api.surface import Answer
from gridserve.gateway.dispatch.dispatcher import NodeFailed
from gridserve.gateway.dispatch.generation import checked_logprobs
from gridserve.gateway.integrity.audit import Verifier
from gridserve.node.dishonest import Dishonesty
from gridserve.trust import proofs
from gridserve.trust.testing import unsigned_receipt
from gridserve.types import ChatMessage, GenerateRequest, SamplingParams, TokenEvent


def job(i: int, **sampling: Any) -> GenerateRequest:
    params = SamplingParams.model_validate({"max_tokens": 24, "temperature": 1.0, "seed": i, **sampling})
    return GenerateRequest(request_id=f"cmpl-{i}", model=TINY_MODEL, prompt=f"Hello {i}", sampling=params)


def run(engine: TorchEngine, request: GenerateRequest) -> list[TokenEvent]:
    async def go() -> list[TokenEvent]:
        return [e async for e in engine.generate(request)]

    return asyncio.run(go())


class _Bytes:
    def decode(self, ids: Any) -> str:
        return bytes(ids).decode("utf-8", errors="replace")

    def token_bytes(self, token: int) -> bytes:
        return bytes([token])


def test_a_tokens_entry_is_the_models_log_softmax_with_the_likeliest_first() -> None:
    logits = torch.tensor([2.0, 0.5, 3.0, -1.0, 2.5])
    mask = torch.tensor([0.0, 0.0, 0.0, float("-inf"), 0.0])
    entry = token_logprob(logits, mask, 0, 3, _Bytes())
    want = torch.log_softmax(logits.double() + mask, dim=-1)
    assert entry.logprob == pytest.approx(float(want[0]))
    assert [t.token for t in entry.top_logprobs] == ["\x02", "\x04", "\x00"], "token 2, then 4, then 0"
    assert [t.logprob for t in entry.top_logprobs] == sorted((t.logprob for t in entry.top_logprobs), reverse=True)
    assert math.fsum(math.exp(v) for v in log_probs(logits, mask).tolist() if v > -math.inf) == pytest.approx(1.0)
    part = token_logprob(torch.zeros(256), None, 0xE2, 0, _Bytes())
    assert (part.token, part.bytes) == ("\ufffd", (0xE2,)), "part of a character: its byte, not U+FFFD's"
    masked = token_logprob(logits, mask, 3, 0, _Bytes())
    assert masked.logprob == -9999.0 and masked.top_logprobs == (), "-inf is written as OpenAI does, -9999"


def test_the_engine_sends_one_entry_per_token_only_when_asked(tiny: TorchEngine) -> None:
    plain = run(tiny, job(1))
    assert all(not e.logprobs for e in plain)
    asked = run(tiny, job(1, logprobs=4))
    tokens = [e for e in asked if e.token_ids]
    assert [t for e in plain for t in e.token_ids] == [t for e in tokens for t in e.token_ids], "same answer"
    for event in tokens:
        (entry,) = event.logprobs
        assert entry.logprob <= 0.0 and len(entry.top_logprobs) == 4
        assert entry.top_logprobs[0].logprob >= entry.logprob, "nothing likelier than the likeliest"
    said = b"".join(bytes(e.logprobs[0].bytes) for e in tokens).decode("utf-8", errors="replace")
    assert said == "".join(e.text for e in asked), "the bytes spell the answer"
    greedy = [e for e in run(tiny, job(2, temperature=0.0, logprobs=1)) if e.token_ids]
    assert all(e.logprobs[0].logprob == e.logprobs[0].top_logprobs[0].logprob for e in greedy), "argmax picked"


def _chat(**body: Any) -> GenerateRequest:
    raw = {"model": TINY_MODEL, "messages": [{"role": "user", "content": "hi"}], **body}
    return to_job(parse(orjson.dumps(raw), ChatCompletionRequest), "chat", "chatcmpl-x")[0]


def test_the_gateway_maps_openais_parameters() -> None:
    assert _chat().sampling.logprobs is None
    assert _chat(logprobs=False).sampling.logprobs is None
    assert _chat(logprobs=True).sampling.logprobs == 0
    assert _chat(logprobs=True, top_logprobs=5).sampling.logprobs == 5
    assert _chat(logprobs=True).sampling.features() == ("logprobs",)
    text = parse(orjson.dumps({"model": TINY_MODEL, "prompt": "hi", "logprobs": 3}), CompletionRequest)
    assert to_job(text, "text", "cmpl-x")[0].sampling.logprobs == 3


@pytest.mark.parametrize(
    ("body", "param"),
    [({"top_logprobs": 2}, "top_logprobs"), ({"logprobs": True, "top_logprobs": 21}, "top_logprobs")],
)
def test_bad_logprob_parameters_are_400s_naming_them(body: dict[str, Any], param: str) -> None:
    with pytest.raises(APIError) as refused:
        _chat(**body)
    assert refused.value.status == 400 and refused.value.param == param
    with pytest.raises(APIError) as legacy:
        parse(orjson.dumps({"model": TINY_MODEL, "prompt": "hi", "logprobs": 6}), CompletionRequest)
    assert legacy.value.param == "logprobs"


ENTRIES = [
    {"token": "He", "logprob": -0.5, "bytes": [72, 101], "top_logprobs": [{"token": "He", "logprob": -0.5}]},
    {"token": "llo", "logprob": -1.25, "bytes": [108, 108, 111], "top_logprobs": [{"token": "y", "logprob": -0.2}]},
]


def test_chat_chunks_and_answers_carry_the_entries() -> None:
    fmt = ChunkFormatter(chat=True, response_id="x", model=TINY_MODEL, created=1)
    chunk = orjson.loads(fmt.scored("He", ENTRIES[:1])[len(b"data: ") :])
    assert chunk["choices"][0]["delta"] == {"content": "He"}
    assert chunk["choices"][0]["logprobs"] == {"content": ENTRIES[:1]}
    whole = fmt.whole(Answer("stop", 3, 2, text="Hello", logprobs=tuple(ENTRIES)))
    assert whole["choices"][0]["logprobs"] == {"content": ENTRIES}
    assert fmt.whole(Answer("stop", 3, 2, text="Hello"))["choices"][0]["logprobs"] is None


def test_text_completions_get_the_legacy_shape_with_offsets() -> None:
    fmt = ChunkFormatter(chat=False, response_id="x", model=TINY_MODEL, created=1)
    first = orjson.loads(fmt.scored("He", ENTRIES[:1])[len(b"data: ") :])["choices"][0]["logprobs"]
    second = orjson.loads(fmt.scored("llo", ENTRIES[1:])[len(b"data: ") :])["choices"][0]["logprobs"]
    assert first == {"tokens": ["He"], "token_logprobs": [-0.5], "top_logprobs": [{"He": -0.5}], "text_offset": [0]}
    assert second["text_offset"] == [2], "offsets count from the answer's start across chunks"
    whole = ChunkFormatter(chat=False, response_id="x", model=TINY_MODEL, created=1).whole(
        Answer("stop", 3, 2, text="Hello", logprobs=tuple(ENTRIES))
    )
    assert whole["choices"][0]["logprobs"]["tokens"] == ["He", "llo"]
    assert whole["choices"][0]["logprobs"]["text_offset"] == [0, 2]


def test_an_upstreams_numbers_are_read_in_either_shape() -> None:
    chat = _logprobs({"content": ENTRIES})
    assert [(e.token, e.logprob, len(e.top_logprobs)) for e in chat] == [("He", -0.5, 1), ("llo", -1.25, 1)]
    legacy = _logprobs({"tokens": ["a", "b"], "token_logprobs": [-0.1, None], "top_logprobs": [{"a": -0.1}, None]})
    assert [(e.token, e.logprob) for e in legacy] == [("a", -0.1), ("b", -9999.0)]
    assert legacy[0].top_logprobs[0].token == "a" and legacy[1].top_logprobs == ()
    assert _logprobs(None) == () and _logprobs("junk") == ()


def test_an_upstream_is_asked_for_them_in_its_endpoints_terms() -> None:
    engine = UpstreamEngine(url="http://127.0.0.1:1", served_name="m", upstream_model="m", max_context=64)
    chat = job(0, logprobs=3).model_copy(update={"prompt": None, "messages": (ChatMessage(role="user", content="hi"),)})
    path, body = engine._body(chat)
    assert path == "/v1/chat/completions" and (body["logprobs"], body["top_logprobs"]) == (True, 3)
    path, body = engine._body(job(0, logprobs=2))
    assert path == "/v1/completions" and body["logprobs"] == 2 and "top_logprobs" not in body
    assert "logprobs" not in engine._body(job(0))[1]


needs_proofs = pytest.mark.skipif(not proofs.AVAILABLE, reason="toploc is not built here (make installs it)")


def _claims(events: list[TokenEvent]) -> tuple[tuple[float, tuple[float, ...]], ...]:
    return tuple(
        (e.logprobs[0].logprob, tuple(t.logprob for t in e.logprobs[0].top_logprobs)) for e in events if e.token_ids
    )


@needs_proofs
def test_the_verifier_recomputes_them_and_catches_invented_ones(tiny: TorchEngine) -> None:
    verifier = Verifier(threads=1)
    lies = Dishonesty.of(["flatter_logprobs"], allowed=True)
    for i in range(4):
        request = job(i, logprobs=2, **({"temperature": 0.0} if i % 2 else {}))
        events = run(tiny, request)
        ids = [t for e in events for t in e.token_ids]
        honest = _claims(events)
        receipt = unsigned_receipt(events[-1], TINY_MODEL)
        assert verifier.check(request, ids, receipt, honest).ok, i
        told = _claims([lies.alter(e, n) for n, e in enumerate(events)])
        assert {value for value, _ in told} == {0.0}
        result = verifier.check(request, ids, receipt, told)
        assert not result.ok and any("log-probability is claimed 0.0000" in p for p in result.problems), result
        assert not verifier.check(request, ids, receipt, honest[:-1]).ok, "one claim per token"
        assert not verifier.check(request, ids, receipt, ()).ok, "asked for and not sent"
        shifted = tuple((value, tuple(t - 0.5 for t in tops)) for value, tops in honest)
        result = verifier.check(request, ids, receipt, shifted)
        assert not result.ok and any("alternatives are claimed" in p for p in result.problems), result


def test_the_gateway_takes_only_well_formed_numbers_and_only_when_asked() -> None:
    (kept,) = checked_logprobs([ENTRIES[0]], 2, 1)
    assert list(kept["top_logprobs"]) == [{"token": "He", "logprob": -0.5, "bytes": ()}] and kept["bytes"] == (72, 101)
    assert checked_logprobs([ENTRIES[0]], None, 1) == [], "not asked for: dropped"
    bad: list[object] = [
        "junk",
        [{**ENTRIES[0], "extra": "injected"}],
        [ENTRIES[0], ENTRIES[1]],  # two entries for one token
        [{**ENTRIES[0], "logprob": float("nan")}],
        [{**ENTRIES[0], "logprob": 0.5}],
        [{**ENTRIES[0], "logprob": "x"}],
        [{**ENTRIES[0], "top_logprobs": [{"token": "a", "logprob": -1.0}] * 3}],  # more than asked
    ]
    for raw in bad:
        with pytest.raises(NodeFailed, match="malformed log-probabilities"):
            checked_logprobs(raw, 2, 1)
