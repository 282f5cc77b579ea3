"""Plugin protocols and the registry: filters, scorers and pickers are small named objects, found by type."""

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from gridserve.scheduler.context import Context
from gridserve.scheduler.snapshot import NodeSnapshot


class Filter(Protocol):
    name: str

    def reject(self, ctx: Context, node: NodeSnapshot) -> str | None:
        """Why the node cannot run the request (with numbers), or None when it can."""
        ...


@dataclass(frozen=True, slots=True)
class Score:
    normalized: float
    """In [0, 1]; higher is better."""
    raw: float
    unit: str


class Scorer(Protocol):
    name: str

    def score(self, ctx: Context, node: NodeSnapshot) -> Score: ...


@dataclass(frozen=True, slots=True)
class Scored:
    node: NodeSnapshot
    total: float
    scores: tuple[Score, ...]


class Picker(Protocol):
    name: str

    def pick(self, ctx: Context, ranked: Sequence[Scored], rng: random.Random) -> tuple[int, str]:
        """Index into `ranked` (best first) of the node to use, and a note on how it was picked."""
        ...


class UnknownPlugin(ValueError):
    pass


T = TypeVar("T")
FILTERS: dict[str, Callable[..., Filter]] = {}
SCORERS: dict[str, Callable[..., Scorer]] = {}
PICKERS: dict[str, Callable[..., Picker]] = {}


def register(registry: dict[str, Callable[..., Any]], type_name: str) -> Callable[[T], T]:
    def wrap(factory: T) -> T:
        registry[type_name] = factory  # type: ignore[assignment]
        return factory

    return wrap


def build(registry: dict[str, Callable[..., T]], kind: str, type_name: str, args: dict[str, Any]) -> T:
    factory = registry.get(type_name)
    if factory is None:
        raise UnknownPlugin(f"unknown {kind} {type_name!r}; known: {', '.join(sorted(registry))}")
    try:
        return factory(**args)
    except TypeError as exc:
        raise UnknownPlugin(f"bad arguments for {kind} {type_name!r}: {exc}") from exc
