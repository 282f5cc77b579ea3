"""What the gateway asks a node to embed (`POST /internal/embed`, gateway-signed like a generation) and what the
node answers (signed by the node: evidence of what it said).

Vectors travel as base64 of little-endian float32, one string per input: a quarter of the bytes of JSON numbers,
decoded by the gateway without parsing a float at a time, and exactly the floats the node computed."""

import base64
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
from pydantic import Field

from gridserve.types.base import Strict
from gridserve.types.node import MAX_NAME

MAX_EMBED_INPUTS = 256
"""Most inputs one embeddings request may carry (OpenAI allows 2048; a grid node embeds them one after another)."""
MAX_EMBED_DIMENSIONS = 16_384
"""Largest vector a node may send (the widest catalogue model has 8192)."""
EMBED_PURPOSE = "embed"
"""Purpose of the gateway's signed request."""
EMBED_REPLY_PURPOSE = "embed-reply"
"""Purpose of the node's signed answer."""
MAX_EMBED_REPLY_BYTES = MAX_EMBED_INPUTS * MAX_EMBED_DIMENSIONS * 6 + 1_000_000
"""Largest answer the gateway reads (base64 of the largest vectors, and the envelope)."""

Floats = npt.NDArray[np.float32]


class EmbedRequest(Strict):
    request_id: str = Field(max_length=MAX_NAME)
    model: str = Field(max_length=MAX_NAME)
    inputs: tuple[str, ...] = Field(min_length=1, max_length=MAX_EMBED_INPUTS)


class EmbedReply(Strict):
    """One vector per input, in the inputs' order."""

    request_id: str = Field(max_length=MAX_NAME)
    model: str = Field(max_length=MAX_NAME)
    dimensions: int = Field(ge=1, le=MAX_EMBED_DIMENSIONS)
    vectors: tuple[str, ...] = Field(max_length=MAX_EMBED_INPUTS)
    prompt_tokens: int = Field(ge=0)


def encode_vector(vector: Floats) -> str:
    """A vector as base64 of little-endian float32 (OpenAI's `encoding_format: base64` is the same)."""
    return base64.b64encode(np.ascontiguousarray(vector, dtype="<f4").tobytes()).decode("ascii")


class BadVector(ValueError):
    pass


def decode_vectors(encoded: Sequence[str], dimensions: int) -> Floats:
    """The vectors as one (n, dimensions) float32 array; BadVector for a string that is not base64 of exactly
    `dimensions` float32 values."""
    out = np.empty((len(encoded), dimensions), dtype=np.float32)
    for i, text in enumerate(encoded):
        try:
            raw = base64.b64decode(text, validate=True)
        except ValueError as exc:
            raise BadVector(f"vector {i} is not base64") from exc
        if len(raw) != 4 * dimensions:
            raise BadVector(f"vector {i} has {len(raw) // 4} values, not {dimensions}")
        out[i] = np.frombuffer(raw, dtype="<f4")
    return out


__all__ = [
    "EMBED_PURPOSE",
    "EMBED_REPLY_PURPOSE",
    "MAX_EMBED_DIMENSIONS",
    "MAX_EMBED_INPUTS",
    "MAX_EMBED_REPLY_BYTES",
    "BadVector",
    "EmbedReply",
    "EmbedRequest",
    "decode_vectors",
    "encode_vector",
]
