"""Snapshots of a pool kept incrementally: when one node changes, its snapshot and its row are replaced and
the stacked columns the vectorised scheduler reads stay current, instead of being rebuilt per decision.

`schedule(request, table, ...)` accepts a table wherever it accepts a list of snapshots. The table is not
thread-safe: one owner (the simulator, or a gateway's event loop) puts and decides.
"""

import operator
from collections.abc import Iterator, Sequence

import numpy as np
import numpy.typing as npt

from gridserve.scheduler.snapshot import N_COLUMNS, N_MODEL_COLUMNS, NodeSnapshot

Array = npt.NDArray[np.float64]


class SnapshotTable(Sequence[NodeSnapshot]):
    def __init__(self, snapshots: Sequence[NodeSnapshot] = ()) -> None:
        self._snaps: list[NodeSnapshot] = []
        self._index: dict[str, int] = {}
        self._rows: Array = np.zeros((max(16, len(snapshots)), N_COLUMNS))
        self._models: dict[str, Array] = {}
        for snap in snapshots:
            self.put(snap)

    def __len__(self) -> int:
        return len(self._snaps)

    def __getitem__(self, i: int) -> NodeSnapshot:  # type: ignore[override]
        return self._snaps[i]

    def __iter__(self) -> Iterator[NodeSnapshot]:
        return iter(self._snaps)

    def get(self, node_id: str) -> NodeSnapshot | None:
        i = self._index.get(node_id)
        return None if i is None else self._snaps[i]

    def put(self, snap: NodeSnapshot) -> None:
        """Add a node or replace its snapshot (its row, and its per-model rows if its capability changed)."""
        i = self._index.get(snap.node_id)
        if i is None:
            i = len(self._snaps)
            self._index[snap.node_id] = i
            self._snaps.append(snap)
            if i >= len(self._rows):
                self._rows = np.concatenate([self._rows, np.zeros((len(self._rows), N_COLUMNS))])
            self._models.clear()
        else:
            static_changed = self._snaps[i].static is not snap.static
            self._snaps[i] = snap
            if static_changed:
                for model, rows in self._models.items():
                    rows[i] = np.frombuffer(snap.static.model_row(model), dtype=np.float64)
        self._rows[i] = np.frombuffer(snap.row, dtype=np.float64)

    def remove(self, node_id: str) -> None:
        """Take a node out (the last row moves into its place)."""
        i = self._index.pop(node_id, None)
        if i is None:
            return
        last = len(self._snaps) - 1
        if i != last:
            moved = self._snaps[last]
            self._snaps[i] = moved
            self._index[moved.node_id] = i
            self._rows[i] = self._rows[last]
        self._snaps.pop()
        self._models.clear()

    def sample(self, picks: "npt.NDArray[np.int64]", model: str) -> "SnapshotTable":
        """A table of the nodes at rows `picks`, with their columns for `model` (copied: later puts to this
        table do not change it)."""
        out = SnapshotTable.__new__(SnapshotTable)
        out._snaps = (
            list(operator.itemgetter(*picks.tolist())(self._snaps))
            if len(picks) > 1
            else [self._snaps[int(i)] for i in picks]
        )
        out._index = {}  # a sample is read, never put to
        out._rows = self._rows.take(picks, axis=0)
        out._models = {model: self.model_rows(model).take(picks, axis=0)}
        return out

    def snapshots(self) -> list[NodeSnapshot]:
        """A copy of the current snapshots (a decision keeps it; later puts do not change it)."""
        return list(self._snaps)

    def rows(self) -> Array:
        """The C_* columns of every node, one row per node in table order (a view: copy to keep)."""
        return self._rows[: len(self._snaps)]

    def model_rows(self, model: str) -> Array:
        """The M_* columns of every node for `model` (cached until a node joins or leaves)."""
        rows = self._models.get(model)
        if rows is None:
            n = len(self._snaps)
            joined = b"".join([snap.static.model_row(model) for snap in self._snaps])
            rows = np.frombuffer(joined, dtype=np.float64).reshape(n, N_MODEL_COLUMNS).copy()
            self._models[model] = rows
        return rows
