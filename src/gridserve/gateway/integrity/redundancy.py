"""Verification by redundancy (in the spirit of Proof of Sampling) for answers the verifier cannot re-execute:
models behind `openai-upstream` nodes (vLLM, llama.cpp), the large catalogue models. Not emulated cards: they run no
weights, their answers are checked by receipts only.

An audited answer (the same sampling as audits: `Auditor.rate`) of such a model is sent again, off the request
path, to a second node: the same prompt, sampling settings, seed and `max_tokens`, under a fresh request id like a
client's, through the same dispatch path as a canary, within `canary_timeout_s`. The second node serves the model
whole, with the same weights digest and engine kind, is live and trusted, is another identity, and its endpoint
host differs from the first node's (another operator as far as the gateway can tell); nodes whose registration
address differs too are preferred, then vetted ones.

Agreement (`agree`): token ids where both answers name them, else the text, character by character. Two answers
agree when the first position where they differ is at or beyond the shorter one's length: identical, or one
stopped earlier (an end of sequence against `max_tokens`). Honest answers are not always identical, though: two
llama.cpp servers that saw the jobs in the same order gave identical answers (greedy and seeded sampling), but in
different orders they parted on about one answer in nine (bench/redundancy.py): llama-cpp-python reuses the KV of
the prefix shared with the previous prompt, computes the rest in other batch shapes, and a near tie flips. GPU
engines (batch-dependent kernels) do the same. One disagreement is therefore no proof.

Log-probabilities (an answer to a request that asked for them): the second node is asked for them too, and while
the two answers name the same tokens, the numbers they claim for each token must lie within
`redundancy_logprob_tolerance` nats (`scored_divergence`); a node that invents them (a flattering confidence) is
in the minority like one that alters tokens. Tokens are matched by id, or by their text where the engine names
no ids (an upstream server).

Verdicts: agreement is an audit passed for the checked node (it counts toward vetting a new identity); the second
node is credited too only when the checked node is vetted and the two differ in registration address and endpoint
host (two fresh identities of one operator would otherwise vet each other). Disagreement asks a third node (same
rules, distinct from both): the node in the minority of a 2-1 split gets a minor `integrity: redundancy: ...`
incident, and a severe one (quarantine) at the `redundancy_strikes`-th minority verdict in a row (an agreement
starts the count again): a node that alters its answers is in the minority every time, an honest one rarely twice
in a row. With no third node, or no majority, nothing is recorded against anyone. A second (or third) node that
refuses or does not answer in time is charged a failed job, and the checked node gets no verdict.
"""

import asyncio
import logging
import random
import secrets
import time
from collections import deque
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from gridserve.gateway.config import REDUNDANCY_LOGPROB_TOLERANCE, GatewayConfig
from gridserve.gateway.dispatch.dispatcher import Dispatcher, NodeFailed
from gridserve.gateway.ops.metrics import GatewayMetrics
from gridserve.gateway.registry.membership import Membership, NodeRecord
from gridserve.gateway.transport import TransportError
from gridserve.reliability import EventKind, NodeEvent, Severity
from gridserve.types import GenerateRequest, ModelOffer, NodeId

log = logging.getLogger("gridserve.gateway")


LOGPROB_TOLERANCE = REDUNDANCY_LOGPROB_TOLERANCE


Scored = tuple[tuple[int | str, float], ...]
"""Each token's claimed log-probability, keyed by the token: its id where the answer names every token's, else its
text as the node wrote it."""


def scored(ids: Sequence[int], values: Sequence[float], tokens: Sequence[str]) -> Scored:
    """`values` keyed by their tokens (`Scored`); () when they cannot be matched to tokens."""
    keys: Sequence[int | str] = ids if len(ids) == len(values) else tokens
    return tuple(zip(keys, values, strict=True)) if values and len(keys) == len(values) else ()


@dataclass(frozen=True)
class Answer:
    """What a node answered: token ids where its engine names them, and the text; with `scored`, each token's
    log-probability as the node claimed it, keyed by its id (or its text where the engine names no ids)."""

    ids: tuple[int, ...] = ()
    text: str = ""
    scored: Scored = ()


def first_difference(a: Sequence[Any], b: Sequence[Any]) -> int:
    """The first position where `a` and `b` differ (the shorter one's length if one is a prefix of the other)."""
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return min(len(a), len(b))


