"""Commitments both sides compute the same way: a node signs them in its receipt, the gateway recomputes them
from what it sent and what it received."""

import hashlib
from collections.abc import Sequence
from typing import Any

from gridserve.trust.envelope import canonical


def input_commitment(request: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of the generate request (without the routing-only `node_id`)."""
    body = {k: v for k, v in request.items() if k != "node_id"}
    return hashlib.sha256(canonical(body)).hexdigest()


def token_commitment(ids: Sequence[int]) -> str:
    """sha256 of token ids as little-endian int32."""
    return hashlib.sha256(b"".join(int(i).to_bytes(4, "little", signed=True) for i in ids)).hexdigest()


__all__ = ["input_commitment", "token_commitment"]
