"""A node's heap after start and after each load (node/heap.py): what is alive is frozen out of the collector's
reach (full collections skip it), and what comes later is still collected."""

import gc
import weakref
from collections.abc import Iterator

import pytest

from gridserve.node.heap import settle_heap


class _Cycle:
    def __init__(self) -> None:
        self.me = self


@pytest.fixture
def thawed() -> Iterator[None]:
    """The test process's heap as it was (this test freezes it)."""
    try:
        yield
    finally:
        gc.unfreeze()


def test_what_is_alive_is_frozen_and_what_comes_later_is_collected(thawed: None) -> None:
    loaded = [_Cycle() for _ in range(1000)]  # a model's modules, say
    settle_heap("a test load")
    assert gc.get_freeze_count() >= len(loaded)
    tracked = {id(o) for o in gc.get_objects()}  # (the permanent generation's objects are not among them)
    assert not any(id(x) in tracked for x in loaded)
    later = _Cycle()  # a request's garbage: a cycle no one holds
    gone = weakref.ref(later)
    del later
    gc.collect()
    assert gone() is None


def test_garbage_made_before_the_load_is_collected_not_frozen(thawed: None) -> None:
    garbage = _Cycle()
    gone = weakref.ref(garbage)
    del garbage
    settle_heap("a test load")
    assert gone() is None
