"""`schedule(request, snapshots, profile, rng, now) -> Decision`: a pure function.

Capability first: every filter must pass (the first one that fails names the reason). Then each eligible
node is scored by every scorer (normalised to [0, 1], weighted, summed), ranked best first (ties broken by
the injected rng), and the picker chooses. The decision records all of it.
"""

import random
import secrets
import weakref
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from gridserve.scheduler import fused
from gridserve.scheduler.context import Context
from gridserve.scheduler.plugins import Score, Scored
from gridserve.scheduler.profile import Profile
from gridserve.scheduler.ranking import Order
from gridserve.scheduler.snapshot import C_ACTIVE, C_HAS_HW, C_QUEUED, C_REL_NEW, C_SLOTS, NodeSnapshot
from gridserve.scheduler.table import SnapshotTable
from gridserve.scheduler.vector import Array, Columns
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


_GENERATORS: "weakref.WeakKeyDictionary[random.Random, np.random.Generator]" = weakref.WeakKeyDictionary()


def numpy_rng(rng: random.Random) -> np.random.Generator:
    """A numpy generator tied to `rng`: seeded from it on first use, then kept (one per rng), so the same rng
    gives the same draws and no generator is built per decision."""
    gen = _GENERATORS.get(rng)
    if gen is None:
        gen = _GENERATORS[rng] = np.random.default_rng(rng.getrandbits(64))
    return gen


def _ties(rng: random.Random, n: int) -> "npt.NDArray[np.float64]":
    """One random tie-breaker per eligible node, in order (both paths draw the same ones from `rng`)."""
    return numpy_rng(rng).random(n)


def _score(ctx: Context, profile: Profile, nodes: Sequence[NodeSnapshot], rng: random.Random) -> list[Scored]:
    scored = []
    ties = _ties(rng, len(nodes))
    for k, node in enumerate(nodes):
        scores = tuple(scorer.score(ctx, node) for scorer, _ in profile.scorers)
        total = sum(s.normalized * w for s, (_, w) in zip(scores, profile.scorers, strict=True))
        scored.append((total, float(ties[k]), Scored(node, total, scores)))
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


VECTOR_MIN_NODES = 24
"""Below this many nodes the per-node path is faster (numpy's per-call overhead dominates); measured with
bench/scheduler.py: ~0.06 ms per-node path vs ~0.4 ms column path at 1 node, 3 ms vs 0.5 ms at 100."""


def _unit(scorer: Any, ctx: Context, node: NodeSnapshot, raw: float) -> str:
    unit_for = getattr(scorer, "unit_for", None)
    return str(unit_for(node, raw)) if unit_for is not None else scorer.score(ctx, node).unit


def _vectorizable(profile: Profile) -> bool:
    return profile.vectorizable


class _Ranked(Sequence[Scored]):
    """The ranked eligible nodes as the picker sees them, built one at a time on access."""

    def __init__(
        self,
        cols: Columns,
        order: Order,
        total: Array,
        norms: list[Array],
        raws: list[Array],
        units: list[str],
    ) -> None:
        self.cols, self.order, self.total, self.norms, self.raws, self.units = cols, order, total, norms, raws, units

    def __len__(self) -> int:
        return len(self.order)

    def node_ids(self) -> list[str]:
        """The ranked nodes' ids, without building each Scored."""
        nodes = self.cols.nodes
        return [nodes[j].node_id for j in self.order.full().tolist()]

    def _free_slot(self) -> "npt.NDArray[np.bool_]":
        """Column form of pickers.free_slot."""
        c = self.cols
        busy = c.col(C_ACTIVE) + c.col(C_QUEUED)
        return np.asarray(busy < np.maximum(1.0, np.where(c.col(C_HAS_HW) > 0, c.col(C_SLOTS), 1.0)))

    def _meets_slo(self, ctx: Context, headroom: float) -> "npt.NDArray[np.bool_]":
        """Column form of pickers.meets_slo."""
        ttft, itl = self.cols.prediction(ctx, loaded=True)
        return np.asarray((ttft <= ctx.ttft_slo_s * headroom) & (itl <= ctx.tpot_slo_s * headroom))

    def first_explorable(self, ctx: Context, headroom: float, start: int) -> int | None:
        """Rank of the first node from `start` on with little or no record, a free batch slot and predicted to
        meet the SLO (None: none); the column form of pickers.explorable."""
        new = self.cols.col(C_REL_NEW) > 0
        return self.order.first_where(new & self._free_slot() & self._meets_slo(ctx, headroom), start)

    def first_meeting_slo(self, ctx: Context, headroom: float, at_once: bool) -> int | None:
        """Rank of the best node predicted to meet the request's SLO, with a free slot if `at_once` (column form
        of pickers.meets_slo and free_slot)."""
        meets = self._meets_slo(ctx, headroom)
        return self.order.first_where(meets & self._free_slot() if at_once else meets, 0)

    def __getitem__(self, i: int) -> Scored:  # type: ignore[override]
        j = self.order[i]
        scores = tuple(
            Score(float(n[j]), float(r[j]), u) for n, r, u in zip(self.norms, self.raws, self.units, strict=True)
        )
        return Scored(self.cols.nodes[j], float(self.total[j]), scores)


