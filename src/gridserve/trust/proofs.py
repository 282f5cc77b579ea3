"""Activation proofs: TOPLOC (Prime Intellect's `toploc`) over the last hidden state behind every generated token.

The node keeps, for each token it picks, the final-layer hidden state at the position whose logits picked it
(bfloat16), and proves chunks of `chunk` tokens: the top-k entries by magnitude, encoded as a polynomial
(`toploc.build_proofs_base64`). A verifier recomputes the same hidden states with one prefill over prompt +
output and checks each chunk (`toploc.verify_proofs_base64`): exponents must match and mantissa errors stay
small, which honest floating-point differences (thread count, prefill vs incremental decode) do, and a
different model, prompt or precision does not. Thresholds are per model, calibrated on honest and dishonest
runs (tests/unit/test_proofs.py); the proof alone is not trusted: the output commitment and the greedy token
check cover what it misses.

`toploc` must be built against the pinned torch (`make` does it); without it, proofs are empty and audits
check tokens only.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

try:
    from toploc import build_proofs_base64, verify_proofs_base64

    AVAILABLE = True
except ImportError:  # pragma: no cover - exercised only where toploc is not built
    AVAILABLE = False


@dataclass(frozen=True)
class ProofParams:
    topk: int
    chunk: int
    max_exp_mismatches: int
    """Per chunk: top-k entries whose exponent differs."""
    max_mant_err_mean: float
    max_mant_err_median: float


DEFAULT = ProofParams(topk=128, chunk=32, max_exp_mismatches=12, max_mant_err_mean=10.0, max_mant_err_median=8.0)
PARAMS: dict[str, ProofParams] = {
    # calibrated (tests/unit/test_proofs.py): honest re-execution at other thread counts gives 0 / 0.0 here, the same
    # model in bfloat16 >= 0.35 mean mantissa error in its worst chunk, another prompt token >= 1.3
    "gridserve-tiny": ProofParams(
        topk=32, chunk=32, max_exp_mismatches=1, max_mant_err_mean=0.2, max_mant_err_median=0.2
    ),
    # calibrated likewise on this CPU: honest <= 0.008 mean error, 0 exponent mismatches; 2% off one layer's
    # weights >= 0.87, bfloat16 >= 1.37, a skipped layer / another prompt token / another output token >= 5
    "gemma-3-270m": ProofParams(
        topk=128, chunk=32, max_exp_mismatches=1, max_mant_err_mean=0.25, max_mant_err_median=0.25
    ),
}


def params_for(model: str) -> ProofParams:
    return PARAMS.get(model, DEFAULT)


def build(activations: Sequence[torch.Tensor], model: str) -> str:
    """The proof for the hidden states behind each generated token (one 1-D tensor per token)."""
    if not AVAILABLE or not activations:
        return ""
    p = params_for(model)
    acts = [a.detach().to(torch.bfloat16).reshape(-1) for a in activations]
    return ",".join(build_proofs_base64(acts, decode_batching_size=p.chunk, topk=p.topk, skip_prefill=True))


@dataclass(frozen=True)
class ProofVerdict:
    ok: bool
    chunks: int
    worst: dict[str, Any]
    """The worst chunk's figures (exponent mismatches, mantissa error mean and median) and its index."""

    def evidence(self) -> str:
        w = self.worst
        return (
            f"chunk {w.get('chunk')}: {w.get('exp_mismatches')} exponent mismatches, mantissa error "
            f"mean {w.get('mant_err_mean')} / median {w.get('mant_err_median')} (of {self.chunks} chunks)"
        )


def verify(activations: Sequence[torch.Tensor], proof: str, model: str) -> ProofVerdict:
    p = params_for(model)
    proofs = [x for x in proof.split(",") if x]
    acts = [a.detach().to(torch.bfloat16).reshape(-1) for a in activations]
    expected = (len(acts) + p.chunk - 1) // p.chunk
    if len(proofs) != expected:
        return ProofVerdict(False, len(proofs), {"chunk": None, "reason": f"{len(proofs)} chunks, expected {expected}"})
    results = verify_proofs_base64(acts, proofs, decode_batching_size=p.chunk, topk=p.topk, skip_prefill=True)
    rows = [
        (
            r.exp_mismatches > p.max_exp_mismatches
            or r.mant_err_mean > p.max_mant_err_mean
            or r.mant_err_median > p.max_mant_err_median,
            r.exp_mismatches,
            float(r.mant_err_mean),
            float(r.mant_err_median),
            i,
        )
        for i, r in enumerate(results)
    ]
    bad, exps, mean, median, index = max(rows)
    worst = {
        "chunk": index,
        "exp_mismatches": exps,
        "mant_err_mean": round(mean, 3),
        "mant_err_median": round(median, 3),
    }
    return ProofVerdict(not bad, len(results), worst)


__all__ = ["AVAILABLE", "ProofParams", "ProofVerdict", "build", "params_for", "verify"]
