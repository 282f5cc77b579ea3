"""The order of the eligible nodes, best first: the head at once (a partial selection, O(n)), the full order only
when something reads past it (a decision's full candidate list); and the ranking as pickers read it.

Order = descending total score, ties broken by ascending random tie value; identical to sorting all of them.
"""

import numpy as np
import numpy.typing as npt

from gridserve.scheduler.context import Context
from gridserve.scheduler.snapshot import C_ACTIVE, C_HAS_HW, C_QUEUED, C_REL_NEW, C_REL_VETTED, C_SLOTS
from gridserve.scheduler.vector import Columns

Array = npt.NDArray[np.float64]
Indexes = npt.NDArray[np.int64]

HEAD = 8
"""Ranks computed eagerly: the pick, the runner-up, the first failover candidates."""


def _sorted(indexes: Indexes, total: Array, ties: Array) -> Indexes:
    return indexes[np.lexsort((ties[indexes], -total[indexes]))]


class Order:
    def __init__(self, eligible: Indexes, total: Array, ties: Array) -> None:
        """`eligible`: node indexes; `total`: score per node (all nodes); `ties`: per eligible node, in order."""
        self.eligible = eligible
        self.total = total
        self.ties = np.zeros(len(total))
        self.ties[eligible] = ties
        self._full: Indexes | None = None
        self.head = self._head(min(HEAD, len(eligible)))

    def _head(self, k: int) -> Indexes:
        n = len(self.eligible)
        if k == 0:
            return self.eligible[:0]
        if n <= 4 * k:
            self._full = _sorted(self.eligible, self.total, self.ties)
            return self._full[:k]
        scores = self.total[self.eligible]
        threshold = np.partition(scores, n - k)[n - k]  # the k-th best score: every tie at it stays in
        return _sorted(self.eligible[scores >= threshold], self.total, self.ties)[:k]

    def __len__(self) -> int:
        return len(self.eligible)

    def full(self) -> Indexes:
        if self._full is None:
            self._full = _sorted(self.eligible, self.total, self.ties)
        return self._full

    def __getitem__(self, rank: int) -> int:
        return int(self.head[rank]) if rank < len(self.head) else int(self.full()[rank])

    def rank_of(self, j: int) -> int:
        """How many eligible nodes rank before node j."""
        t, tie = self.total[j], self.ties[j]
        scores, ties = self.total[self.eligible], self.ties[self.eligible]
        return int(np.count_nonzero((scores > t) | ((scores == t) & (ties < tie))))

    def first_where(self, mask: npt.NDArray[np.bool_], start: int) -> int | None:
        """Rank of the best node at rank >= start for which mask (per node) holds; None if there is none."""
        for rank in range(start, len(self.head)):
            if mask[self.head[rank]]:
                return rank
        hits = self.eligible[mask[self.eligible]]
        for j in _sorted(hits, self.total, self.ties).tolist():
            rank = self.rank_of(j)
            if rank >= start:
                return rank
        return None


class Ranked:
    """The ranked eligible nodes as a picker sees them: their order, and the questions pickers ask of them
    answered over the decision's columns (no per-node objects are built)."""

    def __init__(self, cols: Columns, order: Order) -> None:
        self.cols, self.order = cols, order
        vetted = np.asarray(cols.col(C_REL_VETTED) > 0)
        among = vetted[order.eligible]
        self.held_back = int(np.count_nonzero(~among)) if among.any() else 0
        """Eligible newcomers (identities not yet vetted) held back to the exploration share: those unvetted while
        some eligible node is established; 0 when none is (newcomers are then all there is)."""
        self.allowed: npt.NDArray[np.bool_] = vetted if self.held_back else np.ones(len(cols), dtype=bool)
        """Per node: whether a pick outside exploration may choose it (established nodes, or all)."""

    def __len__(self) -> int:
        return len(self.order)

    def node_ids(self) -> list[str]:
        """The ranked nodes' ids, best first."""
        nodes = self.cols.nodes
        return [nodes[j].node_id for j in self.order.full().tolist()]

    def _free_slot(self) -> "npt.NDArray[np.bool_]":
        """Fewer requests in flight or queued than the card has batch slots."""
        c = self.cols
        busy = c.col(C_ACTIVE) + c.col(C_QUEUED)
        return np.asarray(busy < np.maximum(1.0, np.where(c.col(C_HAS_HW) > 0, c.col(C_SLOTS), 1.0)))

    def _holds_prefix(self, ctx: Context) -> "npt.NDArray[np.bool_]":
        """Nodes that probably hold part of the prompt in their prefix cache (`ScheduleRequest.cached_tokens`)."""
        return np.asarray(self.cols.reused(ctx) > 0)

    def holds_prefix(self, ctx: Context) -> bool:
        """Whether some eligible node probably holds part of the prompt."""
        return bool(ctx.request.cached_tokens) and bool(self._holds_prefix(ctx)[self.order.eligible].any())

    def better_hit(self, ctx: Context, headroom: float | None, rank: int, margin: float) -> int | None:
        """Rank of the best node that holds more of the prompt than the node at `rank`, is predicted to answer
        sooner (lower TTFT), meets the SLO within `headroom` (None: whether or not) and scores within `margin` of
        it (None: no such node)."""
        j = self.order[rank]
        reused = self.cols.reused(ctx)
        ttft, _ = self.cols.prediction(ctx, loaded=True)
        mask = (reused > reused[j]) & (ttft < ttft[j]) & (self.order.total >= self.order.total[j] - margin)
        mask &= self.allowed
        if headroom is not None:
            mask &= self._meets_slo(ctx, headroom)
        return self.order.first_where(np.asarray(mask), 0)

    def _meets_slo(self, ctx: Context, headroom: float) -> "npt.NDArray[np.bool_]":
        """Predicted (under the node's load) within `headroom` x the request's TTFT and TPOT targets."""
        ttft, itl = self.cols.prediction(ctx, loaded=True)
        return np.asarray((ttft <= ctx.ttft_slo_s * headroom) & (itl <= ctx.tpot_slo_s * headroom))

    def first_explorable(self, ctx: Context, headroom: float, start: int) -> int | None:
        """Rank of the first node from `start` on with little or no record (or a newcomer held back), a free batch
        slot and predicted to meet the SLO (None: none)."""
        new = (self.cols.col(C_REL_NEW) > 0) | ~self.allowed
        return self.order.first_where(new & self._free_slot() & self._meets_slo(ctx, headroom), start)

    def first_allowed(self) -> int:
        """Rank of the best node a pick outside exploration may choose (0 unless newcomers are held back)."""
        found = self.order.first_where(self.allowed, 0) if self.held_back else 0
        return 0 if found is None else found

    def first_meeting_slo(self, ctx: Context, headroom: float, at_once: bool) -> int | None:
        """Rank of the best node predicted to meet the request's SLO; if `at_once`, only among nodes with a free
        slot or holding part of the prompt in their prefix cache (their queue wait is in the prediction, and the
        prefill they skip is work the grid need not do again)."""
        meets = self._meets_slo(ctx, headroom) & self.allowed
        if not at_once:
            return self.order.first_where(meets, 0)
        ready = self._free_slot()
        if ctx.request.cached_tokens:
            ready = ready | self._holds_prefix(ctx)
        return self.order.first_where(meets & ready, 0)
