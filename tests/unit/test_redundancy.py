"""Redundancy checks (gateway/integrity/redundancy.py) over a real Membership and Dispatcher with a scripted
transport: who is asked again, and the verdicts; answers with log-probabilities agree only when the numbers the
nodes claim for the same tokens lie within the tolerance."""

import asyncio
import dataclasses
import time
from collections.abc import Iterator

import pytest
from tests.unit.dispatch_support import CONFIG, IDENTITY, store_writer

from gridserve.gateway.dispatch.dispatcher import Dispatcher
from gridserve.gateway.integrity.redundancy import (
    LOGPROB_TOLERANCE,
    Answer,
    RedundancyChecker,
    agree,
    difference,
    divergence,
    scored,
    scored_divergence,
)
from gridserve.gateway.ops.metrics import GatewayMetrics
from gridserve.gateway.registry.events import Registered
from gridserve.gateway.registry.membership import Membership
from gridserve.gateway.registry.whitewash import signals_of
from gridserve.gateway.transport.fake import Emit, FakeTransport, Finish, Refuse
from gridserve.reliability import EventKind, Severity
from gridserve.store import StoreWriter
from gridserve.trust import EnvelopeVerifier, FreshnessPolicy
from gridserve.types import Capability, GenerateRequest, HardwareInfo, ModelOffer, NodeId, RuntimeInfo, SamplingParams

MODEL = "big-model"


@pytest.fixture(scope="module")
def writer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StoreWriter]:
    yield from store_writer(tmp_path_factory.mktemp("redundancy"))


class Grid:
    """Nodes serving MODEL, each at an endpoint host and registered from an address of the test's choosing."""

    def __init__(self, writer: StoreWriter, strikes: int = 1) -> None:
        verifier = EnvelopeVerifier(FreshnessPolicy(), time.time)
        self.membership = Membership(CONFIG, verifier, writer, GatewayMetrics())
        self.fake = FakeTransport()
        self.dispatcher = Dispatcher(CONFIG, self.membership, IDENTITY, self.membership.metrics, self.fake)
        config = dataclasses.replace(CONFIG, redundancy_strikes=strikes)
        self.checker = RedundancyChecker(config, self.dispatcher, self.membership.metrics)

    def add(
        self,
        node_id: str,
        host: str,
        address: str = "",
        *,
        digest: str = "upstream:m",
        engine: str = "x",
        emulated: bool = False,
    ) -> None:
        cap = Capability(
            node_id=NodeId(node_id),
            public_key="pk",
            endpoint=f"http://{host}:8000",
            engine=engine,
            models=(ModelOffer(name=MODEL, weights_digest=digest, max_context=2048),),
            hardware=HardwareInfo(accelerator="t4", emulated=emulated),
            runtime=RuntimeInfo(gridserve="t", python="t", engine="t"),
        )
        now = time.time()
        self.membership.apply(Registered(cap, at=now, registered_at=now, capability_at=now, last_seen=now))
        self.membership.marks.registered(node_id, signals_of(cap, address))

    def answers(self, node_id: str, ids: list[int], logprobs: list[float] | None = None) -> None:
        """The node answers every job with these token ids (each token with its log-probability, when given)."""
        event: dict[str, object] = {"text": "x" * len(ids), "token_ids": ids}
        if logprobs is not None:
            event["logprobs"] = [{"token": "x", "logprob": v, "top_logprobs": []} for v in logprobs]
        self.fake.always(node_id, Emit(event), Finish())  # type: ignore[arg-type]

    def events(self, node_id: str) -> list[tuple[EventKind, Severity, str]]:
        return [(e.kind, e.severity, e.detail) for e in self.membership.book.events(node_id)]

    def severe(self, node_id: str) -> list[str]:
        return [d for k, s, d in self.events(node_id) if k is EventKind.INCIDENT and s is Severity.SEVERE]

    def passed(self, node_id: str) -> int:
        return sum(1 for k, _, _ in self.events(node_id) if k is EventKind.AUDIT_PASSED)

    def outstanding(self, node_id: str) -> int:
        return self.membership.nodes[NodeId(node_id)].outstanding

    def count(self, result: str) -> float:
        value = self.membership.metrics.registry.get_sample_value(
            "gridserve_redundancy_checks_total", {"result": result}
        )
        return value or 0.0


