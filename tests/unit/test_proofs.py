"""Activation proofs and the verifier at engine level: honest work passes at other thread counts; other
weights, a skipped layer, lower precision, a changed prompt and altered tokens are caught."""

import asyncio
from collections.abc import Iterator

import pytest
import torch

from gridserve.engines.tiny import build_tiny_model, tiny_engine
from gridserve.engines.torch_engine import LoadedModel, TorchEngine
from gridserve.gateway.integrity.audit import Verifier
from gridserve.trust import proofs
from gridserve.trust.testing import unsigned_receipt
from gridserve.types import GenerateRequest, SamplingParams, TokenEvent

pytestmark = pytest.mark.skipif(not proofs.AVAILABLE, reason="toploc is not built here (make installs it)")
MODEL = "gridserve-tiny"


@pytest.fixture(scope="module", params=[1, 2], ids=["node-1-thread", "node-2-threads"])
def node(request: pytest.FixtureRequest) -> Iterator[TorchEngine]:
    engine = tiny_engine(threads=request.param)
    engine.load_sync()
    yield engine
    asyncio.run(engine.aclose())


def run(engine: TorchEngine, job: GenerateRequest) -> tuple[list[int], TokenEvent]:
    async def go() -> list[TokenEvent]:
        return [e async for e in engine.generate(job)]

    events = asyncio.run(go())
    return [t for e in events for t in e.token_ids], events[-1]


def job(i: int, temperature: float = 0.0, max_tokens: int = 40) -> GenerateRequest:
    return GenerateRequest(
        request_id=f"cmpl-{i}",
        model=MODEL,
        prompt=f"proof prompt {i}: the grid verifies",
        sampling=SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=i),
    )


def test_honest_completions_pass_audit_at_any_thread_count(node: TorchEngine) -> None:
    verifier = Verifier(threads=2)
    for i in range(60):
        j = job(i, temperature=0.0 if i % 2 else 0.9)
        ids, final = run(node, j)
        assert final.proof, "the node builds a proof"
        result = verifier.check(j, ids, unsigned_receipt(final, MODEL))
        assert result.ok and result.proof_checked, result.problems


def _acts(loaded: LoadedModel, prompt: list[int], ids: list[int], picks: int) -> list[torch.Tensor]:
    with torch.inference_mode():
        hidden = loaded.model(input_ids=torch.tensor([[*prompt, *ids]]), output_hidden_states=True).hidden_states[-1][0]
    return [hidden[len(prompt) - 1 + i] for i in range(picks)]


def test_proof_rejects_other_weights_a_skipped_layer_lower_precision_and_another_prompt() -> None:
    node = tiny_engine(threads=1)
    node.load_sync()
    honest = build_tiny_model()
    other = build_tiny_model(seed=7)
    lazy = build_tiny_model()
    lazy.model.model.layers = lazy.model.model.layers[:-1]
    bf16 = build_tiny_model()
    bf16.model.to(torch.bfloat16)
    caught = {"other": 0, "lazy": 0, "bf16": 0, "prompt": 0}
    runs = 20
    for i in range(runs):
        j = job(i, temperature=0.9)
        ids, final = run(node, j)
        prompt = node.prompt_ids(j)
        picks = final.completion_tokens
        assert proofs.verify(_acts(honest, prompt, ids, picks), final.proof, MODEL).ok
        for name, model, p in (
            ("other", other, prompt),
            ("lazy", lazy, prompt),
            ("bf16", bf16, prompt),
            ("prompt", honest, [*prompt[:-1], prompt[-1] ^ 1]),
        ):
            acts = [a.float() for a in _acts(model, p, ids, picks)]
            caught[name] += not proofs.verify(acts, final.proof, MODEL).ok
    assert caught == {name: runs for name in caught}


def test_greedy_audit_catches_altered_tokens_and_a_lying_prompt_digest() -> None:
    node = tiny_engine(threads=1)
    node.load_sync()
    verifier = Verifier(threads=1)
    altered = 0
    for i in range(20):
        j = job(100 + i)
        ids, final = run(node, j)
        if len(ids) < 4:
            continue
        bad = [*ids[:3], ids[3] ^ 1, *ids[4:]]
        result = verifier.check(j, bad, unsigned_receipt(final, MODEL))
        assert not result.ok and any("greedy token 3" in p or "proof" in p for p in result.problems)
        altered += 1
        lie = verifier.check(j, ids, unsigned_receipt(final, MODEL, prompt_digest="0" * 64))
        assert any("prompt digest" in p for p in lie.problems)
    assert altered >= 10
