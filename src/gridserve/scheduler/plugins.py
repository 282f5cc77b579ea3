"""Plugin protocols and the registry: filters, scorers and pickers are small named objects, found by type.

A filter or a scorer is written once, over the decision's columns (`vector.Columns`: one row per node): a
filter's `mask` says which nodes it rejects and its `reason` says why for one of them, from the same columns; a
scorer's `score` gives every node's normalised score and the raw figure behind it. A single node is the one-row
case (`OneRow.reject`). Adding a filter is one class in one file, registered with `@register(FILTERS, name)`.
"""

import dataclasses
import random
import typing
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from gridserve.scheduler.context import Context
from gridserve.scheduler.ranking import Ranked
from gridserve.scheduler.snapshot import NodeSnapshot
from gridserve.scheduler.vector import Array, Columns, Mask


class Filter(Protocol):
    name: str

    def mask(self, ctx: Context, cols: Columns) -> Mask:
        """True for every node the filter rejects: it cannot run the request at all."""
        ...

    def reason(self, ctx: Context, cols: Columns, j: int) -> str:
        """Why node `j` (a row the mask rejects) cannot run the request, with the numbers the mask used."""
        ...

    def reject(self, ctx: Context, node: NodeSnapshot) -> str | None:
        """One node: why it cannot run the request, or None when it can."""
        ...


class OneRow:
    """The single-node check every filter gets: the filter over a pool of one row."""

    def reject(self: Filter, ctx: Context, node: NodeSnapshot) -> str | None:
        cols = Columns.of(ctx, [node])
        return self.reason(ctx, cols, 0) if bool(self.mask(ctx, cols)[0]) else None


class Scorer(Protocol):
    name: str

    def score(self, ctx: Context, cols: Columns) -> tuple[Array, Array]:
        """(normalised score in [0, 1], higher is better; the raw figure it came from) per node."""
        ...

    def unit_for(self, node: NodeSnapshot, raw: float) -> str:
        """What a raw figure means, for the decision's explanation."""
        ...


class Picker(Protocol):
    name: str

    def pick(self, ctx: Context, ranked: Ranked, rng: random.Random) -> tuple[int, str]:
        """Rank (index into `ranked`, best first) of the node to use, and a note on how it was picked."""
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
