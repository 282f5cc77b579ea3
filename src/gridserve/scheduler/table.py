"""Snapshots of a pool kept incrementally: when one node changes, its row is replaced and the stacked columns
the vectorised scheduler reads stay current, instead of being rebuilt per decision.

Two ways to keep a node in the table:

- `put(snapshot)`: the snapshot itself (the simulator);
- `put_row(node_id, static, row)`: only its numbers; the snapshot is built by the table's `build` callback when a
  decision reads it (the gateway's registry: a grid of 10,000 nodes changes thousands of times a second, and a
  decision over a sample of 256 reads 256 of them).

`schedule(request, table, ...)` accepts a table wherever it accepts a list of snapshots; `view()` is the table
plus snapshots appended for one decision (a pipeline's virtual node), leaving the table as it is. The table is
not thread-safe: one owner (the simulator, or a gateway's event loop) puts and decides.
"""

import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np
import numpy.typing as npt

from gridserve.scheduler.snapshot import N_COLUMNS, N_MODEL_COLUMNS, NodeSnapshot, NodeStatic

Array = npt.NDArray[np.float64]
Build = Callable[[str, bytes], NodeSnapshot]
"""Builds the current snapshot of a node kept by `put_row` (from whatever its owner keeps), given its row as the
table holds it (packed float64)."""


def _grown(rows: Array, need: int) -> Array:
    """`rows` with room for at least `need` rows (doubling: amortised O(1) per join)."""
    if need <= len(rows):
        return rows
    return np.concatenate([rows, np.zeros((max(need, 2 * len(rows)) - len(rows), rows.shape[1]))])


class SnapshotTable(Sequence[NodeSnapshot]):
    def __init__(self, snapshots: Sequence[NodeSnapshot] = (), build: Build | None = None) -> None:
        self._ids: list[str] = []
        self._statics: list[NodeStatic] = []
        self._snaps: list[NodeSnapshot | None] = []
        """None: kept by `put_row`, built on access."""
        self._index: dict[str, int] = {}
        self._rows: Array = np.zeros((max(16, len(snapshots)), N_COLUMNS))
        self._models: dict[str, Array] = {}
        """Model -> M_* columns, one row per node (as `_rows`: room for more, the first len(self) valid)."""
        self._build = build
        for snap in snapshots:
            self.put(snap)

    def __len__(self) -> int:
        return len(self._ids)

    def __getitem__(self, i: int) -> NodeSnapshot:  # type: ignore[override]
        snap = self._snaps[i]
        return snap if snap is not None else self._materialize(i)

    def __iter__(self) -> Iterator[NodeSnapshot]:
        for i in range(len(self._ids)):
            yield self[i]

    def get(self, node_id: str) -> NodeSnapshot | None:
        i = self._index.get(node_id)
        return None if i is None else self[i]

    def positions(self, node_ids: "Iterable[str]") -> list[int]:
        """The rows of those of `node_ids` that are in the table."""
        index = self._index
        return [i for i in (index.get(n) for n in node_ids) if i is not None]

    def put(self, snap: NodeSnapshot) -> None:
        """Add a node or replace its snapshot (its row, and its per-model rows if its capability changed)."""
        self._place(snap.node_id, snap.static, snap, np.frombuffer(snap.row, dtype=np.float64))

    def put_row(self, node_id: str, static: NodeStatic, row: Sequence[float]) -> None:
        """Add a node or replace its numbers (C_* columns, as its snapshot's `row` would be); its snapshot is built
        by `build` whenever it is read."""
        if self._build is None:
            raise TypeError("put_row needs a table made with a `build` callback")
        self._place(node_id, static, None, row)

    def set_cells(self, node_id: str, cells: dict[int, float]) -> None:
        """Change some C_* columns of a node kept by `put_row` (its other numbers did not change)."""
        i = self._index[node_id]
        if self._snaps[i] is not None:
            raise TypeError("set_cells on a node kept as a snapshot: put its new snapshot")
        for column, value in cells.items():
            self._rows[i, column] = value

    def _place(self, node_id: str, static: NodeStatic, snap: NodeSnapshot | None, row: Sequence[float] | Array) -> None:
        i = self._index.get(node_id)
        if i is None:
            i = len(self._ids)
            self._index[node_id] = i
            self._ids.append(node_id)
            self._statics.append(static)
            self._snaps.append(snap)
            self._rows = _grown(self._rows, i + 1)
            for model in self._models:
                self._models[model] = _grown(self._models[model], i + 1)
            self._set_model_rows(i, static)
        else:
            self._snaps[i] = snap
            if self._statics[i] is not static:
                self._statics[i] = static
                self._set_model_rows(i, static)
        self._rows[i] = row

    def _set_model_rows(self, i: int, static: NodeStatic) -> None:
        for model, rows in self._models.items():
            rows[i] = np.frombuffer(static.model_row(model), dtype=np.float64)

    def remove(self, node_id: str) -> None:
        """Take a node out (the last row moves into its place)."""
        i = self._index.pop(node_id, None)
        if i is None:
            return
        last = len(self._ids) - 1
        if i != last:
            moved = self._ids[last]
            self._index[moved] = i
            self._ids[i], self._statics[i], self._snaps[i] = moved, self._statics[last], self._snaps[last]
            self._rows[i] = self._rows[last]
            for rows in self._models.values():
                rows[i] = rows[last]
        self._ids.pop()
        self._statics.pop()
        self._snaps.pop()

    def _materialize(self, i: int) -> NodeSnapshot:
        assert self._build is not None  # only put_row leaves an entry unbuilt, and it needs `build`
        return self._build(self._ids[i], self._rows[i].tobytes())

    def sample(self, picks: "npt.NDArray[np.int64]", model: str) -> "SnapshotTable":
        """A table of the nodes at rows `picks`, with their columns for `model` (copied: later puts to this
        table do not change it; the snapshots built now)."""
        index = picks.tolist()
        return _frozen(
            [self[i] for i in index],
            [self._ids[i] for i in index],
            [self._statics[i] for i in index],
            self.rows().take(picks, axis=0),
            {model: self.model_rows(model).take(picks, axis=0)},
        )

    def snapshots(self) -> list[NodeSnapshot]:
        """A copy of the current snapshots (a decision keeps it; later puts do not change it)."""
        return [snap if snap is not None else self._materialize(i) for i, snap in enumerate(self._snaps)]

    def rows(self) -> Array:
        """The C_* columns of every node, one row per node in table order (a view: copy to keep)."""
        return self._rows[: len(self._ids)]

    def model_rows(self, model: str) -> Array:
        """The M_* columns of every node for `model` (built on first use, then kept current by every put and
        remove; a view: copy to keep)."""
        rows = self._models.get(model)
        if rows is None:
            joined = b"".join([static.model_row(model) for static in self._statics])
            rows = _grown(np.frombuffer(joined, dtype=np.float64).reshape(-1, N_MODEL_COLUMNS).copy(), len(self._rows))
            self._models[model] = rows
        return rows[: len(self._ids)]

    def view(self) -> "TableView":
        """This table plus snapshots appended for one decision (`append`); the table itself is not changed."""
        return TableView(self)


