"""A decision's evidence: the columns it was made from, turned into candidates, verdicts and an explanation only
when someone reads them (`types.scheduling.Decision` caches what it reads). Most decisions on a large grid are
never explained; those that are read the same numbers the decision used."""

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from gridserve.scheduler.context import Context
from gridserve.scheduler.profile import Profile
from gridserve.scheduler.ranking import Order
from gridserve.scheduler.snapshot import C_CAL_TTFT, M_LOAD_S, M_RESIDENT
from gridserve.scheduler.vector import Array, Columns
from gridserve.types.scheduling import Candidate, ScoreDetail, Verdict

DEFAULT_PREFILL_CHUNK = 128
"""Prompt tokens an interleaved engine prefills in one step when it does not say (gridserve's engines: its prefix
cache block, advertised as `Capability.prefix_block_tokens`)."""


def requirements(ctx: Context) -> dict[str, Any]:
    """What the request needs, as the scheduler reads it (recorded in the decision)."""
    req = ctx.request
    needs: dict[str, Any] = {
        "model": req.model,
        "prompt_tokens_estimate": req.prompt_tokens,
        "max_tokens": req.max_tokens,
        "tier": ctx.tier.name,
        "tier_min_bandwidth_gbs": ctx.tier.min_bandwidth_gbs,
        "tier_min_fp16_tflops": ctx.tier.min_fp16_tflops,
        "min_tokens_per_s": ctx.tier.min_tokens_per_s,
        "ttft_slo_s": ctx.ttft_slo_s,
        "tpot_slo_s": ctx.tpot_slo_s,
        "max_price_per_mtok": req.max_price_per_mtok,
        "engines": list(req.engines) if req.engines else None,
    }
    if req.task != "generate":  # (a generation's requirements stay as they were)
        needs["task"] = req.task
    if ctx.model is not None:
        needs["model_params"] = ctx.model.params
        needs["kv_bytes_per_token_fp16"] = ctx.model.kv_bytes_per_token()  # every layer, as if none slid
        needs["kv_bytes_fp16"] = ctx.model.kv_bytes(req.prompt_tokens + req.max_tokens)  # the sequence's, windowed
    return needs


def why(winner: Candidate, runner_up: Candidate | None, picked_by: str) -> str:
    """The winner's strongest scores, how it was picked, and what put it ahead of the runner-up."""
    top = sorted(winner.details, key=lambda d: -d.contribution)[:2]
    parts = ", ".join(f"{d.scorer} {d.normalized:.2f}" for d in top)
    text = f"{winner.node_id[:12]} scored {winner.score:.3f} ({parts}) — {picked_by}"
    if runner_up is not None:
        gaps = sorted(
            (
                (d.contribution - r.contribution, d.scorer)
                for d, r in zip(winner.details, runner_up.details, strict=True)
            ),
            reverse=True,
        )
        text += (
            f"; ahead of {runner_up.node_id[:12]} ({runner_up.score:.3f}) by {winner.score - runner_up.score:.3f},"
            f" mostly on {gaps[0][1]}"
        )
    return text


def nothing_eligible(verdicts: Sequence[Verdict]) -> str:
    """Why no node could take the request: how many each filter removed, and one example."""
    rejected = [v for v in verdicts if not v.eligible]
    by_filter: dict[str, int] = {}
    for v in rejected:
        by_filter[v.filter] = by_filter.get(v.filter, 0) + 1
    counts = ", ".join(f"{n} by {f}" for f, n in sorted(by_filter.items(), key=lambda kv: -kv[1]))
    example = f"; e.g. {rejected[0].node_id[:12]}: {rejected[0].reason}" if rejected else ""
    return f"no eligible node: {len(rejected)} rejected ({counts or 'no nodes registered'}){example}"


def _rounded(value: float, digits: int) -> float | None:
    return None if np.isnan(value) else round(float(value), digits)


