"""Token selection. Greedy when temperature is 0; otherwise temperature + top-p sampling.

Seeded sampling draws the token at completion position `step` from a generator seeded with
`mix(seed, step)`, not from one generator advanced step by step. So the draw at a position depends only
on (seed, step, logits): a generation resumed at position k on another node (failover) makes the
same draws as an uninterrupted run.
"""

import hashlib
import secrets

import torch

from gridserve.types import SamplingParams

GREEDY_BELOW = 1e-6
"""Temperatures under this pick the argmax, the limit of sampling as the temperature goes to 0 (dividing the
logits by a temperature near 0 overflows float32, and the probabilities become NaN)."""


def mix(seed: int, step: int) -> int:
    digest = hashlib.sha256(f"{seed}:{step}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def fresh_seed() -> int:
    return secrets.randbits(63)


def pick_token(logits: torch.Tensor, params: SamplingParams, seed: int, step: int) -> int:
    """`logits`: 1-D over the vocabulary (float32)."""
    if params.temperature < GREEDY_BELOW:
        return int(torch.argmax(logits).item())
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        cumulative = torch.cumsum(sorted_probs, dim=-1)
        drop = cumulative - sorted_probs > params.top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
    generator = torch.Generator().manual_seed(mix(seed, step))
    return int(torch.multinomial(probs, 1, generator=generator).item())
