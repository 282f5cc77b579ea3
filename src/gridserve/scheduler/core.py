"""Deciding where a request runs: `Scheduler(profile).schedule(request, snapshots, rng, now) -> Decision`.

Capability first: every filter must pass (the first one that fails names the reason). Then each eligible
node is scored by every scorer (normalised to [0, 1], weighted, summed), ranked best first (ties broken by
the injected rng), and the picker chooses. The decision records all of it, and builds its per-node parts only
when read (evidence.py).

Everything is computed over columns (vector.py: one row per node, a single node is the one-row case), by the
plugins' numpy code or, when the Scheduler has compiled it and the profile's plugins are the stock ones, by the
fused kernel (fused.py), which gives the same bits.

A decision is a function of its arguments and of the Scheduler, which owns what persists between decisions: the
kernel's plan for its profile, the compiled kernel once `warm()` has built it, and one numpy generator per
caller rng (seeded from the rng on first use, so that the same rng gives the same draws). The module-level
`schedule(request, snapshots, profile, rng, now)` is a one-off Scheduler: it uses no state but its arguments.
"""

import random
import secrets
import threading
import weakref
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from gridserve.scheduler import fused
from gridserve.scheduler.context import Context
from gridserve.scheduler.evidence import ColumnEvidence, requirements
from gridserve.scheduler.profile import Profile
from gridserve.scheduler.ranking import Order, Ranked
from gridserve.scheduler.snapshot import NodeSnapshot
from gridserve.scheduler.table import SnapshotTable
from gridserve.scheduler.vector import Array, Columns
from gridserve.types.scheduling import Decision, ScheduleRequest

KERNEL_POOL = 24
"""A pool size from which a caller that has not warmed its Scheduler should (the old per-node path's crossover).
The kernel is faster at every size (bench/scheduler.py: ~0.07 ms a decision over one node against ~0.17 ms on the
column path, ~0.13 against ~0.24 over ten), so the gateway warms it at start (gateway/app.py) unless told not to:
numba costs the process ~100 MB and ~0.4 s of CPU once."""

Scores = tuple["npt.NDArray[np.int64]", Array, list[Array], list[Array]]
"""Per node: index of the first filter that rejects it (-1: none), total score, and per scorer its normalised and
raw scores."""


