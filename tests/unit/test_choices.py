"""`n` > 1: each choice is its own request (its own id, the seed plus its index), and the answers come back as one,
streamed or whole: every choice's chunks under its index, one usage over all (the prompt counted once), one [DONE];
a choice that fails ends the stream, and leaving early releases every choice's node."""

import asyncio
from types import SimpleNamespace
from typing import Any

import orjson
import pytest
from tests.unit.answer_support import Scripted, context

from gridserve.engines.tiny import TINY_MODEL
from gridserve.gateway.api import answers, openai_api
from gridserve.gateway.api.errors import APIError
from gridserve.gateway.api.openai_api import _choice, parse, to_job
from gridserve.gateway.api.schemas import ChatCompletionRequest
from gridserve.gateway.api.sse import DONE, ChunkFormatter
from gridserve.types import StreamEvent


def node(text: str, completion: int) -> list[StreamEvent]:
    return [
        *({"text": c, "token_ids": [ord(c)]} for c in text),
        {"finish_reason": "stop", "prompt_tokens": 7, "completion_tokens": completion, "cached_tokens": 4},
    ]


def formatters(n: int, chat: bool = True) -> list[ChunkFormatter]:
    return [ChunkFormatter(chat=chat, response_id="x", model=TINY_MODEL, created=1, index=i) for i in range(n)]


def frames(stream: bytes) -> list[Any]:
    return [b if b == DONE.strip() else orjson.loads(b[len(b"data: ") :]) for b in stream.split(b"\n\n") if b]


def test_a_choice_is_its_own_request_with_the_next_seed() -> None:
    raw = {"model": TINY_MODEL, "messages": [{"role": "user", "content": "hi"}], "n": 3, "seed": 41}
    job, _ = to_job(parse(orjson.dumps(raw), ChatCompletionRequest), "chat", "chatcmpl-1")
    assert _choice(job, 0) is job
    second = _choice(job, 2)
    assert (second.request_id, second.sampling.seed) == ("chatcmpl-1-2", 43)
    greedy, _ = to_job(parse(orjson.dumps({**raw, "temperature": 0}), ChatCompletionRequest), "chat", "c")
    assert _choice(greedy, 1).sampling == greedy.sampling, "greedy choices are the same request"
    with pytest.raises(APIError) as refused:
        parse(orjson.dumps({**raw, "n": 17}), ChatCompletionRequest)
    assert refused.value.param == "n"


@pytest.mark.parametrize("chat", [True, False], ids=["chat", "completions"])
def test_choices_stream_under_their_index_with_one_usage_and_one_done(chat: bool) -> None:
    sources = [Scripted(node("abc", 3), 0.001), Scripted(node("de", 2), 0.0015)]

    async def go() -> bytes:
        stream = answers.sse_many(context(), list(sources), formatters(2, chat), [None, None], usage=True)
        return b"".join([c async for c in stream])

    got = frames(asyncio.run(go()))
    assert got[-1] == DONE.strip() and got.count(DONE.strip()) == 1
    usage = got[-2]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 5
    assert (usage["usage"]["prompt_tokens"], usage["usage"]["prompt_tokens_details"]) == (7, {"cached_tokens": 4})
    texts: dict[int, str] = {0: "", 1: ""}
    ends = {}
    for frame in got[:-2]:
        (choice,) = frame["choices"]
        texts[choice["index"]] += (choice.get("delta") or {}).get("content") or choice.get("text") or ""
        if choice["finish_reason"]:
            ends[choice["index"]] = choice["finish_reason"]
    assert texts == {0: "abc", 1: "de"} and ends == {0: "stop", 1: "stop"}
    texts_in_order = [f["choices"][0]["index"] for f in got[:-2] if _said(f["choices"][0])]
    first_end = min(i for i, f in enumerate(got[:-2]) if f["choices"][0]["finish_reason"])
    before_an_end = [f["choices"][0]["index"] for f in got[:first_end] if _said(f["choices"][0])]
    assert set(before_an_end) == {0, 1}, f"both choices stream before either ends: {texts_in_order}"


def _said(choice: dict[str, Any]) -> str:
    return str((choice.get("delta") or {}).get("content") or choice.get("text") or "")