def job() -> GenerateRequest:
    sampling = SamplingParams(max_tokens=8, temperature=1.0, seed=7)
    return GenerateRequest(request_id="chatcmpl-client", model=MODEL, prompt="hello", sampling=sampling)


ANSWER = Answer((1, 2, 3, 4), "abcd")


def test_agreement_rule() -> None:
    assert agree(Answer((1, 2, 3)), Answer((1, 2, 3)))
    assert agree(Answer((1, 2, 3)), Answer((1, 2)))  # one stopped earlier
    assert not agree(Answer((1, 2, 3)), Answer((1, 5, 3)))
    assert divergence(Answer((1, 2, 3)), Answer((1, 5, 3))) == 1
    assert agree(Answer(text="Paris is"), Answer((9,), "Paris"))  # without ids on both sides: the text
    assert divergence(Answer(text="Paris"), Answer(text="Parma")) == 3


def test_peers_never_the_node_nor_its_host_and_prefer_another_address(writer: StoreWriter) -> None:
    grid = Grid(writer)
    grid.add("a", "10.0.0.1", "1.1.1.1")
    grid.add("same-host", "10.0.0.1", "2.2.2.2")
    grid.add("same-address", "10.0.0.2", "1.1.1.1")
    grid.add("elsewhere", "10.0.0.3", "3.3.3.3")
    grid.add("other-weights", "10.0.0.4", "4.4.4.4", digest="upstream:other")
    grid.add("other-engine", "10.0.0.5", "5.5.5.5", engine="y")
    for _ in range(20):
        grid.checker.rng.seed(_)
        assert grid.checker.peers("a", MODEL) == ["elsewhere", "same-address"]
    assert grid.checker.peers("a", MODEL, exclude=("elsewhere",)) == ["same-address"]


def test_peers_must_be_live_and_trusted(writer: StoreWriter) -> None:
    grid = Grid(writer)
    grid.add("a", "10.0.0.1")
    grid.add("down", "10.0.0.2")
    grid.add("quarantined", "10.0.0.3")
    grid.add("ok", "10.0.0.4")
    grid.membership.mark_failed(NodeId("down"), "test")
    grid.membership.quarantine(NodeId("quarantined"), "test")
    assert grid.checker.peers("a", MODEL) == ["ok"]


def test_agreement_is_an_audit_passed(writer: StoreWriter) -> None:
    asyncio.run(_agreement_is_an_audit_passed(writer))


async def _agreement_is_an_audit_passed(writer: StoreWriter) -> None:
    grid = Grid(writer)
    grid.add("a", "10.0.0.1")
    grid.add("b", "10.0.0.2")
    grid.answers("b", [1, 2, 3, 4])
    result = await grid.checker.verify("a", job(), ANSWER)
    assert result.result == "agree" and result.peers == ("b",)
    assert grid.passed("a") == 1 and not grid.severe("a")
    assert grid.passed("b") == 0  # a is not vetted: b is not credited for agreeing with a newcomer
    call = grid.fake.calls[0]
    assert call.job.request_id != "chatcmpl-client" and call.job.request_id.startswith("chatcmpl-")
    assert call.job.sampling == job().sampling and call.job.prompt == "hello"
    assert grid.outstanding("b") == 0


def test_minority_of_two_to_one_is_severe(writer: StoreWriter) -> None:
    asyncio.run(_minority_of_two_to_one_is_severe(writer))


async def _minority_of_two_to_one_is_severe(writer: StoreWriter) -> None:
    grid = Grid(writer)
    grid.add("a", "10.0.0.1")
    grid.add("b", "10.0.0.2")
    grid.add("c", "10.0.0.3")
    grid.answers("b", [1, 2, 9, 4])
    grid.answers("c", [1, 2, 9, 4])
    result = await grid.checker.verify("a", job(), ANSWER)
    assert result.result == "disagree_resolved"
    [incident] = grid.severe("a")
    assert incident.startswith("integrity: redundancy: ") and "token 2" in incident
    assert not grid.severe("b") and not grid.severe("c") and grid.passed("a") == 0
    assert not grid.membership.can_serve("a")  # quarantined


def test_the_second_node_in_the_minority(writer: StoreWriter) -> None:
    asyncio.run(_the_second_node_in_the_minority(writer))