class Scheduler:
    """One profile's decisions, and the state that makes them repeatable and fast (see the module's docstring).

    Not thread-safe beyond `warm(background=True)`: one owner decides (a gateway's event loop, a simulator)."""

    def __init__(self, profile: Profile, *, compiled: bool = False, kernel: bool = True) -> None:
        """`compiled`: compile the kernel now (`warm()`); otherwise decisions take the column path until then.
        `kernel=False`: never (`warm()` does nothing; numba is never imported)."""
        self.profile = profile
        self._plan = fused.plan_of(profile) if kernel else None
        self._kernel: fused.Kernel | None = None
        self._warming = threading.Event()
        self._generators: weakref.WeakKeyDictionary[random.Random, np.random.Generator] = weakref.WeakKeyDictionary()
        if compiled:
            self.warm()

    @property
    def compiled(self) -> bool:
        """Decisions of catalogue models without engine restrictions run in the compiled kernel."""
        return self._kernel is not None

    def warm(self, background: bool = False) -> None:
        """Compile the kernel and decide with it from then on (the same decisions, faster). Seconds the first
        time on a machine, a load from numba's disk cache after; `background`: in a thread, deciding on the
        column path meanwhile. A profile with plugins the kernel does not know has nothing to compile."""
        if self._plan is None or self._kernel is not None:
            return
        if background:
            if not self._warming.is_set():  # one compile thread, however often it is asked
                self._warming.set()
                threading.Thread(target=self.warm, name="scheduler-kernel-warm", daemon=True).start()
            return
        self._kernel = fused.compile_kernel()

    def numpy_rng(self, rng: random.Random) -> np.random.Generator:
        """The numpy generator tied to `rng`: seeded from it on first use, then kept (one per rng), so the same rng
        gives the same draws and no generator is built per decision."""
        gen = self._generators.get(rng)
        if gen is None:
            gen = self._generators[rng] = np.random.default_rng(rng.getrandbits(64))
        return gen

    def schedule(
        self,
        request: ScheduleRequest,
        snapshots: Sequence[NodeSnapshot],
        rng: random.Random,
        now: float,
        decision_id: str | None = None,
    ) -> Decision:
        """Decide. Over a random sample of `profile.sample` nodes when the pool is larger; if nothing in the
        sample is eligible, the whole pool decides."""
        ctx = Context.build(request, now)
        decision_id = decision_id or "dec_" + secrets.token_hex(10)
        gen = self.numpy_rng(rng)
        pool = _sample(snapshots, self.profile.sample, gen, request)
        if pool is not snapshots:
            decision = self._decide(ctx, pool, rng, gen, decision_id, (len(pool), len(snapshots)))
            if decision.chosen is not None:
                return decision
        return self._decide(ctx, snapshots, rng, gen, decision_id, None)

    def _scores(self, ctx: Context, cols: Columns) -> Scores:
        """Every filter and scorer over the columns: in the kernel when it can, else plugin by plugin."""
        if self._kernel is not None and self._plan is not None and fused.applies(ctx):
            out = fused.run(self._kernel, self._plan, ctx, cols.rows, cols.model)
            cols.set_prediction(out.ttft, out.itl, out.queue, out.alone, out.prefill)
            return out.rejected_by, out.total, list(out.norms), list(out.raws)
        profile = self.profile
        n = len(cols)
        hits = np.zeros((max(1, len(profile.filters)), n), dtype=bool)  # one row per filter: whom it rejects
        for index, filt in enumerate(profile.filters):
            hits[index] = filt.mask(ctx, cols)
        rejected_by = np.where(hits.any(axis=0), hits.argmax(axis=0), -1)  # the first that rejects names the reason
        total = np.zeros(n)
        norms, raws = [], []
        for scorer, weight in profile.scorers:
            norm, raw = scorer.score(ctx, cols)
            norms.append(norm)
            raws.append(raw)
            total = total + norm * weight
        return rejected_by, total, norms, raws

    def _decide(
        self,
        ctx: Context,
        nodes: Sequence[NodeSnapshot],
        rng: random.Random,
        gen: np.random.Generator,
        decision_id: str,
        sampled: tuple[int, int] | None,
    ) -> Decision:
        profile = self.profile
        cols = Columns.of(ctx, nodes)
        rejected_by, total, norms, raws = self._scores(ctx, cols)
        eligible = np.flatnonzero(rejected_by < 0)
        order = Order(eligible, total, gen.random(len(eligible)))  # one tie-breaker per eligible node, in order
        picked, picked_by = profile.picker.pick(ctx, Ranked(cols, order), rng) if len(order) else (-1, "")
        margin = float(total[order[0]] - total[order[1]]) if len(order) > 1 else None
        evidence = ColumnEvidence(ctx, profile, cols, order, total, norms, raws, rejected_by, picked, picked_by)
        return Decision(
            decision_id=decision_id,
            request=ctx.request,
            requirements=requirements(ctx),
            profile=profile.name,
            created=ctx.now,
            chosen=cols.nodes[order[picked]].node_id if picked >= 0 else None,
            margin=round(margin, 6) if margin is not None else None,
            picked_by=picked_by,
            eligible=len(order),
            rejected=int((rejected_by >= 0).sum()),
            sampled=sampled,
            evidence=evidence,
        )


def schedule(
    request: ScheduleRequest,
    snapshots: Sequence[NodeSnapshot],
    profile: Profile,
    rng: random.Random,
    now: float,
    decision_id: str | None = None,
) -> Decision:
    """One decision by a one-off `Scheduler(profile)`: a pure function of its arguments (the column path; its
    numpy generator seeded from `rng`). A caller that decides repeatedly holds a Scheduler instead: its kernel,
    and the same rng's draws continuing from one decision to the next."""
    return Scheduler(profile).schedule(request, snapshots, rng, now, decision_id)


def _sample(
    snapshots: Sequence[NodeSnapshot], size: int, gen: np.random.Generator, request: ScheduleRequest
) -> Sequence[NodeSnapshot]:
    """A uniform random sample of `size` nodes when the pool is larger (power of d choices), else the pool; the
    nodes that probably hold the prompt's prefix (`request.cached_tokens`) always join it."""
    n = len(snapshots)
    if size <= 0 or n <= size:
        return snapshots
    drawn = gen.integers(0, n, size=size)
    if request.cached_tokens:
        drawn = np.concatenate((drawn, _positions(snapshots, [node for node, _ in request.cached_tokens])))
    drawn = np.sort(drawn)
    picks = drawn[np.concatenate(([True], drawn[1:] != drawn[:-1]))]  # up to `size`: a repeat counts once
    if isinstance(snapshots, SnapshotTable):
        return snapshots.sample(picks, request.model)
    return [snapshots[int(i)] for i in picks]


def _positions(snapshots: Sequence[NodeSnapshot], node_ids: list[str]) -> "npt.NDArray[np.int64]":
    if isinstance(snapshots, SnapshotTable):
        found = snapshots.positions(node_ids)
    else:
        wanted = set(node_ids)
        found = [i for i, s in enumerate(snapshots) if s.node_id in wanted]
    return np.array(found, dtype=np.int64)


__all__ = ["KERNEL_POOL", "Scheduler", "schedule"]
