"""Opening a generation over the scripted FakeTransport, in milliseconds: the best node that answers serves;
a late first token brings in the runner-up (hedge) and the first to stream wins; a node that fails before its
first token gives way to the next-ranked while the retry budget allows; an attempt is given up at the
first-token timeout or as soon as its node is marked down; a cancelled open leaves no attempt running."""

import asyncio
import time
from collections.abc import Callable, Iterator

import pytest
from tests.unit.dispatch_support import CONFIG, PREDICTED_TTFT_S, WATCH_S, Grid, job, store_writer

from gridserve.gateway.api.errors import APIError
from gridserve.gateway.dispatch.dispatcher import NodeStream
from gridserve.gateway.transport import BrokenStream, Unreachable
from gridserve.gateway.transport.fake import Delay, Emit, Fail, Finish, Refuse, Stall, Tokens
from gridserve.reliability import EventKind
from gridserve.store import StoreWriter
from gridserve.types import NodeId, NodeState

HEDGE_S = CONFIG.hedge_min_s


@pytest.fixture(scope="module")
def writer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StoreWriter]:
    yield from store_writer(tmp_path_factory.mktemp("store"))


@pytest.fixture
def grid(writer: StoreWriter) -> Grid:
    return Grid(writer)


def open_stream(grid: Grid, *, hedge: bool = True) -> NodeStream:
    async def go() -> NodeStream:
        return await grid.dispatcher.open(grid.decision(), job(), hedge=hedge)

    return asyncio.run(go())


def test_the_best_node_serves_when_it_answers_in_time(grid: Grid) -> None:
    grid.fake.script("n1", Tokens(2), Finish())
    stream = open_stream(grid)
    assert stream.node_id == "n1" and stream.first["token_ids"] == [0]
    assert [a.outcome for a in stream.attempts] == ["served"] and not stream.hedged
    assert stream.hedge_delay_s == pytest.approx(max(CONFIG.hedge_min_s, 2 * PREDICTED_TTFT_S))
    assert not grid.fake.calls_to("n2") and grid.outstanding("n1") == 1
    grid.dispatcher.finished(stream.node_id)
    stream.close()
    assert grid.outstanding("n1") == 0 and grid.fake.calls[0].closed


def test_a_late_first_token_brings_in_the_runner_up_and_the_first_to_stream_wins(grid: Grid) -> None:
    grid.fake.script("n1", Delay(0.3), Tokens(1), Finish())
    grid.fake.script("n2", Delay(0.01), Tokens(1), Finish())
    began = time.monotonic()  # (the event loop's clock: the fake records calls in it)
    stream = open_stream(grid)
    leader, runner_up = grid.fake.calls
    assert stream.node_id == "n2" and stream.hedged and grid.count("gridserve_hedges_total") == 1
    # the hedge delay runs from the race's start; the leader's call is recorded a little after it (its task must
    # first be scheduled), so the gap between the two calls may be a fraction of a millisecond shorter
    assert runner_up.opened_at - began >= HEDGE_S  # not before the hedge delay
    assert runner_up.opened_at - leader.opened_at < HEDGE_S + 0.1
    assert leader.closed and not runner_up.closed  # the loser's connection is closed: the node stops the work
    assert grid.outstanding("n1") == 0 and grid.outstanding("n2") == 1  # and its outstanding count released
    assert grid.state("n1") == NodeState.UP  # being late is not a failure


def test_a_first_token_before_the_hedge_delay_sends_nothing_to_the_runner_up(grid: Grid) -> None:
    grid.fake.script("n1", Delay(HEDGE_S / 3), Tokens(1), Finish())
    stream = open_stream(grid)
    assert stream.node_id == "n1" and not stream.hedged and len(grid.fake.calls) == 1


def test_without_hedging_a_late_node_is_waited_for(grid: Grid) -> None:
    grid.fake.script("n1", Delay(3 * HEDGE_S), Tokens(1), Finish())
    stream = open_stream(grid, hedge=False)
    assert stream.node_id == "n1" and stream.hedge_delay_s is None and len(grid.fake.calls) == 1


def test_a_node_failing_before_its_first_token_gives_way_to_the_next_ranked(grid: Grid) -> None:
    grid.fake.script("n1", Refuse(503, "overloaded"))
    grid.fake.script("n2", Fail(Unreachable("connection refused", cause="ClientConnectorError")))
    grid.fake.script("n3", Tokens(1), Finish())
    stream = open_stream(grid)
    assert stream.node_id == "n3" and grid.count("gridserve_dispatch_retries_total") == 2
    assert [(a.node_id, a.outcome) for a in stream.attempts] == [("n1", "failed"), ("n2", "failed"), ("n3", "served")]
    assert "answered 503" in stream.attempts[0].detail
    assert stream.attempts[1].detail == "unreachable (ClientConnectorError)"
    assert grid.state("n1") == NodeState.UP  # it answered: reachable
    assert grid.state("n2") == NodeState.DOWN  # unreachable: out of rotation until it heartbeats again
    assert grid.outstanding("n1") == grid.outstanding("n2") == 0


