"""A simulated node's prefix cache: the ground truth of what its KV memory holds, in blocks of a trace's block ids
(`trace.TOKENS_PER_BLOCK` tokens each), least recently used out beyond its capacity.

The gateway's `PrefixIndex` guesses this from what it sent; this is what the node actually holds, which churn
empties (a node that leaves loses it, whatever the index still believes) and which decides a prefill's cost.
"""

from collections.abc import Iterable, Sequence

_ABSENT = object()


class BlockCache:
    def __init__(self, capacity: int) -> None:
        self.capacity = max(0, capacity)
        self._lru: dict[int, None] = {}
        """Block -> None in use order: the first key is the least recently used."""

    def __len__(self) -> int:
        return len(self._lru)

    def __contains__(self, block: int) -> bool:
        return block in self._lru

    def match(self, blocks: Sequence[int]) -> int:
        """How many leading `blocks` the cache holds (a prefill reuses only a prefix)."""
        lru = self._lru
        n = 0
        for block in blocks:
            if block not in lru:
                break
            n += 1
        return n

    def insert(self, blocks: Iterable[int]) -> None:
        """A prompt of these blocks was prefilled: they are held, most recently used; beyond the capacity the least
        recently used go."""
        if self.capacity <= 0:
            return
        lru = self._lru
        for block in blocks:
            lru.pop(block, _ABSENT)
            lru[block] = None
        excess = len(lru) - self.capacity
        if excess > 0:
            for block in list(_first(lru, excess)):
                del lru[block]

    def clear(self) -> None:
        self._lru.clear()


def _first(lru: dict[int, None], n: int) -> Iterable[int]:
    it = iter(lru)
    for _ in range(n):
        yield next(it)


__all__ = ["BlockCache"]
