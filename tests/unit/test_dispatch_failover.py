"""A generation under way, over the scripted FakeTransport: a node that stalls, breaks, errs or garbles its
stream mid-answer hands the generation to the next-ranked node, which resumes after the tokens the client
already has (the text continues); failovers stop at `max_failovers`; a stream no other node could continue
waits the longer unresumable stall timeout; a client that goes away closes the node's stream. The stall timer
does not count time the gateway's own event loop could not run."""

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import pytest
from tests.unit.dispatch_support import CONFIG, Grid, job, store_writer

from gridserve.gateway.dispatch import stall
from gridserve.gateway.dispatch.generation import Generation, GenerationFailed
from gridserve.gateway.transport import BrokenStream, Malformed
from gridserve.gateway.transport.fake import Busy, Delay, Emit, Fail, Finish, Stall, Step, Tokens
from gridserve.store import StoreWriter
from gridserve.types import NodeId, NodeState

STALL_S = CONFIG.stall_min_s


@pytest.fixture(scope="module")
def writer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StoreWriter]:
    yield from store_writer(tmp_path_factory.mktemp("store"))


@pytest.fixture
def grid(writer: StoreWriter) -> Grid:
    return Grid(writer, nodes=4)


def generate(
    grid: Grid, *, max_tokens: int = 16, itl: float | None = 0.001, step_s: float | None = None
) -> tuple[Generation, list[dict[str, Any]]]:
    """Run one generation to its end; returns it and the events the client got."""
    gen = Generation(grid.dispatcher, grid.decision(itl=itl, step_s=step_s), job(max_tokens), hedge=False)

    async def go() -> list[dict[str, Any]]:
        await gen.open()
        try:
            return [event async for event in gen.events()]
        finally:
            gen.close()

    return gen, asyncio.run(go())


def text(events: list[dict[str, Any]]) -> str:
    return "".join(e.get("text", "") for e in events)


def whole(n: int) -> str:
    return "".join(f"<{i}>" for i in range(n))


def test_a_stall_mid_stream_fails_over_and_the_text_continues(grid: Grid) -> None:
    grid.fake.script("n1", Tokens(3, every_s=0.002), Stall())
    grid.fake.script("n2", Tokens(5, every_s=0.002), Finish())
    gen, events = generate(grid)
    assert text(events) == whole(8) and events[-1]["finish_reason"] == "stop"
    assert gen.failovers == 1 and grid.count("gridserve_failovers_total") == 1
    assert grid.fake.calls_to("n2")[0].job.resume == (0, 1, 2)  # resumed after what the client had
    first, second = gen.segments
    assert (first.outcome, second.outcome) == ("failed", "ok") and first.detail.startswith("stalled: no token")
    assert all(c.closed for c in grid.fake.calls)
    assert grid.outstanding("n1") == grid.outstanding("n2") == 0
    assert grid.state("n1") == NodeState.UP  # silent is not gone: probes and heartbeats decide that


def test_a_stream_that_breaks_fails_over_and_takes_the_node_out_of_rotation(grid: Grid) -> None:
    grid.fake.script("n1", Tokens(2), Fail(BrokenStream("reset by peer", cause="ClientPayloadError")))
    grid.fake.script("n2", Tokens(3), Finish())
    gen, events = generate(grid)
    assert text(events) == whole(5) and gen.segments[0].detail == "connection lost (ClientPayloadError)"
    assert grid.state("n1") == NodeState.DOWN


@pytest.mark.parametrize(
    "failure",
    [Emit({"error": {"message": "CUDA error"}}), Fail(Malformed("not JSON", cause="JSONDecodeError"))],
    ids=["engine-error", "garbled-line"],
)
def test_an_engine_error_or_a_garbled_line_fails_over_without_marking_the_node_down(grid: Grid, failure: Step) -> None:
    grid.fake.script("n1", Tokens(2), failure)
    grid.fake.script("n2", Tokens(2), Finish())
    gen, events = generate(grid)
    assert text(events) == whole(4) and gen.failovers == 1 and grid.state("n1") == NodeState.UP


