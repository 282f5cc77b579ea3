"""Driving a torch engine's generation one step at a time, as its worker does (prefix-cache tests)."""

import torch

from gridserve.engines.base import EngineStats
from gridserve.engines.torch_engine import TorchEngine, _Generation
from gridserve.types import GenerateRequest


def stepped(engine: TorchEngine, prompt: list[int], request: GenerateRequest) -> tuple[_Generation, list[torch.Tensor]]:
    """Greedy decoding of `prompt` on the engine's model and prefix cache, one forward pass (prefill, then one decode
    step each) and one pick at a time: the generation, and the logits behind every token."""
    failures: list[BaseException] = []
    gen = _Generation(
        engine._require(),
        engine.prefix_cache,  # type: ignore[arg-type]
        prompt,
        request,
        lambda item: failures.append(item) if isinstance(item, BaseException) else None,
        EngineStats(),
    )
    logits: list[torch.Tensor] = []
    with torch.inference_mode():
        done = False
        while not done:
            done = gen.advance()
            logits.append(gen.out.logits[0, -1].clone())
    assert not failures, failures
    return gen, logits
