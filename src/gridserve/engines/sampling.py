"""Token selection. Greedy when temperature is 0; otherwise temperature + top-p sampling by inverse CDF.

Seeded sampling draws the token at completion position `step` with a uniform number `u = draw(seed, step)`
(a hash of the two, not a generator advanced step by step): the token is the one whose interval of the
cumulative distribution, over the vocabulary in index order, holds `u` times the nucleus's mass. So the draw at a
position depends only on (seed, step, logits): a generation resumed at position k on another node (failover)
makes the same draws as an uninterrupted run, and a verifier that knows the seed can check every sampled token
(`draw_miss`): honest float differences move the interval's ends by far less than `SAMPLE_TOLERANCE`, a token
picked otherwise misses by the mass of the tokens in between.
"""

import hashlib
import secrets

import torch

from gridserve.types import SamplingParams

SAMPLE_TOLERANCE = 1e-3
"""How far (a share of the nucleus's mass) the draw may fall outside a sampled token's interval as the verifier
computes it before the token counts as not drawn: honest differences between a node's batched, cached decode and
the verifier's single prefill move the interval's ends by ~1e-6 (bench/verification.py measures the largest)."""


def mix(seed: int, step: int) -> int:
    digest = hashlib.sha256(f"{seed}:{step}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def draw(seed: int, step: int) -> float:
    """The uniform number in [0, 1) for completion position `step` (53 bits of `mix`)."""
    return (mix(seed, step) >> 10) / float(1 << 53)


def fresh_seed() -> int:
    return secrets.randbits(63)


def nucleus_weights(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """float64 probabilities over the vocabulary (in index order) with the tokens outside the top-p nucleus
    zeroed: a token is kept when the mass of the tokens sorted before it is at most `top_p`."""
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    if top_p >= 1.0:
        return probs
    sorted_probs, order = torch.sort(probs, descending=True)
    drop = torch.cumsum(sorted_probs, dim=-1) - sorted_probs > top_p
    return probs.scatter(0, order, sorted_probs.masked_fill(drop, 0.0))


def pick_token(logits: torch.Tensor, params: SamplingParams, seed: int, step: int) -> int:
    """`logits`: 1-D over the vocabulary (float32)."""
    if params.greedy:
        return int(torch.argmax(logits).item())
    cdf = torch.cumsum(nucleus_weights(logits, params.temperature, params.top_p), dim=-1)
    target = torch.tensor([draw(seed, step) * float(cdf[-1])], dtype=torch.float64)
    index = int(torch.searchsorted(cdf, target, right=True).item())  # the first token whose cdf passes the target
    return min(index, cdf.shape[0] - 1)


def draw_miss(logits: torch.Tensor, params: SamplingParams, seed: int, step: int, token: int) -> float:
    """How far, as a share of the nucleus's mass, the draw for `step` falls outside `token`'s interval (0 when it
    falls inside). The nucleus is tried at `top_p` and `SAMPLE_TOLERANCE` either side of it: a token on the
    nucleus's edge may be in or out on an honest node."""
    edge = (params.top_p - SAMPLE_TOLERANCE, params.top_p + SAMPLE_TOLERANCE) if params.top_p < 1.0 else ()
    cutoffs = (params.top_p, *edge)
    u = draw(seed, step)
    best = 1.0
    for top_p in cutoffs:
        cdf = torch.cumsum(nucleus_weights(logits, params.temperature, max(top_p, 1e-9)), dim=-1)
        total = float(cdf[-1])
        high = float(cdf[token]) / total
        low = float(cdf[token - 1]) / total if token > 0 else 0.0
        best = min(best, max(low - u, u - high, 0.0))
    return best