def divergence(a: Answer, b: Answer) -> int | None:
    """Where two answers disagree (None: they agree): token ids when both name them, else characters of text."""
    left: Sequence[Any] = a.ids if a.ids and b.ids else a.text
    right: Sequence[Any] = b.ids if a.ids and b.ids else b.text
    at = first_difference(left, right)
    return None if at >= min(len(left), len(right)) else at


def scored_divergence(a: Answer, b: Answer, tolerance: float = LOGPROB_TOLERANCE) -> int | None:
    """The first token, while both answers name the same tokens, whose log-probabilities the two claim more than
    `tolerance` apart (None: none, or not both claimed any)."""
    for i, ((left, x), (right, y)) in enumerate(zip(a.scored, b.scored, strict=False)):
        if left != right:
            return None
        if abs(x - y) > tolerance:
            return i
    return None


def agree(a: Answer, b: Answer, tolerance: float = LOGPROB_TOLERANCE) -> bool:
    """The same tokens (one may stop earlier) and, where both claimed them, their log-probabilities within
    `tolerance`."""
    return divergence(a, b) is None and scored_divergence(a, b, tolerance) is None


def difference(a: Answer, b: Answer, tolerance: float = LOGPROB_TOLERANCE) -> str:
    """Where and how two answers that do not agree differ, in words."""
    at = divergence(a, b)
    if at is None:
        i = scored_divergence(a, b, tolerance) or 0
        return (
            f"the log-probability of token {i} ({a.scored[i][0]!r}) is {a.scored[i][1]:.4f}, the others' "
            f"{b.scored[i][1]:.4f} (tolerance {tolerance:g})"
        )
    by_ids = bool(a.ids and b.ids)
    return f"{'token' if by_ids else 'character'} {at}: {_excerpt(a, at, by_ids)!r} vs {_excerpt(b, at, by_ids)!r}"


def endpoint_host(record: NodeRecord) -> str:
    return urlsplit(record.capability.endpoint).hostname or ""


@dataclass(frozen=True)
class RedundancyResult:
    node_id: str
    request_id: str
    result: str
    """agree, disagree_resolved, disagree_unresolved or error."""
    peers: tuple[str, ...]
    detail: str = ""