def _vector_decide(
    ctx: Context, profile: Profile, nodes: Sequence[NodeSnapshot], rng: random.Random
) -> tuple[Columns, Order, Array, list[Array], list[Array], npt.NDArray[np.int64]]:
    cols = Columns.of(ctx, nodes)
    the_plan = fused.plan(profile, ctx)
    if the_plan is not None:
        return _fused_decide(ctx, cols, the_plan, rng)
    n = len(cols.nodes)
    hits = np.zeros((max(1, len(profile.filters)), n), dtype=bool)  # one row per filter: whom it rejects
    for index, filt in enumerate(profile.filters):
        hits[index] = filt.mask(ctx, cols)  # type: ignore[attr-defined]
    rejected = hits.any(axis=0)
    rejected_by = np.where(rejected, hits.argmax(axis=0), -1)  # the first filter that rejects names the reason
    eligible = np.flatnonzero(~rejected)
    total = np.zeros(n)
    norms, raws = [], []
    for scorer, weight in profile.scorers:
        norm, raw = scorer.vscore(ctx, cols)  # type: ignore[attr-defined]
        norms.append(norm)
        raws.append(np.array(raw))  # a copy: a raw column may be a view of a table that changes later
        total = total + norm * weight
    ties = _ties(rng, len(eligible))
    order = Order(eligible, total, ties)
    return cols, order, total, norms, raws, rejected_by


def _fused_decide(
    ctx: Context, cols: Columns, the_plan: fused.Plan, rng: random.Random
) -> tuple[Columns, Order, Array, list[Array], list[Array], npt.NDArray[np.int64]]:
    """The same as the plugin loop above, in one compiled pass (fused.py)."""
    out = fused.run(the_plan, ctx, cols.rows, cols.model)
    cols.set_prediction(out.ttft, out.itl)
    eligible = np.flatnonzero(out.rejected_by < 0)
    order = Order(eligible, out.total, _ties(rng, len(eligible)))
    return cols, order, out.total, list(out.norms), list(out.raws), out.rejected_by


def _schedule_vector(
    ctx: Context, profile: Profile, snapshots: Sequence[NodeSnapshot], rng: random.Random, decision_id: str, now: float
) -> Decision:
    cols, order, total, norms, raws, rejected_by = _vector_decide(ctx, profile, snapshots, rng)
    units = [getattr(sc, "unit", sc.name) for sc, _ in profile.scorers]
    ranked = _Ranked(cols, order, total, norms, raws, units)
    picked, picked_by = profile.picker.pick(ctx, ranked, rng) if len(order) else (-1, "")
    ttft, itl = cols.prediction(ctx, loaded=True)
    price = cols.price(ctx)

    built: dict[int, Candidate] = {}

    def candidate(rank: int) -> Candidate:
        if rank not in built:
            built[rank] = _vector_candidate(rank)
        return built[rank]

    def _vector_candidate(rank: int) -> Candidate:
        j = order[rank]
        node = cols.nodes[j]
        details = tuple(
            ScoreDetail(
                sc.name, round(float(raws[k][j]), 6), _unit(sc, ctx, node, float(raws[k][j])), float(norms[k][j]), w
            )
            for k, (sc, w) in enumerate(profile.scorers)
        )
        cal = node.calibration
        return Candidate(
            node.node_id,
            rank,
            float(total[j]),
            details,
            None if np.isnan(ttft[j]) else round(float(ttft[j]), 9),
            None if np.isnan(itl[j]) else round(float(itl[j]), 9),
            None if np.isnan(price[j]) else round(float(price[j]), 6),
            (cal.ttft_factor, cal.itl_factor) if cal else (1.0, 1.0),
        )

    def verdicts() -> tuple[Verdict, ...]:
        out = []
        for j, node in enumerate(cols.nodes):
            k = int(rejected_by[j])
            if k < 0:
                out.append(Verdict(node.node_id, True))
                continue
            filt = profile.filters[k]
            reason = filt.reject(ctx, node) or f"rejected by {filt.name}"
            out.append(Verdict(node.node_id, False, filt.name, reason))
        return tuple(out)

    chosen_id = cols.nodes[order[picked]].node_id if picked >= 0 else None
    rejected = int((rejected_by >= 0).sum())
    margin = float(total[order[0]] - total[order[1]]) if len(order) > 1 else None

    def explanation() -> str:
        if picked < 0:
            return _explain([], None, verdicts(), picked_by)
        chosen = candidate(picked)
        top = [candidate(r) for r in range(min(len(order), 2))]
        runner = next((c for c in top if c.node_id != chosen.node_id), None)
        return _why(chosen, runner, picked_by) + f"; {len(order)} eligible, {rejected} rejected"

    return Decision(
        decision_id=decision_id,
        request=ctx.request,
        requirements=requirements(ctx),
        profile=profile.name,
        created=now,
        chosen=chosen_id,
        candidates=lambda: tuple(candidate(r) for r in range(len(order))),
        verdicts=verdicts,
        explanation=explanation,
        margin=round(margin, 6) if margin is not None else None,
        picked_by=picked_by,
        eligible=len(order),
        rejected=rejected,
        chosen_candidate=(lambda: candidate(picked)) if picked >= 0 else None,
        rejected_by_filter=lambda: {
            profile.filters[int(k)].name: int(c) for k, c in enumerate(np.bincount(rejected_by[rejected_by >= 0])) if c
        },
    )