@dataclass(frozen=True)
class ColumnEvidence:
    """What the column path computed for one decision (copies: a later change to a table does not reach it)."""

    ctx: Context
    profile: Profile
    cols: Columns
    order: Order
    total: Array
    norms: list[Array]
    raws: list[Array]
    rejected_by: "npt.NDArray[np.int64]"
    """Per node: index of the first filter that rejected it, -1 if none did."""
    picked: int
    """Rank of the chosen node (-1: none)."""
    picked_by: str
    built: dict[int, Candidate] = field(default_factory=dict, compare=False, repr=False)
    """Candidates made so far, by rank: the chosen one is asked for by dispatch, the explanation, the lifecycle and
    the decision log."""

    def candidate(self, rank: int) -> Candidate:
        made = self.built.get(rank)
        if made is None:
            made = self.built[rank] = self._candidate(rank)
        return made

    def _candidate(self, rank: int) -> Candidate:
        j = self.order[rank]
        node, ctx = self.cols.nodes[j], self.ctx
        ttft, itl = self.cols.prediction(ctx, loaded=True)
        price = self.cols.price(ctx)
        details = tuple(
            ScoreDetail(sc.name, round(float(raw[j]), 6), sc.unit_for(node, float(raw[j])), float(norm[j]), w)
            for (sc, w), norm, raw in zip(self.profile.scorers, self.norms, self.raws, strict=True)
        )
        cal = node.calibration
        reused = int(self.cols.reused(ctx)[j])
        per_token = self._prefill_per_token(j)
        return Candidate(
            node.node_id,
            rank,
            float(self.total[j]),
            details,
            _rounded(ttft[j], 9),
            _rounded(itl[j], 9),
            _rounded(price[j], 6),
            (cal.ttft_factor, cal.itl_factor) if cal else (1.0, 1.0),
            reused,
            _rounded(per_token * reused * float(self.cols.col(C_CAL_TTFT)[j]), 6) if reused else None,
            _rounded(per_token, 12),
            _rounded(self.cols.queue(ctx)[j], 9),
            float(self.cols.mcol(M_LOAD_S)[j]) if self.cols.predictable(ctx)[j] else 0.0,
            self._step_s(j, per_token, float(itl[j])),
            not self.cols.mcol(M_RESIDENT)[j] > 0,
        )

    def _step_s(self, j: int, per_token: float, itl: float) -> float | None:
        """An interleaved node's longest wait between a stream's tokens: a prefill chunk of another prompt, at this
        node's calibrated prefill rate, and a decode step (None: a batched node, or no prediction)."""
        node = self.cols.nodes[j]
        if not node.static.interleaved or np.isnan(per_token) or np.isnan(itl):
            return None
        chunk = node.capability.prefix_block_tokens or DEFAULT_PREFILL_CHUNK
        return round(chunk * per_token * float(self.cols.col(C_CAL_TTFT)[j]) + itl, 9)

    def _prefill_per_token(self, j: int) -> float:
        """Uncalibrated prefill seconds a prompt token on node `j` (prefill is linear in the tokens computed)."""
        ctx = self.ctx
        if ctx.model is None or not self.cols.predictable(ctx)[j]:
            return float("nan")
        _, prefill = self.cols.unloaded(ctx)
        return float(prefill[j]) / max(1, ctx.request.prompt_tokens - int(self.cols.reused(ctx)[j]))

    def candidates(self) -> tuple[Candidate, ...]:
        return tuple(self.ranked())

    def ranked(self) -> Iterator[Candidate]:
        return (self.candidate(r) for r in range(len(self.order)))

    def chosen_candidate(self) -> Candidate | None:
        return self.candidate(self.picked) if self.picked >= 0 else None

    def verdicts(self) -> tuple[Verdict, ...]:
        out = []
        filters, rejected_by = self.profile.filters, self.rejected_by.tolist()
        for j, node in enumerate(self.cols.nodes):
            k = rejected_by[j]
            if k < 0:
                out.append(Verdict(node.node_id, True))
            else:
                out.append(Verdict(node.node_id, False, filters[k].name, filters[k].reason(self.ctx, self.cols, j)))
        return tuple(out)

    def rejected_by_filter(self) -> dict[str, int]:
        counts = np.bincount(self.rejected_by[self.rejected_by >= 0])
        return {self.profile.filters[k].name: int(c) for k, c in enumerate(counts) if c}

    def explanation(self) -> str:
        if self.picked < 0:
            return nothing_eligible(self.verdicts())
        chosen = self.candidate(self.picked)
        top = [self.candidate(r) for r in range(min(len(self.order), 2))]
        runner = next((c for c in top if c.node_id != chosen.node_id), None)
        rejected = int((self.rejected_by >= 0).sum())
        text = why(chosen, runner, self.picked_by) + f"; {len(self.order)} eligible, {rejected} rejected"
        return text + self._reuse(chosen)

    def _reuse(self, chosen: Candidate) -> str:
        if not chosen.cached_tokens:
            return ""
        text = f"; reuses {chosen.cached_tokens:,} of {self.ctx.request.prompt_tokens:,} prompt tokens"
        if chosen.prefill_saved_s is not None:
            hw = self.cols.nodes[self.order[self.picked]].static.hw
            text += f" (saves ~{chosen.prefill_saved_s:.2g} s of prefill on {hw.name if hw else 'its hardware'})"
        return text