def test_a_node_busy_with_other_streams_keeps_its_stream_past_the_stall_timeout(grid: Grid) -> None:
    """Busy lines (the node's engine stepping other streams, such as another prompt's prefill on a CPU node) say
    the node is alive: a pause of several stall timeouts with them is not a stall, and no busy line reaches
    the client."""
    pause = 4 * STALL_S
    grid.fake.script("n1", Tokens(2), Busy(pause, every_s=STALL_S / 4), Tokens(2), Finish())
    grid.fake.script("n2", Tokens(2), Finish())
    gen, events = generate(grid)
    assert text(events) == whole(4) and gen.failovers == 0 and not grid.fake.calls_to("n2")
    assert not any("busy" in e for e in events)


def test_the_same_pause_without_busy_lines_is_a_stall(grid: Grid) -> None:
    grid.fake.script("n1", Tokens(2), Delay(4 * STALL_S), Tokens(2), Finish())
    grid.fake.script("n2", Tokens(2), Finish())
    gen, events = generate(grid)
    assert text(events) == whole(4) and gen.failovers == 1 and gen.segments[0].detail.startswith("stalled")


def test_an_interleaved_node_may_take_its_longest_step_between_two_tokens(grid: Grid) -> None:
    """On an interleaved node (gridserve's own engines) another prompt's prefill chunk runs between two of a stream's
    tokens, as one step with no busy line until it ends: the stall timeout allows for that step (10 x
    Candidate.step_s), so the pause that is a stall on a batched node is not one here; a pause past it still is."""
    step = 2 * STALL_S  # stall timeout 10 x step = 20 x STALL_S
    grid.fake.script("n1", Tokens(2), Delay(4 * STALL_S), Tokens(2), Finish())
    grid.fake.script("n2", Tokens(2), Finish())
    gen, events = generate(grid, step_s=step)
    assert text(events) == whole(4) and gen.failovers == 0 and not grid.fake.calls_to("n2")
    grid.fake.script("n1", Tokens(2), Delay(30 * STALL_S), Tokens(2), Finish())
    grid.fake.script("n2", Tokens(2), Finish())
    gen, events = generate(grid, step_s=step)
    assert text(events) == whole(4) and gen.failovers == 1 and gen.segments[0].detail.startswith("stalled")


def test_a_node_that_claims_to_be_busy_forever_stalls_after_stall_busy_max_s(grid: Grid) -> None:
    grid.fake.script("n1", Tokens(2), Busy(100 * CONFIG.stall_busy_max_s, every_s=STALL_S / 4))
    grid.fake.script("n2", Tokens(2), Finish())
    started = time.monotonic()
    gen, events = generate(grid)
    waited = time.monotonic() - started
    assert text(events) == whole(4) and gen.failovers == 1
    assert CONFIG.stall_busy_max_s <= waited < 10 * CONFIG.stall_busy_max_s


def test_a_stream_that_ends_without_its_last_event_fails_over(grid: Grid) -> None:
    grid.fake.script("n1", Tokens(2))  # ends cleanly, but no finish_reason
    grid.fake.script("n2", Tokens(1), Finish())
    gen, events = generate(grid)
    assert text(events) == whole(3) and gen.segments[0].detail == "stream ended before its last event"


def test_when_only_the_closing_event_was_lost_the_gateway_ends_the_answer_itself(grid: Grid) -> None:
    grid.fake.script("n1", Tokens(4), Fail(BrokenStream("reset", cause="ServerDisconnectedError")))
    gen, events = generate(grid, max_tokens=4)
    assert text(events) == whole(4) and events[-1]["finish_reason"] == "length"
    assert gen.failovers == 0 and not grid.fake.calls_to("n2")