class RedundancyChecker:
    def __init__(self, config: GatewayConfig, dispatcher: Dispatcher, metrics: GatewayMetrics) -> None:
        self.config = config
        self.dispatcher = dispatcher
        self.membership: Membership = dispatcher.membership
        self.metrics = metrics
        self.rng = random.Random()
        self.pending: set[asyncio.Task[None]] = set()
        self.results: deque[RedundancyResult] = deque(maxlen=1000)
        self.strikes: dict[str, int] = {}
        """Consecutive minority verdicts per node (an agreement clears them)."""
        self.tolerance = config.redundancy_logprob_tolerance

    # -- who may answer again ---------------------------------------------------------------------------------------
    def peers(self, node_id: str, model: str, exclude: Collection[str] = ()) -> list[NodeId]:
        """Nodes that may answer `node_id`'s job again, best first: serving `model` whole with the same weights and
        engine, live and trusted, not `node_id` nor any of `exclude`, at an endpoint host none of them has;
        those whose registration address differs from all of theirs first, then vetted ones."""
        first = self.membership.nodes.get(NodeId(node_id))
        offer = _offer(first, model) if first is not None else None
        if first is None or offer is None:
            return []
        taken = [r for r in (self.membership.nodes.get(NodeId(n)) for n in {node_id, *exclude}) if r is not None]
        hosts = {endpoint_host(r) for r in taken}
        addresses = {self._address(r.capability.node_id) for r in taken} - {""}
        now = time.time()
        ranked: list[tuple[bool, bool, float, NodeId]] = []
        for record in self.membership.nodes.values():
            peer = record.capability.node_id
            mine = _offer(record, model)
            if (
                peer == node_id
                or peer in exclude
                or mine is None
                or mine.weights_digest != offer.weights_digest
                or record.capability.engine != first.capability.engine
                or endpoint_host(record) in hosts
                or not self.membership.can_serve(peer)
                or not self.membership.trusted(peer)
            ):
                continue
            address = self._address(peer)
            other_address = address != "" and address not in addresses
            vetted = self.membership.book.summary(peer, now).vetted
            ranked.append((not other_address, not vetted, self.rng.random(), peer))
        return [peer for *_, peer in sorted(ranked)]

    def _emulated(self, node_id: str) -> bool:
        record = self.membership.nodes.get(NodeId(node_id))
        return record is None or record.capability.hardware.emulated

    def _address(self, node_id: str) -> str:
        signals = self.membership.marks.signals(node_id)
        return signals.address if signals is not None else ""

    def _distinct(self, a: str, b: str) -> bool:
        """Whether two nodes differ in both registration address (where known) and endpoint host."""
        ra, rb = self.membership.nodes.get(NodeId(a)), self.membership.nodes.get(NodeId(b))
        if ra is None or rb is None or endpoint_host(ra) == endpoint_host(rb):
            return False
        known = self._address(a), self._address(b)
        return "" not in known and known[0] != known[1]

    # -- entry point ------------------------------------------------------------------------------------------------
    def check(self, node_id: str, job: GenerateRequest, answer: Answer) -> bool:
        """Check `node_id`'s answer to `job` in the background (the client's answer is never delayed). False when
        it cannot be checked: a continuation of another node's work, no answer seen, or no node to ask."""
        if job.resume or not (answer.ids or answer.text) or self._emulated(node_id):
            return False
        if not self.peers(node_id, job.model):
            self.metrics.redundancy.labels(result="no_peer").inc()
            return False
        task = asyncio.create_task(self._run(node_id, job, answer))
        self.pending.add(task)
        task.add_done_callback(self.pending.discard)
        return True

    async def _run(self, node_id: str, job: GenerateRequest, answer: Answer) -> None:
        try:
            result = await self.verify(node_id, job, answer)
        except Exception:  # a gateway bug must not accuse a node: logged, counted, no incident
            log.exception("redundancy check of %s on %s could not run", job.request_id, node_id)
            result = RedundancyResult(node_id, job.request_id, "error", (), "the check could not run")
        self.record(result)

    async def verify(self, node_id: str, job: GenerateRequest, answer: Answer) -> RedundancyResult:
        """Ask a second node, and a third on disagreement; note the verdict on the nodes' records."""
        second = next(iter(self.peers(node_id, job.model)), None)
        if second is None:
            return RedundancyResult(node_id, job.request_id, "error", (), "no node to ask")
        again = await self.ask(second, job)
        if again is None:
            return RedundancyResult(node_id, job.request_id, "error", (second,), f"{second} did not answer")
        if agree(answer, again, self.tolerance):
            self.strikes.pop(second, None)
            self._passed(node_id, job, second)
            if self.membership.book.summary(node_id, time.time()).vetted and self._distinct(node_id, second):
                self._passed(second, job, node_id)
            return RedundancyResult(node_id, job.request_id, "agree", (second,))
        return await self._arbitrate(node_id, job, {node_id: answer, second: again})

    async def _arbitrate(self, node_id: str, job: GenerateRequest, answers: dict[str, Answer]) -> RedundancyResult:
        """The two answers differ: a third node's answer decides, if one can be had and it sides with one."""
        second = next(n for n in answers if n != node_id)
        at = difference(answers[node_id], answers[second], self.tolerance)
        third = next(iter(self.peers(node_id, job.model, exclude=(second,))), None)
        third_answer = await self.ask(third, job) if third is not None else None
        if third is None or third_answer is None:
            why = "no third node to ask" if third is None else f"third node {third} did not answer"
            return self._unresolved(node_id, job, (second,), f"answers differ: {at}; {why}")
        with_first = agree(answers[node_id], third_answer, self.tolerance)
        with_second = agree(answers[second], third_answer, self.tolerance)
        if with_first == with_second:
            return self._unresolved(node_id, job, (second, third), f"answers differ: {at}; no majority")
        minority, majority = (second, node_id) if with_first else (node_id, second)
        self._accuse(minority, job, answers[minority], answers[majority], (majority, third))
        self.strikes.pop(majority, None)
        self.strikes.pop(third, None)
        if with_first:
            self._passed(node_id, job, third)
        return RedundancyResult(node_id, job.request_id, "disagree_resolved", (second, third), f"minority {minority}")

    # -- asking a node ----------------------------------------------------------------------------------------------
    async def ask(self, node_id: NodeId, job: GenerateRequest) -> Answer | None:
        """`job` again on `node_id` under a fresh request id, answered in full within `canary_timeout_s`; None (and a
        failed job on its record) when it refused, failed or was too slow."""
        limit = self.config.canary_timeout_s
        twin = job.model_copy(update={"request_id": _fresh_id(job.request_id)})
        try:
            async with asyncio.timeout(limit):
                return await self._answer(node_id, twin)
        except TimeoutError:
            self._failed(node_id, f"no full answer to a redundancy check within {limit:g} s")
        except (NodeFailed, OSError, TransportError) as exc:  # Refusal is a NodeFailed: a valid job refused
            self._failed(node_id, f"did not answer a redundancy check: {exc}")
        return None

    async def _answer(self, node_id: NodeId, job: GenerateRequest) -> Answer:
        stream = await self.dispatcher.attempt(node_id, job)
        ids: list[int] = []
        text: list[str] = []
        values: list[float] = []
        tokens: list[str] = []
        try:
            async for event in stream.events():
                if event.get("error"):
                    raise NodeFailed(f"engine error: {event['error']}")
                ids.extend(event.get("token_ids") or ())
                text.append(event.get("text") or "")
                for entry in event.get("logprobs") or ():
                    try:
                        values.append(float(entry["logprob"]))
                        tokens.append(str(entry["token"]))
                    except (KeyError, TypeError, ValueError) as exc:
                        raise NodeFailed(f"malformed log-probabilities: {exc!r}") from exc
                if event.get("finish_reason"):
                    return Answer(tuple(ids), "".join(text), scored(ids, values, tokens))
        finally:
            stream.close()
            self.dispatcher.finished(stream.node_id)
        raise NodeFailed("the stream ended without a finish reason")

    # -- verdicts ---------------------------------------------------------------------------------------------------
    def _passed(self, node_id: str, job: GenerateRequest, witness: str) -> None:
        self.strikes.pop(node_id, None)
        detail = f"request {job.request_id}: redundancy: same answer as {witness}"
        self.membership.note(NodeEvent(node_id=node_id, kind=EventKind.AUDIT_PASSED, at=time.time(), detail=detail))

    def _accuse(self, node_id: str, job: GenerateRequest, wrong: Answer, right: Answer, others: Sequence[str]) -> None:
        """A minority verdict: a minor incident, or a severe one at the `redundancy_strikes`-th in a row."""
        strikes = self.strikes[node_id] = self.strikes.get(node_id, 0) + 1
        limit = self.config.redundancy_strikes
        detail = (
            f"integrity: redundancy: answer differs from those of {' and '.join(others)} (which agree) from "
            f"{difference(wrong, right, self.tolerance)} (request {job.request_id}; {strikes} of {limit} in a row)"
        )
        severity = Severity.SEVERE if strikes >= limit else Severity.MINOR
        if severity is Severity.SEVERE:
            self.strikes.pop(node_id, None)
        log.warning("node %s: %s", node_id, detail)
        self.membership.note(
            NodeEvent(node_id=node_id, kind=EventKind.INCIDENT, at=time.time(), severity=severity, detail=detail)
        )

    def _unresolved(self, node_id: str, job: GenerateRequest, peers: tuple[str, ...], why: str) -> RedundancyResult:
        log.warning("redundancy check of %s on %s unresolved: %s", job.request_id, node_id, why)
        return RedundancyResult(node_id, job.request_id, "disagree_unresolved", peers, why)

    def _failed(self, node_id: NodeId, why: str) -> None:
        log.info("redundancy check on %s failed: %s", node_id, why)
        self.dispatcher.node_failed(node_id, why)

    def record(self, result: RedundancyResult) -> None:
        self.results.append(result)
        self.metrics.redundancy.labels(result=result.result).inc()

    def summary(self) -> dict[str, Any]:
        counts: dict[str, int] = {}
        for r in self.results:
            counts[r.result] = counts.get(r.result, 0) + 1
        return {
            "checked": len(self.results),
            "by_result": counts,
            "recent": [r.__dict__ for r in list(self.results)[-20:]],
        }


def _offer(record: NodeRecord, model: str) -> ModelOffer | None:
    """The node's offer of the whole model for generation (what a redundant answer is asked of)."""
    return next(
        (o for o in record.capability.models if o.name == model and o.layers is None and o.serves("generate")), None
    )


def _fresh_id(request_id: str) -> str:
    prefix = request_id.split("-", 1)[0] if "-" in request_id else "chatcmpl"
    return f"{prefix}-{secrets.token_hex(12)}"


def _excerpt(answer: Answer, at: int, by_ids: bool) -> str:
    if by_ids:
        return " ".join(map(str, answer.ids[at : at + 4]))
    return answer.text[at : at + 16]


__all__ = ["Answer", "RedundancyChecker", "RedundancyResult", "agree", "difference", "divergence", "scored_divergence"]