async def _the_second_node_in_the_minority(writer: StoreWriter) -> None:
    grid = Grid(writer)
    grid.add("a", "10.0.0.1", "1.1.1.1")
    grid.add("b", "10.0.0.2", "2.2.2.2")  # asked second: another address
    grid.add("c", "10.0.0.3", "1.1.1.1")
    grid.answers("b", [1, 2, 9, 4])
    grid.answers("c", [1, 2, 3, 4])
    result = await grid.checker.verify("a", job(), ANSWER)
    assert result.result == "disagree_resolved" and set(result.peers) == {"b", "c"}
    [incident] = grid.severe("b")
    assert incident.startswith("integrity: redundancy: ")
    assert not grid.severe("a") and not grid.severe("c") and grid.passed("a") == 1


def test_no_third_node_records_nothing_severe(writer: StoreWriter) -> None:
    asyncio.run(_no_third_node_records_nothing_severe(writer))


async def _no_third_node_records_nothing_severe(writer: StoreWriter) -> None:
    grid = Grid(writer)
    grid.add("a", "10.0.0.1")
    grid.add("b", "10.0.0.2")
    grid.add("b-twin", "10.0.0.2")  # same host as b: cannot arbitrate between a and b
    grid.answers("b", [1, 2, 9, 4])
    grid.answers("b-twin", [1, 2, 9, 4])
    grid.checker.rng.seed(1)
    result = await grid.checker.verify("a", job(), ANSWER)
    grid.checker.record(result)
    assert result.result == "disagree_unresolved"
    assert all(not grid.severe(n) for n in ("a", "b", "b-twin"))
    assert grid.count("disagree_unresolved") == 1


def test_three_way_split_records_nothing_severe(writer: StoreWriter) -> None:
    asyncio.run(_three_way_split_records_nothing_severe(writer))


async def _three_way_split_records_nothing_severe(writer: StoreWriter) -> None:
    grid = Grid(writer)
    grid.add("a", "10.0.0.1")
    grid.add("b", "10.0.0.2")
    grid.add("c", "10.0.0.3")
    grid.answers("b", [1, 2, 9, 4])
    grid.answers("c", [1, 8, 3, 4])
    result = await grid.checker.verify("a", job(), ANSWER)
    assert result.result == "disagree_unresolved"
    assert all(not grid.severe(n) for n in ("a", "b", "c"))


def test_a_second_node_that_refuses_is_charged_and_no_verdict(writer: StoreWriter) -> None:
    asyncio.run(_a_second_node_that_refuses_is_charged_and_no_verdict(writer))


async def _a_second_node_that_refuses_is_charged_and_no_verdict(writer: StoreWriter) -> None:
    grid = Grid(writer)
    grid.add("a", "10.0.0.1")
    grid.add("b", "10.0.0.2")
    grid.fake.always("b", Refuse(400, "no"))
    result = await grid.checker.verify("a", job(), ANSWER)
    grid.checker.record(result)
    assert result.result == "error" and grid.count("error") == 1
    assert grid.events("a") == []
    assert any(k is EventKind.JOB_FAILED for k, _, _ in grid.events("b"))


def test_check_runs_in_the_background(writer: StoreWriter) -> None:
    asyncio.run(_check_runs_in_the_background(writer))


async def _check_runs_in_the_background(writer: StoreWriter) -> None:
    grid = Grid(writer)
    grid.add("a", "10.0.0.1")
    assert not grid.checker.check("a", job(), ANSWER)  # nobody to ask
    assert grid.count("no_peer") == 1
    grid.add("b", "10.0.0.2")
    grid.answers("b", [1, 2, 3, 4])
    assert grid.checker.check("a", job(), ANSWER)
    assert grid.passed("a") == 0 and len(grid.checker.pending) == 1
    for task in list(grid.checker.pending):
        await task
    assert grid.passed("a") == 1 and grid.count("agree") == 1
    assert grid.checker.summary()["by_result"] == {"agree": 1}


def test_severe_only_after_consecutive_minority_verdicts(writer: StoreWriter) -> None:
    asyncio.run(_severe_only_after_consecutive_minority_verdicts(writer))