def _frozen(
    snaps: list[NodeSnapshot], ids: list[str], statics: list[NodeStatic], rows: Array, models: dict[str, Array]
) -> SnapshotTable:
    """A read-only table of built snapshots and copied columns (a sample, or a view with its extras)."""
    out = SnapshotTable.__new__(SnapshotTable)
    out._snaps = list(snaps)
    out._ids, out._statics = ids, statics
    out._index = {}  # read, never put to
    out._rows, out._models, out._build = rows, models, None
    return out


class TableView(SnapshotTable):
    """A table and a few snapshots after it, for one decision: reads see both, the table is not changed (a
    pipeline's virtual node joins the nodes for the request that asked for it, not for the next one)."""

    def __init__(self, base: SnapshotTable) -> None:  # no super().__init__: every read goes to `base` or `extra`
        self._base = base
        self._extra: list[NodeSnapshot] = []

    def append(self, snap: NodeSnapshot) -> None:
        self._extra.append(snap)

    def __len__(self) -> int:
        return len(self._base) + len(self._extra)

    def __getitem__(self, i: int) -> NodeSnapshot:  # type: ignore[override]
        n = len(self._base)
        j = i + len(self) if i < 0 else i
        if not 0 <= j < len(self):
            raise IndexError(i)
        return self._base[j] if j < n else self._extra[j - n]

    def __iter__(self) -> Iterator[NodeSnapshot]:
        return itertools.chain(self._base, self._extra)

    def get(self, node_id: str) -> NodeSnapshot | None:
        found = self._base.get(node_id)
        return found if found is not None else next((s for s in self._extra if s.node_id == node_id), None)

    def positions(self, node_ids: "Iterable[str]") -> list[int]:
        wanted = set(node_ids)
        n = len(self._base)
        return self._base.positions(wanted) + [n + i for i, s in enumerate(self._extra) if s.node_id in wanted]

    def put(self, snap: NodeSnapshot) -> None:
        raise TypeError("a table view is read-only: append, or put to its table")

    def put_row(self, node_id: str, static: NodeStatic, row: Sequence[float]) -> None:
        raise TypeError("a table view is read-only: append, or put to its table")

    def remove(self, node_id: str) -> None:
        raise TypeError("a table view is read-only")

    def snapshots(self) -> list[NodeSnapshot]:
        return self._base.snapshots() + self._extra

    def rows(self) -> Array:
        base = self._base.rows()
        return np.concatenate([base, _rows_of(self._extra)]) if self._extra else base

    def model_rows(self, model: str) -> Array:
        base = self._base.model_rows(model)
        return np.concatenate([base, _model_rows_of(self._extra, model)]) if self._extra else base

    def sample(self, picks: "npt.NDArray[np.int64]", model: str) -> SnapshotTable:
        n = len(self._base)
        outside = picks[picks >= n]
        if not len(outside):
            return self._base.sample(picks, model)
        base = self._base.sample(picks[picks < n], model)
        extra = [self._extra[i - n] for i in outside.tolist()]
        return _frozen(
            base.snapshots() + extra,
            base._ids + [s.node_id for s in extra],
            base._statics + [s.static for s in extra],
            np.concatenate([base.rows(), _rows_of(extra)]),
            {model: np.concatenate([base.model_rows(model), _model_rows_of(extra, model)])},
        )


def _rows_of(snaps: list[NodeSnapshot]) -> Array:
    return np.frombuffer(b"".join([s.row for s in snaps]), dtype=np.float64).reshape(-1, N_COLUMNS)


def _model_rows_of(snaps: list[NodeSnapshot], model: str) -> Array:
    joined = b"".join([s.static.model_row(model) for s in snaps])
    return np.frombuffer(joined, dtype=np.float64).reshape(-1, N_MODEL_COLUMNS)
