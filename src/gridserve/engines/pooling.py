"""Sentence embeddings from a causal LM: the mean of the last hidden state (after the final norm) over every token
of the input as the model's codec encodes it (the BOS token included), in float32, L2-normalised.

One input per forward pass, without padding and without a KV cache: the vector of an input does not depend on the
other inputs of its batch nor on what the engine ran before, so it is the same wherever it is computed at the same
precision and thread count (the gateway's verifier re-executes it: gateway/integrity/embeddings.py)."""

from typing import Any

import numpy as np
import torch

from gridserve.engines.embedding import NORM_FLOOR
from gridserve.types.embedding import Floats


def mean_pooled(model: Any, ids: list[int]) -> Floats:
    """The input's embedding (on the engine's, or the verifier's, thread)."""
    with torch.inference_mode():
        hidden = model.get_decoder()(input_ids=torch.tensor([ids]), use_cache=False).last_hidden_state[0].float()
        pooled = hidden.mean(dim=0)
        pooled = pooled / pooled.norm().clamp_min(NORM_FLOOR)
        return np.ascontiguousarray(pooled.numpy(), dtype=np.float32)


__all__ = ["mean_pooled"]
