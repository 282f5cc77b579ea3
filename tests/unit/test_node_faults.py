"""The node's injected stall (node/faults.py): a node told to stall after N tokens sends no event past them and
never finishes an answer once N tokens are out, however short the answer; an answer of fewer tokens is sent whole."""

import asyncio
from collections.abc import AsyncIterator, Sequence

import pytest

from gridserve.engines import EngineStats
from gridserve.node.faults import Faults, FaultSpec
from gridserve.types import TokenEvent

WAIT_S = 0.2
"""How long a stalled generation is given to send more (it hangs forever; the test stops waiting)."""


async def _events(tokens: Sequence[int]) -> AsyncIterator[TokenEvent]:
    for token in tokens:
        yield TokenEvent(text="x", token_ids=(token,))
    yield TokenEvent(finish_reason="stop", completion_tokens=len(tokens))


async def _received(stall_after: int, tokens: Sequence[int]) -> tuple[list[TokenEvent], bool]:
    """The events a client got before the node stalled, and whether the answer finished."""
    faults = Faults(allowed=True, initial=FaultSpec(stall_after_tokens=stall_after))
    stats = EngineStats()
    got: list[TokenEvent] = []

    async def drain() -> None:
        async for event in faults.apply(_events(tokens), stats):
            got.append(event)

    try:
        await asyncio.wait_for(drain(), WAIT_S)
    except TimeoutError:
        return got, False
    return got, True


@pytest.mark.parametrize(
    ("stall_after", "tokens", "sent", "finished"),
    [
        (0, [], 0, False),  # end-of-sequence first: the empty answer's end is withheld too
        (0, [5, 6], 0, False),
        (2, [5, 6], 2, False),  # two tokens out, then the end is withheld
        (2, [5, 6, 7], 2, False),
        (3, [5, 6], 3, True),  # shorter than the stall point: sent whole (2 tokens and the end)
    ],
)
def test_a_stalling_node_sends_nothing_past_its_tokens(
    stall_after: int, tokens: list[int], sent: int, finished: bool
) -> None:
    got, done = asyncio.run(_received(stall_after, tokens))
    assert (len(got), done) == (sent, finished)
    assert sum(len(e.token_ids) for e in got) <= stall_after
    assert any(e.finish_reason for e in got) == finished
