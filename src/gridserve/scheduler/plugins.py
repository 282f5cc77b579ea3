"""Plugin protocols and the registry: filters, scorers and pickers are small named objects, found by type."""

import dataclasses
import random
import typing
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
_ACCEPTS: dict[Any, tuple[type, ...]] = {float: (int, float), int: (int,), str: (str,), bool: (bool,)}


def _check_args(kind: str, type_name: str, factory: Any, args: dict[str, Any]) -> None:
    """Profile arguments must have the types the plugin declares (a YAML typo fails at load, not per request)."""
    if not dataclasses.is_dataclass(factory):
        return
    hints = typing.get_type_hints(factory)
    for key, value in args.items():
        accepted = _ACCEPTS.get(hints.get(key))
        if key not in hints or key == "name":
            raise UnknownPlugin(f"bad arguments for {kind} {type_name!r}: it takes no argument {key!r}")
        if accepted and ((isinstance(value, bool) and bool not in accepted) or not isinstance(value, accepted)):
            raise UnknownPlugin(
                f"bad arguments for {kind} {type_name!r}: {key} must be {hints[key].__name__}, got {value!r}"
            )


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
    _check_args(kind, type_name, factory, args)
    try:
        return factory(**args)
    except TypeError as exc:
        raise UnknownPlugin(f"bad arguments for {kind} {type_name!r}: {exc}") from exc
