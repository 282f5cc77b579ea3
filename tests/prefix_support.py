"""Driving a torch engine's generation one step at a time, as its worker does (prefix-cache tests)."""

import torch

from gridserve.engines.base import EngineStats
from gridserve.engines.torch_engine import TorchEngine, _Generation
from gridserve.types import GenerateRequest


def stepped(engine: TorchEngine, prompt: list[int], request: GenerateRequest) -> tuple[_Generation, list[torch.Tensor]]:
    """Greedy decoding of `prompt` on the engine's model and prefix cache, one forward pass (a chunk of the prompt,
    or a decode step) at a time: the generation, and the logits behind every picked token."""
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
            picked = gen.step
            done = gen.advance()  # a chunk of the prompt, or one decode step, and a pick when there is one
            if gen.step != picked:
                logits.append(gen.out.logits[0, -1].clone())
    assert not failures, failures
    return gen, logits
