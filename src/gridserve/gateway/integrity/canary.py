"""Canaries: now and then a node gets a request built like any client's (same id format, an ordinary prompt and
length, the sampling settings of recent client traffic with a seed like every sampled request, sent through the
same dispatch path); the verifier, which knows the model, checks the answer token by token and the activation
proof. A wrong answer is an integrity incident; a refused canary, or one not answered in full within
`canary_timeout_s`, is a failed job."""

import asyncio
import logging
import random
import time

from gridserve.gateway.dispatch.dispatcher import Dispatcher, NodeFailed, Refusal
from gridserve.gateway.integrity.audit import Auditor, AuditResult, Verifier, canary_job
from gridserve.gateway.integrity.receipts import ReceiptChecker
from gridserve.gateway.registry.membership import LIVE
from gridserve.gateway.transport import TransportError
from gridserve.reliability import EventKind
from gridserve.types import GenerateRequest, StreamEvent

log = logging.getLogger("gridserve.gateway")


class CanaryRunner:
    def __init__(self, dispatcher: Dispatcher, auditor: Auditor, receipts: ReceiptChecker) -> None:
        self.dispatcher = dispatcher
        self.auditor = auditor
        self.receipts = receipts
        self.rng = random.Random()
        self.sent = 0

    def targets(self) -> list[tuple[str, str]]:
        """(node, model) pairs a canary can go to: live nodes serving a model the verifier can run, for generation
        (a canary is a chat request)."""
        membership = self.dispatcher.membership
        return [
            (r.capability.node_id, o.name)
            for r in membership.nodes.values()
            if r.state in LIVE
            for o in r.capability.models
            if o.layers is None and o.serves("generate") and self.auditor.verifier.supports(o.name)  # (not stages)
        ]

    async def once(self, node_id: str | None = None) -> AuditResult | None:
        """One canary to `node_id` (else a random eligible node) and its verdict; None when no node could take
        one. The node's part is bounded: a canary not answered in full within `canary_timeout_s` is a failed
        canary (the verifier's re-execution, which may first load the model, is not the node's time)."""
        targets = [t for t in self.targets() if node_id is None or t[0] == node_id]
        if not targets:
            return None
        node, model = self.rng.choice(self._unvetted(targets) or targets)
        job = canary_job(model, self.rng, self.auditor.mix)
        limit = self.auditor.config.canary_timeout_s
        try:
            async with asyncio.timeout(limit):
                answered = await self._answer(node, job)
        except TimeoutError:
            return self._failed(node, job, f"no full answer to a canary within {limit:g} s")
        if isinstance(answered, AuditResult):
            return answered
        return await self._verify(node, job, *answered)

    def _unvetted(self, targets: list[tuple[str, str]]) -> list[tuple[str, str]]:
        """Half the time, the targets on nodes not yet vetted (empty otherwise, or when there are none): a node held
        back to the exploration share gets few client requests to be audited on, and canaries vet it sooner."""
        if self.rng.random() >= 0.5:
            return []
        book, now = self.dispatcher.membership.book, time.time()
        return [t for t in targets if not book.summary(t[0], now).vetted]

    async def _answer(self, node: str, job: GenerateRequest) -> tuple[list[int], StreamEvent] | AuditResult:
        """The node's answer (token ids and last event), or the failed verdict of a refused or broken canary."""
        try:
            stream = await self.dispatcher.attempt(node, job)  # type: ignore[arg-type]
        except Refusal as exc:  # a canary is valid by construction: refusing it is a failed job
            return self._failed(node, job, f"refused a canary (a valid request) as invalid: {exc}")
        except NodeFailed as exc:
            return self._failed(node, job, f"did not answer a canary: {exc}")
        ids: list[int] = []
        final: StreamEvent = {}
        try:
            async for event in stream.events():
                ids.extend(event.get("token_ids") or ())
                if event.get("finish_reason"):
                    final = event
                    break
        except (OSError, TransportError) as exc:
            return self._failed(node, job, f"a canary's stream broke: {exc}")
        finally:
            stream.close()
            self.dispatcher.finished(stream.node_id)
        return ids, final

    async def _verify(self, node: str, job: GenerateRequest, ids: list[int], final: StreamEvent) -> AuditResult | None:
        self.sent += 1
        receipt = self.receipts.check(node, job, ids, final).receipt
        if receipt is None:
            return None
        result = await self.auditor.verifier.run(Verifier.check, job, ids, receipt)
        result = AuditResult(
            result.node_id,
            result.request_id,
            tuple(p.replace("audit:", "canary:") for p in result.problems),
            result.proof_checked,
        )
        self.auditor.record(result, EventKind.CANARY_PASSED)
        return result

    def _failed(self, node: str, job: GenerateRequest, why: str) -> AuditResult:
        """A refused, unanswered or broken canary: a failed job on the node's record (not an integrity incident: the
        answer was never seen), and a failed verdict for whoever asked."""
        log.info("canary to %s failed: %s", node, why)
        self.dispatcher.node_failed(node, why)  # type: ignore[arg-type]
        self.auditor.metrics.audits.labels(result="fail").inc()
        return AuditResult(node, job.request_id, (f"canary: {why}",), proof_checked=False)

    async def run_forever(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s * self.rng.uniform(0.5, 1.5))  # no fixed rhythm to recognise
            try:
                await self.once()
            except Exception:
                log.exception("canary")