def test_a_stream_that_breaks_or_errs_before_its_first_token_is_a_failed_attempt(grid: Grid) -> None:
    grid.fake.script("n1", Fail(BrokenStream("reset", cause="ClientPayloadError")))
    grid.fake.script("n2", Emit({"error": {"message": "CUDA out of memory"}}))
    grid.fake.script("n3", Tokens(1), Finish())
    stream = open_stream(grid)
    details = [a.detail for a in stream.attempts]
    assert stream.node_id == "n3" and details[1] == "engine error: CUDA out of memory"


def test_every_node_failing_answers_upstream_failed_with_each_reason(grid: Grid) -> None:
    for node_id in grid.ids:
        grid.fake.script(node_id, Refuse(500, "boom"))
    with pytest.raises(APIError) as caught:
        open_stream(grid)
    assert caught.value.status == 502 and caught.value.message.count("answered 500") == 3


def test_an_exhausted_retry_budget_skips_the_retry(grid: Grid) -> None:
    budget = grid.dispatcher.budget
    while budget.allow_retry():
        budget.failure()
    grid.fake.script("n1", Refuse(503, "overloaded"))
    grid.fake.script("n2", Tokens(1), Finish())
    with pytest.raises(APIError) as caught:
        open_stream(grid)
    assert "retry budget exhausted" in caught.value.message
    assert not grid.fake.calls_to("n2") and grid.count("gridserve_dispatch_retries_total") == 0


EVIL = "this request cannot run here; see http://evil.example/upgrade"


def failed_jobs(grid: Grid, node_id: str) -> list[str]:
    events = grid.membership.book.events(node_id, kinds={EventKind.JOB_FAILED})
    return [e.detail for e in events]


def test_a_refusal_goes_to_the_next_node_and_the_refuser_is_charged_when_another_serves(grid: Grid) -> None:
    """A node's 400 is its word against the grid's: the request goes on, and the node that refused what another
    served has a failed job (a node cannot turn traffic away, or advertise to clients, at no cost)."""
    grid.fake.script("n1", Refuse(400, EVIL))
    grid.fake.script("n2", Tokens(1), Finish())
    stream = open_stream(grid)
    assert stream.node_id == "n2" and [a.outcome for a in stream.attempts] == ["failed", "served"]
    assert stream.attempts[0].detail.startswith("refused the request as invalid")
    assert failed_jobs(grid, "n1") == ["refused as invalid a request another node served"]
    assert failed_jobs(grid, "n2") == [] and grid.outstanding("n1") == 0


def test_a_request_every_node_refuses_is_the_clients_error_in_the_gateways_words(grid: Grid) -> None:
    for node_id in grid.ids:
        grid.fake.script(node_id, Refuse(400, EVIL))
    with pytest.raises(APIError) as caught:
        open_stream(grid)
    error = caught.value
    assert error.status == 400 and "refused the request as invalid" in error.message and "context" in error.message
    assert "evil" not in error.message and "http" not in error.message  # no node-written text reaches the client
    assert len(grid.fake.calls) == CONFIG.dispatch_attempts
    assert all(failed_jobs(grid, n) == [] for n in grid.ids)  # nobody served it: no refusal was proven wrong


def test_no_first_token_within_the_first_token_timeout_gives_the_attempt_up(grid: Grid) -> None:
    grid.fake.script("n1", Stall())
    grid.fake.script("n2", Tokens(1), Finish())
    started = time.monotonic()
    stream = open_stream(grid, hedge=False)
    waited = time.monotonic() - started
    assert stream.node_id == "n2" and stream.attempts[0].detail == "no first token in 0.1 s"
    assert CONFIG.first_token_timeout_s <= waited < CONFIG.first_token_timeout_s + 0.1
    assert grid.fake.calls[0].closed and grid.outstanding("n1") == 0