def test_failovers_stop_at_max_failovers(grid: Grid, writer: StoreWriter) -> None:
    grid = Grid(writer, nodes=5)
    for node_id in grid.ids:
        grid.fake.script(node_id, Tokens(1), Stall())
    with pytest.raises(GenerationFailed, match=f"after {CONFIG.max_failovers} failovers"):
        generate(grid)
    assert len(grid.fake.calls) == CONFIG.max_failovers + 1 and all(c.closed for c in grid.fake.calls)
    assert all(grid.outstanding(n) == 0 for n in grid.ids)


def test_with_no_node_left_to_take_over_the_generation_fails(grid: Grid) -> None:
    grid.fake.script("n1", Tokens(1), Stall())
    for node_id in ("n2", "n3", "n4"):
        grid.fake.script(node_id, Fail(BrokenStream("reset", cause="ClientOSError")))
    with pytest.raises(GenerationFailed, match="no node took over"):
        generate(grid)


def test_an_unresumable_stream_waits_the_longer_stall_timeout(grid: Grid) -> None:
    pause = (STALL_S + CONFIG.stall_unresumable_s) / 2  # a stall for a resumable stream, not for this one
    grid.fake.script("n1", Emit({"text": "a"}), Delay(pause), Emit({"text": "b"}), Finish())
    gen, events = generate(grid)
    assert text(events) == "ab" and gen.failovers == 0 and not gen.resumable


def test_an_unresumable_stream_that_stalls_fails_without_failover(grid: Grid) -> None:
    grid.fake.script("n1", Emit({"text": "a"}), Stall())
    started = time.monotonic()
    with pytest.raises(GenerationFailed, match="cannot be continued elsewhere"):
        generate(grid)
    assert time.monotonic() - started >= CONFIG.stall_unresumable_s and not grid.fake.calls_to("n2")


def test_a_lone_node_slower_than_the_stall_timeout_keeps_its_stream(writer: StoreWriter) -> None:
    """With no other live node to take over, a pause past the stall timeout is a slow node, not a reason to end
    the client's answer: the stream waits the unresumable stall timeout (a lone CPU node under load)."""
    grid = Grid(writer, nodes=2)
    grid.membership.mark_failed(NodeId("n2"), "test: down")
    pause = (STALL_S + CONFIG.stall_unresumable_s) / 2
    grid.fake.script("n1", Tokens(2), Delay(pause), Tokens(2), Finish())
    gen, events = generate(grid)
    assert text(events) == whole(4) and gen.failovers == 0 and gen.resumable
    assert not grid.fake.calls_to("n2") and grid.count("gridserve_failovers_total") == 0


def test_a_lone_node_that_stays_silent_fails_after_the_unresumable_stall_timeout(writer: StoreWriter) -> None:
    grid = Grid(writer, nodes=1)
    grid.fake.script("n1", Tokens(1), Stall())
    started = time.monotonic()
    with pytest.raises(GenerationFailed, match=r"stalled: no token for 0\.20 s\); no node took over"):
        generate(grid)
    assert time.monotonic() - started >= CONFIG.stall_unresumable_s


def test_a_stall_with_a_live_runner_up_still_fails_over_at_the_short_timeout(grid: Grid) -> None:
    grid.fake.script("n1", Tokens(1), Stall())
    grid.fake.script("n2", Tokens(1), Finish())
    started = time.monotonic()
    gen, events = generate(grid)
    assert text(events) == whole(2) and gen.failovers == 1
    assert time.monotonic() - started < CONFIG.stall_unresumable_s


def test_a_node_without_a_predicted_itl_gets_the_unpredicted_stall_timeout(grid: Grid) -> None:
    assert grid.dispatcher.stall_timeout(grid.decision(itl=None).candidates[0]) == CONFIG.stall_unpredicted_s
    assert grid.dispatcher.stall_timeout(grid.decision(itl=0.02).candidates[0]) == 0.02 * CONFIG.stall_itl_multiple