def schedule(
    request: ScheduleRequest,
    snapshots: Sequence[NodeSnapshot],
    profile: Profile,
    rng: random.Random,
    now: float,
    decision_id: str | None = None,
    vectorized: bool | None = None,
) -> Decision:
    """Decide. `vectorized` None: the column path when every plugin has one (the same result, much faster on
    large grids), else the per-node path; True/False force one (tests compare them)."""
    ctx = Context.build(request, now)
    decision_id = decision_id or "dec_" + secrets.token_hex(10)
    pool = _sample(snapshots, profile.sample, rng, request.model)
    decision = _decide(ctx, profile, pool, rng, decision_id, now, vectorized)
    if pool is snapshots:
        return decision
    if decision.chosen is None:  # nothing eligible in the sample: the whole pool decides
        return _decide(ctx, profile, snapshots, rng, decision_id, now, vectorized)
    decision.explain_also(f"; over a random sample of {len(pool)} of {len(snapshots)} nodes")
    decision.extra["sampled"] = {"considered": len(pool), "pool": len(snapshots)}
    return decision


def _sample(snapshots: Sequence[NodeSnapshot], size: int, rng: random.Random, model: str) -> Sequence[NodeSnapshot]:
    """A uniform random sample of `size` nodes when the pool is larger (power of d choices), else the pool."""
    n = len(snapshots)
    if size <= 0 or n <= size:
        return snapshots
    drawn = np.sort(numpy_rng(rng).integers(0, n, size=size))
    picks = drawn[np.concatenate(([True], drawn[1:] != drawn[:-1]))]  # up to `size`: a repeat counts once
    if isinstance(snapshots, SnapshotTable):
        return snapshots.sample(picks, model)
    return [snapshots[int(i)] for i in picks]


def _decide(
    ctx: Context,
    profile: Profile,
    snapshots: Sequence[NodeSnapshot],
    rng: random.Random,
    decision_id: str,
    now: float,
    vectorized: bool | None,
) -> Decision:
    request = ctx.request
    if vectorized if vectorized is not None else (len(snapshots) >= VECTOR_MIN_NODES and _vectorizable(profile)):
        fused.warm_soon()
        return _schedule_vector(ctx, profile, snapshots, rng, decision_id, now)
    eligible, verdicts = _filter(ctx, profile, snapshots)
    ranked_scored = _score(ctx, profile, eligible, rng)
    picked, picked_by = profile.picker.pick(ctx, ranked_scored, rng) if ranked_scored else (-1, "")
    ranked = [_candidate(ctx, profile, i, s) for i, s in enumerate(ranked_scored)]
    chosen = ranked[picked] if ranked else None
    margin = ranked[0].score - ranked[1].score if len(ranked) > 1 else None
    return Decision(
        decision_id=decision_id,
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
        chosen_candidate=chosen,
    )


__all__ = ["schedule"]
