"""The gateway's prefix index: which blocks of prompts each node probably holds in its KV cache.

It trusts nothing a node says. It records what the gateway itself sent: every prompt dispatched to a node puts
that prompt's blocks in the node's cache, most recently used; a node holds at most its capacity in blocks and
drops the least recently used beyond it, as the node's own LRU cache would. A block is a chain hash (it names
its whole prefix, `blocks.py`), so a node's match for a prompt is the number of leading blocks it holds.

State, for N holdings (a block held by a node):
- `_lru[slot]`: one dict per node, block -> None, in use order (a touched block is popped and re-inserted at
  the end; the first key is the least recently used), whose length is the node's holding count;
- `_holders`: block -> the slot of its only holder (an int), or a tuple of slots when several hold it.
Memory per holding is one dict slot in each (~100 bytes with the block's int; `stats()` measures it) against
~1.4 KB a node of SGLang's router's radix tree.

Churn: `drop(node)` (a node marked down, restarted or gone) forgets all it held; `set_capacity` shrinks a
node's share at once. A failover puts the prompt on the node that took over (it prefilled it). One owner: the
gateway's event loop, or a simulator; not thread-safe.
"""

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

Holders = int | tuple[int, ...]
DEFAULT_CAPACITY_BLOCKS = 4096
"""Blocks a node holds until its capacity is set."""
_ABSENT = object()


@dataclass(frozen=True)
class IndexStats:
    nodes: int
    blocks: int
    """Distinct blocks held by at least one node."""
    holdings: int
    """(block, node) pairs."""


class PrefixIndex:
    def __init__(self, default_capacity: int = DEFAULT_CAPACITY_BLOCKS) -> None:
        """`default_capacity`: blocks a node holds until `set_capacity` says otherwise."""
        self._slots: dict[str, int] = {}
        self._names: list[str | None] = []
        self._free: list[int] = []
        self._lru: list[dict[int, None]] = []
        self._capacity: list[int] = []
        self._holders: dict[int, Holders] = {}
        self.default_capacity = default_capacity

    # -- reads ------------------------------------------------------------------------------------------------

    def match(self, blocks: Sequence[int], limit: int = 16) -> dict[str, int]:
        """Node -> how many leading `blocks` it holds (only nodes holding at least the first), at most `limit`
        nodes, longest matches first."""
        if not blocks:
            return {}
        live = _as_tuple(self._holders.get(blocks[0], ()))
        depth = {slot: 1 for slot in live}
        for i in range(1, len(blocks)):
            held = self._holders.get(blocks[i])
            if held is None:
                break
            nxt = [slot for slot in _as_tuple(held) if slot in depth and depth[slot] == i]
            if not nxt:
                break
            for slot in nxt:
                depth[slot] = i + 1
        best = sorted(depth.items(), key=lambda kv: -kv[1])[:limit]
        return {self._name(slot): n for slot, n in best}

    def holds(self, node: str) -> int:
        slot = self._slots.get(node)
        return 0 if slot is None else len(self._lru[slot])

    def capacity(self, node: str) -> int:
        slot = self._slots.get(node)
        return self.default_capacity if slot is None else self._capacity[slot]

    def stats(self) -> IndexStats:
        return IndexStats(len(self._slots), len(self._holders), sum(len(d) for d in self._lru))

    # -- writes -----------------------------------------------------------------------------------------------

    def insert(self, node: str, blocks: Iterable[int]) -> None:
        """`node` prefilled a prompt of these blocks: it now holds them, most recently used (beyond its capacity,
        its least recently used blocks go)."""
        slot = self._slot(node)
        lru, cap = self._lru[slot], self._capacity[slot]
        if cap <= 0:
            return
        for block in blocks:
            if lru.pop(block, _ABSENT) is _ABSENT:  # new to this node
                self._add_holder(block, slot)
            lru[block] = None
        self._evict(slot, cap)

    def set_capacity(self, node: str, blocks: int) -> None:
        slot = self._slot(node)
        self._capacity[slot] = max(0, blocks)
        self._evict(slot, self._capacity[slot])

    def drop(self, node: str) -> None:
        """The node's cache is gone (down, restarted, left): forget all it held."""
        slot = self._slots.pop(node, None)
        if slot is None:
            return
        for block in self._lru[slot]:
            self._remove_holder(block, slot)
        self._lru[slot] = {}
        self._names[slot] = None
        self._free.append(slot)

    # -- internals --------------------------------------------------------------------------------------------

    def _slot(self, node: str) -> int:
        slot = self._slots.get(node)
        if slot is not None:
            return slot
        if self._free:
            slot = self._free.pop()
            self._names[slot], self._capacity[slot] = node, self.default_capacity
        else:
            slot = len(self._names)
            self._names.append(node)
            self._lru.append({})
            self._capacity.append(self.default_capacity)
        self._slots[node] = slot
        return slot

    def _name(self, slot: int) -> str:
        name = self._names[slot]
        assert name is not None
        return name

    def _evict(self, slot: int, cap: int) -> None:
        lru = self._lru[slot]
        while len(lru) > cap:
            block = next(iter(lru))
            del lru[block]
            self._remove_holder(block, slot)

    def _add_holder(self, block: int, slot: int) -> None:
        held = self._holders.get(block)
        if held is None:
            self._holders[block] = slot
        elif isinstance(held, int):
            self._holders[block] = (held, slot)
        else:
            self._holders[block] = (*held, slot)

    def _remove_holder(self, block: int, slot: int) -> None:
        held = self._holders[block]
        if isinstance(held, int):
            del self._holders[block]
            return
        rest = tuple(s for s in held if s != slot)
        self._holders[block] = rest[0] if len(rest) == 1 else rest


def _as_tuple(held: Holders) -> tuple[int, ...]:
    return (held,) if isinstance(held, int) else held


__all__ = ["IndexStats", "PrefixIndex"]