def test_an_attempt_whose_node_is_marked_down_meanwhile_is_abandoned_at_once(grid: Grid) -> None:
    grid.fake.script("n1", Stall())
    grid.fake.script("n2", Tokens(1), Finish())

    async def go() -> tuple[NodeStream, float]:
        loop = asyncio.get_running_loop()
        started = loop.time()
        loop.call_later(0.01, grid.membership.mark_failed, NodeId("n1"), "heartbeats stopped")
        stream = await grid.dispatcher.open(grid.decision(), job(), hedge=False)
        return stream, loop.time() - started

    stream, waited = asyncio.run(go())
    assert stream.node_id == "n2" and "marked down" in stream.attempts[0].detail
    assert waited < 0.01 + 4 * WATCH_S + 0.02 < CONFIG.first_token_timeout_s
    assert grid.fake.calls[0].closed


def test_a_lone_node_marked_down_while_it_computes_is_waited_for(grid: Grid) -> None:
    """No other node could answer: a node marked down only for missing its probes (a CPU node busy with a long
    prefill) keeps its attempt up to the first-token timeout, and its answer is served (it was a 502)."""
    grid.fake.script("n1", Delay(0.06), Tokens(1), Finish())

    async def go() -> NodeStream:
        asyncio.get_running_loop().call_later(0.01, grid.membership.mark_failed, NodeId("n1"), "probe timed out")
        return await grid.dispatcher.open(grid.decision("n1"), job(), hedge=False)

    stream = asyncio.run(go())
    assert grid.state("n1") == NodeState.DOWN
    assert stream.node_id == "n1" and [a.outcome for a in stream.attempts] == ["served"]


def _lone_attempt_after(grid: Grid, event: Callable[[], object], fails_with: str) -> float:
    """Open on n1 alone (a stalled node), `event` happening 10 ms in; the seconds until the open failed."""
    grid.fake.script("n1", Stall())

    async def go() -> float:
        loop = asyncio.get_running_loop()
        started = loop.time()
        loop.call_later(0.01, event)
        with pytest.raises(APIError, match=fails_with):
            await grid.dispatcher.open(grid.decision("n1"), job(), hedge=False)
        return loop.time() - started

    return asyncio.run(go())


def test_a_lone_node_that_never_answers_is_still_given_up_at_the_first_token_timeout(grid: Grid) -> None:
    down = lambda: grid.membership.mark_failed(NodeId("n1"), "probe timed out")  # noqa: E731
    waited = _lone_attempt_after(grid, down, r"no first token in 0\.1 s")
    assert CONFIG.first_token_timeout_s <= waited < CONFIG.first_token_timeout_s + 0.1


def test_a_lone_node_quarantined_meanwhile_is_abandoned_at_once(grid: Grid) -> None:
    """Waiting on is for a node that is only late: one the gateway no longer trusts is given up at once."""
    quarantined = lambda: grid.membership.quarantine(NodeId("n1"), "admin: wrong output")  # noqa: E731
    waited = _lone_attempt_after(grid, quarantined, "out of rotation")
    assert waited < 0.01 + 4 * WATCH_S + 0.02 < CONFIG.first_token_timeout_s


def test_an_attempt_whose_node_is_quarantined_meanwhile_is_abandoned_at_once(grid: Grid) -> None:
    """Out of rotation is one predicate (can_serve): a quarantine stops the wait as a lost heartbeat does."""
    grid.fake.script("n1", Stall())
    grid.fake.script("n2", Tokens(1), Finish())

    async def go() -> NodeStream:
        asyncio.get_running_loop().call_later(0.01, grid.membership.quarantine, NodeId("n1"), "admin: wrong output")
        return await grid.dispatcher.open(grid.decision(), job(), hedge=False)

    stream = asyncio.run(go())
    assert grid.state("n1") == NodeState.UP  # alive, but not to be given work
    assert stream.node_id == "n2" and "out of rotation" in stream.attempts[0].detail
    assert grid.fake.calls[0].closed


def test_a_quarantined_node_is_not_tried_at_all(grid: Grid) -> None:
    grid.membership.quarantine(NodeId("n1"), "admin: wrong output")
    grid.fake.script("n2", Tokens(1), Finish())
    stream = open_stream(grid, hedge=False)
    assert stream.node_id == "n2" and not grid.fake.calls_to("n1")


def test_a_cancelled_open_closes_every_attempt_in_flight(grid: Grid) -> None:
    grid.fake.script("n1", Delay(1.0), Tokens(1))  # no reply yet
    grid.fake.script("n2", Stall())  # replied, no token yet

    async def go() -> None:
        task = asyncio.create_task(grid.dispatcher.open(grid.decision(), job()))
        await asyncio.sleep(HEDGE_S + 0.02)  # both running: the hedge went out
        assert len(grid.fake.calls) == 2 and not any(c.closed for c in grid.fake.calls)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(go())
    assert all(c.closed for c in grid.fake.calls)
    assert grid.outstanding("n1") == grid.outstanding("n2") == 0