async def _severe_only_after_consecutive_minority_verdicts(writer: StoreWriter) -> None:
    """One 2-1 split is no proof (honest servers disagree on near ties): minor incidents until the limit in a row;
    an agreement in between starts the count again."""
    grid = Grid(writer, strikes=3)
    grid.add("a", "10.0.0.1")
    grid.add("b", "10.0.0.2")
    grid.add("c", "10.0.0.3")
    grid.answers("b", [1, 2, 9, 4])
    grid.answers("c", [1, 2, 9, 4])

    def minor() -> list[str]:
        return [d for k, s, d in grid.events("a") if k is EventKind.INCIDENT and s is Severity.MINOR]

    for _ in range(2):
        assert (await grid.checker.verify("a", job(), ANSWER)).result == "disagree_resolved"
    assert len(minor()) == 2 and "2 of 3 in a row" in minor()[0] and not grid.severe("a")
    assert (await grid.checker.verify("a", job(), Answer((1, 2, 9, 4)))).result == "agree"  # the count starts again
    for _ in range(2):
        await grid.checker.verify("a", job(), ANSWER)
    assert not grid.severe("a") and grid.membership.can_serve("a")
    await grid.checker.verify("a", job(), ANSWER)
    [incident] = grid.severe("a")
    assert incident.startswith("integrity: redundancy: ") and "3 of 3 in a row" in incident
    assert not grid.membership.can_serve("a")


def test_emulated_answers_are_not_checked(writer: StoreWriter) -> None:
    asyncio.run(_emulated_answers_are_not_checked(writer))


async def _emulated_answers_are_not_checked(writer: StoreWriter) -> None:
    grid = Grid(writer)
    grid.add("a", "10.0.0.1", emulated=True)
    grid.add("b", "10.0.0.2", emulated=True)
    assert not grid.checker.check("a", job(), ANSWER) and not grid.checker.pending


def test_log_probabilities_agree_within_the_tolerance_while_the_tokens_are_the_same() -> None:
    small, big = LOGPROB_TOLERANCE / 2, LOGPROB_TOLERANCE * 2
    a = Answer((1, 2, 3), scored=scored((1, 2, 3), [-0.5, -1.0, -2.0], ()))
    assert agree(a, Answer((1, 2, 3), scored=scored((1, 2, 3), [-0.5 + small, -1.0 - small, -2.0], ())))
    off = Answer((1, 2, 3), scored=scored((1, 2, 3), [-0.5, -1.0 - big, -2.0], ()))
    assert not agree(a, off) and divergence(a, off) is None and scored_divergence(a, off) == 1
    assert "log-probability of token 1" in difference(a, off) and "-1.0000" in difference(a, off)
    later = Answer((1, 2, 9), scored=scored((1, 2, 9), [-0.5, -1.0, -9.0], ()))
    assert scored_divergence(a, later) is None, "numbers after the tokens part are not compared"
    assert not agree(a, later) and "token 2" in difference(a, later)
    assert agree(a, Answer((1, 2, 3))), "an answer without numbers is compared by its tokens"
    by_text = Answer(text="ab", scored=scored((), [-0.1, -0.2], ["a", "b"]))
    assert by_text.scored == (("a", -0.1), ("b", -0.2)) and scored((1,), [-0.1, -0.2], ["a"]) == ()


def test_a_node_claiming_other_log_probabilities_is_the_minority(writer: StoreWriter) -> None:
    asyncio.run(_a_node_claiming_other_log_probabilities_is_the_minority(writer))


async def _a_node_claiming_other_log_probabilities_is_the_minority(writer: StoreWriter) -> None:
    grid = Grid(writer)
    for node, host in (("a", "10.0.0.1"), ("b", "10.0.0.2"), ("c", "10.0.0.3")):
        grid.add(node, host)
    honest = [-0.25, -1.5, -0.75, -3.0]
    grid.answers("b", [1, 2, 3, 4], [v + LOGPROB_TOLERANCE / 3 for v in honest])
    grid.answers("c", [1, 2, 3, 4], honest)
    flattering = Answer((1, 2, 3, 4), "abcd", scored((1, 2, 3, 4), [-0.25, -0.5, -0.75, -3.0], ()))
    asked = job().model_copy(update={"sampling": job().sampling.model_copy(update={"logprobs": 0})})
    result = await grid.checker.verify("a", asked, flattering)
    assert result.result == "disagree_resolved" and set(result.peers) == {"b", "c"}
    [incident] = grid.severe("a")
    assert "log-probability of token 1" in incident and "-0.5000" in incident, incident
    assert grid.fake.calls[0].job.sampling.logprobs == 0, "the second node is asked for them too"
    honest_again = Answer((1, 2, 3, 4), "abcd", scored((1, 2, 3, 4), honest, ()))
    assert (await grid.checker.verify("c", asked, honest_again)).result == "agree"
