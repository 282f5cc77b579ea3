"""`schedule(request, snapshots, profile, rng, now) -> Decision`: a pure function.

Capability first: every filter must pass (the first one that fails names the reason). Then each eligible
node is scored by every scorer (normalised to [0, 1], weighted, summed), ranked best first (ties broken by
the injected rng), and the picker chooses. The decision records all of it.
"""

import random
import secrets
from collections.abc import Sequence
from typing import Any

from gridserve.scheduler.context import Context
from gridserve.scheduler.plugins import Score, Scored
from gridserve.scheduler.profile import Profile
from gridserve.scheduler.snapshot import NodeSnapshot
from gridserve.types.scheduling import Candidate, Decision, ScheduleRequest, ScoreDetail, Verdict


def _filter(ctx: Context, profile: Profile, nodes: Sequence[NodeSnapshot]) -> tuple[list[NodeSnapshot], list[Verdict]]:
    eligible: list[NodeSnapshot] = []
    verdicts: list[Verdict] = []
    filters = profile.filters
    for node in nodes:
        for filt in filters:
            reason = filt.reject(ctx, node)
            if reason is not None:
                verdicts.append(Verdict(node.node_id, False, filt.name, reason))
                break
        else:
            eligible.append(node)
            verdicts.append(Verdict(node.node_id, True))
    return eligible, verdicts


def _score(ctx: Context, profile: Profile, nodes: Sequence[NodeSnapshot], rng: random.Random) -> list[Scored]:
    scored = []
    for node in nodes:
        scores = tuple(scorer.score(ctx, node) for scorer, _ in profile.scorers)
        total = sum(s.normalized * w for s, (_, w) in zip(scores, profile.scorers, strict=True))
        scored.append((total, rng.random(), Scored(node, total, scores)))
    scored.sort(key=lambda item: (-item[0], item[1]))
    return [item[2] for item in scored]


def _candidate(ctx: Context, profile: Profile, rank: int, scored: Scored) -> Candidate:
    details = tuple(
        ScoreDetail(scorer.name, round(s.raw, 6), s.unit, s.normalized, weight)
        for s, (scorer, weight) in zip(scored.scores, profile.scorers, strict=True)
    )
    pred = ctx.prediction(scored.node)
    price = ctx.price(scored.node)
    return Candidate(
        scored.node.node_id,
        rank,
        scored.total,
        details,
        round(pred.ttft_s, 9) if pred else None,
        round(pred.itl_s, 9) if pred else None,
        round(price, 6) if price is not None else None,
        (cal.ttft_factor, cal.itl_factor) if (cal := scored.node.calibration) else (1.0, 1.0),
    )


def requirements(ctx: Context) -> dict[str, Any]:
    req = ctx.request
    needs: dict[str, Any] = {
        "model": req.model,
        "prompt_tokens_estimate": req.prompt_tokens,
        "max_tokens": req.max_tokens,
        "tier": ctx.tier.name,
        "tier_hardware_classes": sorted(ctx.tier.hw_classes),
        "min_tokens_per_s": ctx.tier.min_tokens_per_s,
        "ttft_slo_s": ctx.ttft_slo_s,
        "tpot_slo_s": ctx.tpot_slo_s,
        "max_price_per_mtok": req.max_price_per_mtok,
        "engines": list(req.engines) if req.engines else None,
    }
    if ctx.model is not None:
        needs["model_params"] = ctx.model.params
        needs["kv_bytes_per_token_fp16"] = ctx.model.kv_bytes_per_token()
    return needs


def _why(winner: Candidate, runner_up: Candidate | None, picked_by: str) -> str:
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


def _explain(ranked: Sequence[Candidate], chosen: Candidate | None, verdicts: Sequence[Verdict], picked_by: str) -> str:
    rejected = [v for v in verdicts if not v.eligible]
    if chosen is None:
        by_filter: dict[str, int] = {}
        for v in rejected:
            by_filter[v.filter] = by_filter.get(v.filter, 0) + 1
        counts = ", ".join(f"{n} by {f}" for f, n in sorted(by_filter.items(), key=lambda kv: -kv[1]))
        example = f"; e.g. {rejected[0].node_id[:12]}: {rejected[0].reason}" if rejected else ""
        return f"no eligible node: {len(rejected)} rejected ({counts or 'no nodes registered'}){example}"
    runner = next((c for c in ranked if c.node_id != chosen.node_id), None)
    return _why(chosen, runner, picked_by) + f"; {len(ranked)} eligible, {len(rejected)} rejected"


def schedule(
    request: ScheduleRequest,
    snapshots: Sequence[NodeSnapshot],
    profile: Profile,
    rng: random.Random,
    now: float,
    decision_id: str | None = None,
) -> Decision:
    ctx = Context.build(request, now)
    eligible, verdicts = _filter(ctx, profile, snapshots)
    ranked_scored = _score(ctx, profile, eligible, rng)
    picked, picked_by = profile.picker.pick(ctx, ranked_scored, rng) if ranked_scored else (-1, "")
    ranked = [_candidate(ctx, profile, i, s) for i, s in enumerate(ranked_scored)]
    chosen = ranked[picked] if ranked else None
    margin = ranked[0].score - ranked[1].score if len(ranked) > 1 else None
    return Decision(
        decision_id=decision_id or "dec_" + secrets.token_hex(10),
        request=request,
        requirements=requirements(ctx),
        profile=profile.name,
        created=now,
        chosen=chosen.node_id if chosen else None,
        candidates=tuple(ranked),
        verdicts=tuple(verdicts),
        explanation=_explain(ranked, chosen, verdicts, picked_by),
        margin=round(margin, 6) if margin is not None else None,
        picked_by=picked_by,
    )


__all__ = ["Score", "schedule"]
