"""Embedding: what an engine that embeds offers the node (torch-free: a light node in front of an upstream server
imports this too).

An engine embeds a model when its offer of the model lists the `embed` task (ModelOffer.tasks) and it has an
`embed` method (`Embedder`). gridserve's own engines embed as the mean of the last hidden state over the input's
tokens, L2-normalised (engines/pooling.py); an upstream server embeds its own way (llama.cpp: `--embedding`)."""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from gridserve.engines.base import EngineError, InvalidRequest
from gridserve.types.embedding import Floats
from gridserve.types.node import EMBED, GENERATE, ModelOffer, Task

TASK_NAMES: tuple[Task, ...] = (GENERATE, EMBED)
NORM_FLOOR = 1e-12
"""L2 normalisation divides by at least this (a zero vector stays zero)."""


@dataclass(frozen=True)
class Embeddings:
    """One vector per input, in order (rows of `vectors`, float32), and the tokens the inputs took."""

    vectors: Floats
    prompt_tokens: int

    def __post_init__(self) -> None:
        if self.vectors.ndim != 2 or self.vectors.dtype != np.float32:
            raise EngineError(f"embeddings must be a 2-d float32 array, not {self.vectors.dtype} {self.vectors.shape}")


@runtime_checkable
class Embedder(Protocol):
    async def embed(self, model: str, inputs: Sequence[str]) -> Embeddings:
        """The inputs' vectors; InvalidRequest for an input the model cannot take (longer than its context),
        EngineError when the engine fails."""
        ...


def embedder_for(engine: object, offers: Sequence[ModelOffer], model: str) -> Embedder | None:
    """The engine as the embedder of `model`, if one of its offers serves the model for embedding."""
    if not isinstance(engine, Embedder):
        return None
    return engine if any(o.name == model and o.serves(EMBED) for o in offers) else None


def parse_tasks(names: Sequence[str]) -> tuple[Task, ...]:
    """`--tasks` as tasks (each once, in the order given); InvalidRequest naming an unknown one."""
    tasks: list[Task] = []
    for name in names:
        task = next((t for t in TASK_NAMES if t == name.strip()), None)
        if task is None:
            raise InvalidRequest(f"unknown task {name.strip()!r}; tasks: {', '.join(TASK_NAMES)}")
        if task not in tasks:
            tasks.append(task)
    if not tasks:
        raise InvalidRequest(f"name at least one task ({', '.join(TASK_NAMES)})")
    return tuple(tasks)


__all__ = ["NORM_FLOOR", "TASK_NAMES", "Embedder", "Embeddings", "embedder_for", "parse_tasks"]
