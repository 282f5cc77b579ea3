"""Token selection. Greedy when temperature is 0; otherwise temperature + top-k + top-p sampling by inverse CDF,
over the scores `TokenRule` makes of a position's logits (the sampling extensions: repetition penalty, min_tokens).

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
from collections.abc import Iterable, Sequence
from typing import Protocol

import torch

from gridserve.engines.grammar import Constraint, GrammarCodec, GrammarError
from gridserve.types import SamplingParams
from gridserve.types.wire import TokenLogprob, TopLogprob

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


def nucleus_weights(logits: torch.Tensor, temperature: float, top_p: float, top_k: int = 0) -> torch.Tensor:
    """float64 probabilities over the vocabulary (in index order) with the tokens outside the nucleus zeroed:
    first all but the `top_k` likeliest (0: none; ties with the k-th are kept), then, of the rest renormalised,
    each token but those whose likelier tokens' mass is at most `top_p` (vLLM's order)."""
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    if 0 < top_k < probs.shape[0]:
        kth = torch.topk(probs, top_k).values[-1]
        probs = probs.masked_fill(probs < kth, 0.0)
        probs = probs / probs.sum()
    if top_p >= 1.0:
        return probs
    sorted_probs, order = torch.sort(probs, descending=True)
    drop = torch.cumsum(sorted_probs, dim=-1) - sorted_probs > top_p
    return probs.scatter(0, order, sorted_probs.masked_fill(drop, 0.0))


class TokenRule:
    """The scores a position's token is picked from, and whether a picked token ends the answer: one rule for the
    node's engine, the gateway's pipeline sampler and the verifier, so an audit re-executes what an honest node did.

    The scores are the logits plus the model's mask, with vLLM's repetition penalty over every token of the prompt
    and of the answer so far (`note` each token as it is picked), the end-of-sequence tokens at -inf before
    `min_tokens`, and every token the response format's grammar does not allow next at -inf (`codec`: the model's
    tokenizer, needed only then). An end-of-sequence token ends the answer unless `ignore_eos`."""

    def __init__(
        self,
        params: SamplingParams,
        eos_ids: Iterable[int],
        mask: torch.Tensor | None = None,
        history: Sequence[int] = (),
        codec: "GrammarCodec | None" = None,
        answered: Sequence[int] = (),
    ) -> None:
        """`history`: the prompt and any answer already given (repetition penalty); `answered`: the answer already
        given (failover: the response format's grammar is past it)."""
        self.params = params
        self.constraint: Constraint | None = None
        if params.response_format is not None:
            if codec is None:
                raise GrammarError("this model's tokenizer cannot drive a grammar (no structured output)")
            self.constraint = Constraint(params.response_format, codec)
            for token in answered:
                self.constraint.accept(token)
        self.eos_ids = frozenset(eos_ids)
        self._eos = sorted(self.eos_ids)
        self.mask = mask
        self._penalised = params.repetition_penalty != 1.0
        self._pending: list[int] = list(history) if self._penalised else []
        self._seen: torch.Tensor | None = None
        """Which tokens the prompt and answer hold so far (made at the first position: its size is the vocabulary's)."""

    def note(self, token: int) -> bool:
        """Take `token` as the answer's next; False if the response format's grammar did not allow it."""
        allowed = self.constraint.accept(token) if self.constraint is not None else True
        if not self._penalised:
            return allowed
        if self._seen is None:
            self._pending.append(token)
        elif 0 <= token < self._seen.shape[0]:
            self._seen[token] = True
        return allowed

    def scores(self, logits: torch.Tensor, step: int) -> torch.Tensor:
        """`logits`: 1-D float32 over the vocabulary at completion position `step`."""
        out = logits if self.mask is None else logits + self.mask
        if self._penalised:
            seen = self._seen_over(out.shape[0])
            penalty = self.params.repetition_penalty
            out = torch.where(seen, torch.where(out > 0, out / penalty, out * penalty), out)
        if step < self.params.min_tokens and self._eos:
            out = out.clone() if out is logits else out
            out[[t for t in self._eos if t < out.shape[0]]] = float("-inf")
        if self.constraint is not None:
            out = self.constraint.restrict(out.clone() if out is logits else out)
        return out

    def ends(self, token: int) -> bool:
        return token in self.eos_ids and not self.params.ignore_eos

    def _seen_over(self, vocab: int) -> torch.Tensor:
        if self._seen is None:
            self._seen = torch.zeros(vocab, dtype=torch.bool)
            known = [t for t in self._pending if 0 <= t < vocab]
            if known:
                self._seen[known] = True
            self._pending = []
        return self._seen


def pick_token(logits: torch.Tensor, params: SamplingParams, seed: int, step: int) -> int:
    """`logits`: 1-D over the vocabulary (float32)."""
    if params.greedy:
        return int(torch.argmax(logits).item())
    cdf = torch.cumsum(nucleus_weights(logits, params.temperature, params.top_p, params.top_k), dim=-1)
    target = torch.tensor([draw(seed, step) * float(cdf[-1])], dtype=torch.float64)
    index = int(torch.searchsorted(cdf, target, right=True).item())  # the first token whose cdf passes the target
    return min(index, cdf.shape[0] - 1)


def draw_miss(logits: torch.Tensor, params: SamplingParams, seed: int, step: int, token: int) -> float:
    """How far, as a share of the nucleus's mass, the draw for `step` falls outside `token`'s interval (0 when it
    falls inside). The nucleus is tried at `top_p` and `SAMPLE_TOLERANCE` either side of it, and at `top_k` and one
    either side of it: a token on the nucleus's edge may be in or out on an honest node."""
    edge = (params.top_p - SAMPLE_TOLERANCE, params.top_p + SAMPLE_TOLERANCE) if params.top_p < 1.0 else ()
    ks = (params.top_k, params.top_k - 1, params.top_k + 1) if params.top_k > 1 else (params.top_k,)
    u = draw(seed, step)
    best = 1.0
    for top_k in ks:
        for top_p in (params.top_p, *edge):
            weights = nucleus_weights(logits, params.temperature, max(top_p, 1e-9), top_k)
            cdf = torch.cumsum(weights, dim=-1)
            total = float(cdf[-1])
            high = float(cdf[token]) / total
            low = float(cdf[token - 1]) / total if token > 0 else 0.0
            best = min(best, max(low - u, u - high, 0.0))
    return best


class Decodes(Protocol):
    def decode(self, ids: Sequence[int]) -> str: ...

    def token_bytes(self, token: int) -> bytes: ...


def log_probs(logits: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The model's own log-probabilities at a position: its logits and mask, before temperature, penalties and
    grammar (what SamplingParams.logprobs reports, and what a verifier recomputes)."""
    out = logits.double() if mask is None else logits.double() + mask
    return torch.log_softmax(out, dim=-1)


def token_logprob(
    logits: torch.Tensor, mask: torch.Tensor | None, token: int, top: int, codec: Decodes
) -> TokenLogprob:
    """`token`'s entry with the `top` likeliest tokens at the position, in OpenAI's shape."""
    lp = log_probs(logits, mask)
    alternatives: tuple[TopLogprob, ...] = ()
    if top:
        values, ids = torch.topk(lp, min(top, lp.shape[0]))
        alternatives = tuple(_entry(codec, int(i), float(v)) for v, i in zip(values, ids, strict=True))
    picked = _entry(codec, token, float(lp[token]))
    return TokenLogprob(token=picked.token, logprob=picked.logprob, bytes=picked.bytes, top_logprobs=alternatives)


def _entry(codec: Decodes, token: int, logprob: float) -> TopLogprob:
    return TopLogprob(token=codec.decode([token]), logprob=max(logprob, -9999.0), bytes=tuple(codec.token_bytes(token)))
