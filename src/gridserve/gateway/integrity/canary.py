"""Canaries: now and then a node gets a greedy request built like any client's (same id format, an ordinary
prompt and length, sent through the same dispatch path); the verifier, which knows the model, checks the
answer token by token and the activation proof. A wrong answer is an integrity incident."""

import asyncio
import logging
import random

from gridserve.gateway.dispatch.dispatcher import Dispatcher, NodeFailed, Refusal
from gridserve.gateway.integrity.audit import Auditor, AuditResult, canary_job
from gridserve.gateway.integrity.receipts import ReceiptChecker
from gridserve.gateway.registry.membership import LIVE
from gridserve.gateway.transport import TransportError
from gridserve.types import StreamEvent

log = logging.getLogger("gridserve.gateway")


class CanaryRunner:
    def __init__(self, dispatcher: Dispatcher, auditor: Auditor, receipts: ReceiptChecker) -> None:
        self.dispatcher = dispatcher
        self.auditor = auditor
        self.receipts = receipts
        self.rng = random.Random()
        self.sent = 0

    def targets(self) -> list[tuple[str, str]]:
        """(node, model) pairs a canary can go to: live nodes serving a model the verifier can run."""
        membership = self.dispatcher.membership
        return [
            (r.capability.node_id, o.name)
            for r in membership.nodes.values()
            if r.state in LIVE
            for o in r.capability.models
            if o.layers is None and self.auditor.verifier.supports(o.name)  # (stages: no whole-request canary)
        ]

    async def once(self, node_id: str | None = None) -> AuditResult | None:
        targets = [t for t in self.targets() if node_id is None or t[0] == node_id]
        if not targets:
            return None
        node, model = self.rng.choice(targets)
        job = canary_job(model, self.rng)
        try:
            stream = await self.dispatcher.attempt(node, job)  # type: ignore[arg-type]
        except Refusal as exc:  # a canary is valid by construction: refusing it is a failed job
            log.info("canary to %s refused as invalid", node)
            self.dispatcher.node_failed(node, f"refused a canary (a valid request) as invalid: {exc}")  # type: ignore[arg-type]
            return None
        except NodeFailed as exc:
            log.info("canary to %s not answered: %s", node, exc)
            return None
        ids: list[int] = []
        final: StreamEvent = {}
        try:
            async for event in stream.events():
                ids.extend(event.get("token_ids") or ())
                if event.get("finish_reason"):
                    final = event
                    break
        except (TimeoutError, OSError, TransportError) as exc:
            log.info("canary to %s broke: %s", node, type(exc).__name__)
            return None
        finally:
            stream.close()
            self.dispatcher.finished(stream.node_id)
        self.sent += 1
        check = self.receipts.check(node, job, ids, final)
        receipt = check.receipt
        if receipt is None:
            return None
        loop = asyncio.get_running_loop()
        verifier = self.auditor.verifier
        result = await loop.run_in_executor(verifier.pool, verifier.check, job, ids, receipt)
        result = AuditResult(
            result.node_id,
            result.request_id,
            tuple(p.replace("audit:", "canary:") for p in result.problems),
            result.proof_checked,
        )
        self.auditor.record(result)
        return result

    async def run_forever(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s * self.rng.uniform(0.5, 1.5))  # no fixed rhythm to recognise
            try:
                await self.once()
            except Exception:
                log.exception("canary")
