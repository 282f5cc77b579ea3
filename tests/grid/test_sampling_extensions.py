"""vLLM's sampling extensions as benchmark clients send them (aiperf, guidellm and inference-perf all send
`ignore_eos`), through the official openai SDK, streamed and not, on gridserve's own engines (the tiny model and an
emulated card); the answer is what the engine itself gives for the same request."""

import asyncio
from typing import Any

import pytest
from openai import OpenAI
from tests.conftest import API_KEY

from gridserve.cli.grid import LocalGrid
from gridserve.engines.tiny import TINY_MODEL, tiny_engine
from gridserve.types import GenerateRequest, SamplingParams

EMULATED = "llama-3-8b"


@pytest.fixture(scope="module")
def client(tiny_grid: LocalGrid) -> OpenAI:
    return OpenAI(base_url=tiny_grid.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.mark.parametrize("model", [TINY_MODEL, EMULATED])
def test_ignore_eos_gives_exactly_max_tokens_every_time(client: OpenAI, model: str) -> None:
    """Sampled 32-token answers at the default temperature, the same seeds with and without ignore_eos: without it
    some end early (the tiny model's end token is likely), with it none does, streamed or not."""
    lengths: dict[bool, list[int]] = {False: [], True: []}
    for i in range(16):
        ignore = i % 2 == 1
        stream = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "Benchmark prompt"}],
            seed=i // 2,
            max_tokens=32,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True} if ignore else {},
        )
        chunks = list(stream)
        usage = chunks[-1].usage
        assert usage is not None
        reasons = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        lengths[ignore].append(usage.completion_tokens)
        if ignore:
            assert reasons == ["length"]
    assert lengths[True] == [32] * 8 and min(lengths[False]) < 32, lengths
    whole = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Once more"}], max_tokens=32, extra_body={"ignore_eos": True}
    )
    assert (
        whole.usage is not None and whole.usage.completion_tokens == 32 and whole.choices[0].finish_reason == "length"
    )


def test_min_tokens_and_top_k_and_repetition_penalty_give_the_engines_own_answer(client: OpenAI) -> None:
    extensions: dict[str, Any] = {"min_tokens": 12, "top_k": 7, "repetition_penalty": 1.4}
    for seed in range(3):
        answer = client.completions.create(
            model=TINY_MODEL, prompt="Grid", max_tokens=20, seed=seed, temperature=0.8, extra_body=extensions
        )
        assert answer.usage is not None and answer.usage.completion_tokens >= 12
        direct = _engine(prompt="Grid", max_tokens=20, seed=seed, temperature=0.8, **extensions)
        assert answer.choices[0].text == direct
        plain = _engine(prompt="Grid", max_tokens=20, seed=seed, temperature=0.8)
        assert plain != direct, "the extensions change the answer"


def _engine(**request: Any) -> str:
    prompt = request.pop("prompt")

    async def run() -> str:
        engine = tiny_engine(threads=1)
        await engine.start()
        try:
            job = GenerateRequest(
                request_id="direct", model=TINY_MODEL, prompt=prompt, sampling=SamplingParams.model_validate(request)
            )
            return "".join([event.text async for event in engine.generate(job)])
        finally:
            await engine.aclose()

    return asyncio.run(run())


def test_bad_extension_values_are_a_400_naming_them(client: OpenAI) -> None:
    import openai

    for body, param in (
        ({"min_tokens": 40}, "min_tokens"),
        ({"top_k": -3}, "top_k"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
    ):
        with pytest.raises(openai.BadRequestError) as refused:
            client.completions.create(model=TINY_MODEL, prompt="x", max_tokens=20, extra_body=body)
        assert refused.value.body is not None and refused.value.body["param"] == param, refused.value.body  # type: ignore[index]
