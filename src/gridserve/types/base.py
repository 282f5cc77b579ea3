"""Base model for wire types: strict, frozen, no unknown fields; and how a peer of another version is read."""

import copy
from typing import Any, TypeVar

import orjson
from pydantic import BaseModel, ConfigDict, ValidationError


class Strict(BaseModel):
    """Every type that crosses a process boundary derives from this (frozen, strict, extra=forbid)."""

    model_config = ConfigDict(frozen=True, strict=True, extra="forbid")


M = TypeVar("M", bound=Strict)

NAMED_UNKNOWN = 16
"""At most this many fields left out are named (`lenient`); the rest are counted."""
NAMED_CHARS = 64
"""A name longer than this is cut (`lenient`'s paths go to logs and back to the node)."""


def from_wire(model: type[M], obj: object) -> M:
    """Validate a decoded JSON value in JSON mode (strict JSON mode accepts arrays for tuples)."""
    return model.model_validate_json(orjson.dumps(obj))


def lenient(model: type[M], obj: object) -> tuple[M, tuple[str, ...]]:
    """`from_wire` of what a peer of a newer version describes: the fields this version does not know are left out
    (their paths returned, e.g. `capability.models[0].speculative`), so a node upgraded before its gateway still
    registers, beats and is paid, and what this version reads is checked exactly as before. Any other problem
    raises ValidationError (about what is left). For documents a peer describes itself with (capability,
    telemetry, receipts), never for requests that ask for work: there an unknown field could change what is asked,
    and is refused."""
    try:
        return from_wire(model, obj), ()
    except ValidationError as exc:
        unknown = [tuple(e["loc"]) for e in exc.errors() if e["type"] == "extra_forbidden"]
        if not unknown:
            raise
        pruned = _without(obj, unknown)
        if pruned is None:
            raise
    made = from_wire(model, pruned)
    named = [_path(loc) for loc in unknown[:NAMED_UNKNOWN]]
    more = [f"... {len(unknown) - NAMED_UNKNOWN} more"] if len(unknown) > NAMED_UNKNOWN else []
    return made, tuple(named + more)


def _without(obj: object, paths: list[tuple[int | str, ...]]) -> object | None:
    """A copy of `obj` without the values at `paths` (None when one does not lead into it)."""
    out = copy.deepcopy(obj)
    for path in paths:
        node: Any = out
        try:
            for step in path[:-1]:
                node = node[step]
            del node[path[-1]]
        except (KeyError, IndexError, TypeError):
            return None
    return out


def _path(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        step = str(part) if len(str(part)) <= NAMED_CHARS else str(part)[:NAMED_CHARS] + "…"
        out += f"[{part}]" if isinstance(part, int) else (f".{step}" if out else step)
    return out


def wire_payload(model: Strict) -> dict[str, Any]:
    """A request as it goes to a node: its JSON without the fields at their defaults, so a node of an older version
    reads every request that uses nothing newer than it (a request that does goes only to nodes offering it), and
    the input commitment is over what was sent."""
    return model.model_dump(mode="json", exclude_defaults=True)