def test_a_client_that_goes_away_closes_the_nodes_stream(grid: Grid) -> None:
    grid.fake.script("n1", Tokens(100, every_s=0.001), Finish())
    gen = Generation(grid.dispatcher, grid.decision(), job(200), hedge=False)

    async def go() -> None:
        await gen.open()
        async for event in gen.events():
            if event["token_ids"] == [5]:
                break
        gen.close()

    asyncio.run(go())
    call = grid.fake.calls[0]
    assert call.closed and call.tokens < 100 and gen.segment.outcome == "cancelled"
    assert grid.outstanding("n1") == 0


# -- the stall timer and a starved event loop ------------------------------------------------------------


def generate_while_starved(grid: Grid, block_s: float) -> tuple[Generation, list[dict[str, Any]]]:
    """Run a generation whose gateway loop is starved for `block_s` (a synchronous pause, as a long computation
    or a collection would cause) 2 ms after the client got token 1, while the stall timer for the next runs."""
    gen = Generation(grid.dispatcher, grid.decision(), job(), hedge=False)

    async def go() -> list[dict[str, Any]]:
        events = []
        await gen.open()
        try:
            async for event in gen.events():
                events.append(event)
                if event.get("token_ids") == [1]:
                    asyncio.get_running_loop().call_later(0.002, time.sleep, block_s)
        finally:
            gen.close()
        return events

    return gen, asyncio.run(go())


def test_a_starved_event_loop_is_not_taken_for_a_stalled_node(grid: Grid) -> None:
    grid.fake.script("n1", Tokens(10, every_s=0.02), Finish())  # a token every 20 ms, stall timeout 50 ms
    gen, events = generate_while_starved(grid, block_s=3 * STALL_S)  # the gateway does not run for 150 ms
    assert text(events) == whole(10) and gen.failovers == 0 and not grid.fake.calls_to("n2")


def test_the_starved_loop_scenario_is_a_stall_when_lateness_is_not_forgiven(
    grid: Grid, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The control for the test above: without the lateness rule the same run fails over."""
    monkeypatch.setattr(stall, "LATE_TOLERANCE_S", float("inf"))
    grid.fake.script("n1", Tokens(10, every_s=0.02), Finish())
    grid.fake.script("n2", Tokens(10), Finish())
    gen, _ = generate_while_starved(grid, block_s=3 * STALL_S)
    assert gen.failovers == 1 and gen.segments[0].detail.startswith("stalled")


def test_a_silent_node_is_still_declared_stalled_after_the_loop_was_starved(grid: Grid) -> None:
    grid.fake.script("n1", Tokens(2), Stall())
    grid.fake.script("n2", Tokens(2), Finish())
    started = time.monotonic()
    gen, events = generate_while_starved(grid, block_s=3 * STALL_S)
    elapsed = time.monotonic() - started
    assert text(events) == whole(4) and gen.failovers == 1
    assert elapsed < 3 * STALL_S + 2 * STALL_S + 0.05  # the extension is bounded by one stall timeout


def test_a_stream_read_token_by_token_sets_its_stall_timer_once_per_timeout_not_per_token(
    grid: Grid, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stall timer moves lazily: 40 tokens a millisecond apart (each read waits) arm it about once per stall
    timeout of the stream's length, not once per token; the stream is not taken for stalled."""
    grid.fake.script("n1", Tokens(40, every_s=0.001), Finish())
    armed: list[float] = []
    arm = stall.StallWatch._arm

    def counted(watch: stall.StallWatch, deadline: float) -> None:
        had = watch.handle
        arm(watch, deadline)
        if watch.handle is not had:
            armed.append(deadline)

    monkeypatch.setattr(stall.StallWatch, "_arm", counted)
    started = time.monotonic()
    gen, events = generate(grid, max_tokens=40)
    elapsed = time.monotonic() - started
    assert text(events) == whole(40) and gen.failovers == 0
    assert 1 <= len(armed) <= 2 + elapsed / STALL_S, (len(armed), elapsed)
    assert len(armed) < 20, len(armed)
