"""The prefix index against a plain model of per-node LRU caches (property test), and prompt block hashing."""

from collections import OrderedDict

from hypothesis import given, settings
from hypothesis import strategies as st

from gridserve.prefix import PrefixIndex, text_blocks
from gridserve.prefix.blocks import render
from gridserve.types import ChatMessage

NODES = ("a", "b", "c")
Op = tuple[str, str, tuple[int, ...]]


class Reference:
    """What each node holds, as an LRU cache of its own would: an OrderedDict per node, oldest first."""

    def __init__(self, default: int) -> None:
        self.held: dict[str, OrderedDict[int, None]] = {}
        self.cap: dict[str, int] = {}
        self.default = default

    def insert(self, node: str, blocks: tuple[int, ...]) -> None:
        lru = self.held.setdefault(node, OrderedDict())
        cap = self.cap.setdefault(node, self.default)
        if cap <= 0:
            return
        for b in blocks:
            lru.pop(b, None)
            lru[b] = None
        while len(lru) > cap:
            lru.popitem(last=False)

    def set_capacity(self, node: str, cap: int) -> None:
        self.cap[node] = max(0, cap)
        lru = self.held.setdefault(node, OrderedDict())
        while len(lru) > self.cap[node]:
            lru.popitem(last=False)

    def drop(self, node: str) -> None:
        self.held.pop(node, None)
        self.cap.pop(node, None)

    def match(self, blocks: tuple[int, ...]) -> dict[str, int]:
        out = {}
        for node, lru in self.held.items():
            n = 0
            while n < len(blocks) and blocks[n] in lru:
                n += 1
            if n:
                out[node] = n
        return out


# Prompts share prefixes (the same small alphabet of blocks, in chains), as turns of a conversation do.
blocks = st.lists(st.integers(0, 12), min_size=0, max_size=8).map(tuple)
ops = st.lists(
    st.one_of(
        st.tuples(st.just("insert"), st.sampled_from(NODES), blocks),
        st.tuples(st.just("capacity"), st.sampled_from(NODES), st.integers(0, 6).map(lambda n: (n,))),
        st.tuples(st.just("drop"), st.sampled_from(NODES), st.just(())),
    ),
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(ops, st.lists(blocks, min_size=1, max_size=4), st.integers(1, 6))
def test_the_index_agrees_with_per_node_lru_caches_through_churn(
    steps: list[Op], queries: list[tuple[int, ...]], default: int
) -> None:
    index, ref = PrefixIndex(default_capacity=default), Reference(default)
    for kind, node, arg in steps:
        if kind == "insert":
            index.insert(node, arg)
            ref.insert(node, arg)
        elif kind == "capacity":
            index.set_capacity(node, arg[0])
            ref.set_capacity(node, arg[0])
        else:
            index.drop(node)
            ref.drop(node)
        for n in NODES:  # never over capacity, and holds what the reference holds
            assert index.holds(n) == len(ref.held.get(n, ()))
            assert index.holds(n) <= index.capacity(n)
    for query in queries:
        # `match` is of leading blocks: the reference counts leading blocks a node holds in a row
        assert index.match(query) == {n: k for n, k in ref.match(query).items()}
    stats = index.stats()
    assert stats.holdings == sum(len(lru) for lru in ref.held.values())
    assert stats.blocks == len({b for lru in ref.held.values() for b in lru})


def test_match_is_longest_first_and_bounded() -> None:
    index = PrefixIndex()
    index.insert("short", (1, 2))
    index.insert("long", (1, 2, 3, 4))
    index.insert("other", (9,))
    assert index.match((1, 2, 3, 4, 5)) == {"long": 4, "short": 2}
    assert list(index.match((1, 2, 3, 4, 5), limit=1)) == ["long"]
    assert index.match((5, 1, 2)) == {}  # a match starts at the first block


def test_a_later_turn_extends_the_earlier_turns_blocks() -> None:
    first = [ChatMessage(role="system", content="You are terse. " * 40), ChatMessage(role="user", content="hi " * 30)]
    second = [*first, ChatMessage(role="assistant", content="hello " * 20), ChatMessage(role="user", content="more")]
    a, b = text_blocks(render(None, first)), text_blocks(render(None, second))
    assert len(a) >= 5 and b[: len(a)] == a  # every whole block of the first turn starts the second
    changed = [ChatMessage(role="system", content="You are wordy" + "." * 587), *first[1:]]
    c = text_blocks(render(None, changed))
    assert c[0] != a[0] and not set(c) & set(a)  # a change in the first block changes every block after it
    assert text_blocks("x" * 127) == []  # only whole blocks
    assert render("plain prompt", None) == "plain prompt"
