"""Base model for wire types: strict, frozen, no unknown fields."""

from typing import TypeVar

import orjson
from pydantic import BaseModel, ConfigDict


class Strict(BaseModel):
    """Every type that crosses a process boundary derives from this (frozen, strict, extra=forbid)."""

    model_config = ConfigDict(frozen=True, strict=True, extra="forbid")


M = TypeVar("M", bound=Strict)


def from_wire(model: type[M], obj: object) -> M:
    """Validate a decoded JSON value in JSON mode (strict JSON mode accepts arrays for tuples)."""
    return model.model_validate_json(orjson.dumps(obj))