def test_a_failing_choice_ends_the_stream_and_releases_the_others() -> None:
    slow = Scripted(node("abcdefgh", 8), 0.01)
    failing = Scripted([{"text": "x", "token_ids": [1]}, {"error": {"message": "node died"}}], 0.001)

    async def go() -> bytes:
        stream = answers.sse_many(context(), [slow, failing], formatters(2), [None, None], usage=False)
        return b"".join([c async for c in stream])

    got = frames(asyncio.run(go()))
    assert got[-1]["error"]["message"] == "node died" and DONE.strip() not in got
    assert slow.closed and slow.status == "cancelled", "the other choice's node is released"
    assert failing.status == "failed", "recorded as the node's failure, not as the client leaving"


def test_choices_collected_whole() -> None:
    sources = [Scripted(node("abc", 3)), Scripted(node("de", 2)), Scripted(node("f", 1))]
    whole = asyncio.run(answers.collect_many(context(), list(sources), formatters(3), [None] * 3))
    assert [(c["index"], c["message"]["content"]) for c in whole["choices"]] == [(0, "abc"), (1, "de"), (2, "f")]
    assert whole["usage"]["completion_tokens"] == 6 and whole["usage"]["prompt_tokens"] == 7


def test_a_failing_choice_fails_the_whole_answer_and_releases_the_others() -> None:
    slow = Scripted(node("abcdefgh", 8), 0.01)
    failing = Scripted([{"error": {"message": "node died"}}], 0.001)
    with pytest.raises(APIError) as failed:
        asyncio.run(answers.collect_many(context(), [slow, failing], formatters(2), [None, None]))
    assert failed.value.status == 502 and slow.status == "cancelled"


class _Placing:
    """`_open` faked at the scheduler's edge: choice 0 is placed at once, choice 1 after `delay_s` or never."""

    def __init__(self, delay_s: float | None) -> None:
        self.delay_s = delay_s
        self.sources: list[Scripted] = []
        self.placed = asyncio.Event()

    async def __call__(self, ctx: Any, req: Any, job: Any, prompt_tokens: int, kind: str) -> Any:
        if job.request_id.endswith("-1"):
            await asyncio.sleep(self.delay_s if self.delay_s is not None else 3600)
            raise APIError(503, "no eligible node", code="no_eligible_node")
        source = Scripted(node("abc", 3))
        self.sources.append(source)
        self.placed.set()
        return openai_api._Opened(SimpleNamespace(), [], source, job, 3)


def _jobs() -> list[Any]:
    raw = {"model": TINY_MODEL, "messages": [{"role": "user", "content": "hi"}], "n": 2, "seed": 1}
    job, _ = to_job(parse(orjson.dumps(raw), ChatCompletionRequest), "chat", "chatcmpl-x")
    return [_choice(job, i) for i in range(2)]


def test_a_choice_that_cannot_be_placed_releases_those_that_were(monkeypatch: pytest.MonkeyPatch) -> None:
    placing = _Placing(0.01)
    monkeypatch.setattr(openai_api, "_open", placing)
    with pytest.raises(APIError) as failed:
        asyncio.run(openai_api._open_all(context(), None, _jobs(), 3, "chat"))  # type: ignore[arg-type]
    assert failed.value.status == 503
    (placed,) = placing.sources
    assert placed.closed and placed.status == "cancelled"


def test_a_client_leaving_while_choices_are_placed_releases_those_that_were(monkeypatch: pytest.MonkeyPatch) -> None:
    placing = _Placing(None)
    monkeypatch.setattr(openai_api, "_open", placing)

    async def leave() -> None:
        task = asyncio.ensure_future(openai_api._open_all(context(), None, _jobs(), 3, "chat"))  # type: ignore[arg-type]
        await placing.placed.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(leave())
    (placed,) = placing.sources
    assert placed.closed and placed.status == "cancelled"


def test_continuous_usage_with_several_choices_is_refused_before_anything_is_placed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    placing = _Placing(0.0)
    monkeypatch.setattr(openai_api, "_open", placing)
    raw = {"model": TINY_MODEL, "messages": [{"role": "user", "content": "hi"}], "n": 2, "stream": True}
    raw["stream_options"] = {"include_usage": True, "continuous_usage_stats": True}
    req = parse(orjson.dumps(raw), ChatCompletionRequest)
    job, prompt_tokens = to_job(req, "chat", "chatcmpl-x")
    with pytest.raises(APIError) as refused:
        asyncio.run(openai_api._choices(context(), req, job, prompt_tokens, openai_api.CHAT))
    assert (refused.value.status, refused.value.param) == (400, "stream_options")
    assert "continuous_usage_stats" in refused.value.message and placing.sources == []
