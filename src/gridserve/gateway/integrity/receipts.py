"""Checking a node's signed receipt against what the gateway sent and received, and settling the tokens.

Each check that fails is a severe incident with its evidence (which check, what was expected, what came):

- identity: the receipt is not signed by the node's registered key (forged), or its nonce was seen before
  (a replayed receipt); recorded against the node the gateway called, the source of the message;
- integrity: the receipt is for another request, model or weights digest; its input commitment is not the
  hash of the request sent; its output commitment is not the hash of the tokens received; its prefix-cache
  count is not the stream's, or exceeds the prompt; or the answer claims the length limit with fewer tokens
  than asked (truncated);
- settlement: the tokens claimed are not the tokens the gateway counted (an end-of-sequence token, never
  sent, may be counted once).

The gateway settles what it counted itself, at the price decided for the request; a disputed entry is
kept in the ledger with the node's claim next to it.
"""

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from gridserve.gateway.registry.membership import Membership
from gridserve.reliability import EventKind, NodeEvent, Severity
from gridserve.store import StoreWriter
from gridserve.store.group_commit import GroupCommit
from gridserve.trust import EnvelopeVerifier, FreshnessPolicy, TrustError
from gridserve.trust.commitments import input_commitment, token_commitment
from gridserve.types import GenerateRequest, NodeId, Receipt, StreamEvent
from gridserve.types.base import lenient, wire_payload

log = logging.getLogger("gridserve.gateway")


@dataclass
class ReceiptCheck:
    node_id: str
    delivered: int
    claimed: int | None = None
    receipted: bool = True
    """False for tokens a node sent before it failed: paid from the gateway's count, with no receipt."""
    receipt: Receipt | None = None
    """The verified receipt (None when it could not be verified)."""
    problems: list[tuple[str, str]] = field(default_factory=list)
    """(kind, evidence): kind is identity, integrity or settlement."""

    @property
    def ok(self) -> bool:
        return not self.problems


class ReceiptChecker:
    def __init__(self, membership: Membership, writer: StoreWriter) -> None:
        self.membership = membership
        self.writer = writer
        self.settlements: GroupCommit[dict[str, Any]] = GroupCommit(writer.store.record_settlements)
        """Answers that finish together are settled in one transaction (store/group_commit.py)."""
        self.verifier = EnvelopeVerifier(FreshnessPolicy(max_skew_s=30.0, max_lifetime_s=120.0), time.time)

    def check(
        self,
        node_id: str,
        job: GenerateRequest,
        sent_ids: list[int],
        final: StreamEvent,
        unnamed: tuple[int, int] | None = None,
    ) -> ReceiptCheck:
        """`unnamed`: (text chunks, characters) received from an engine that does not name its tokens (an
        upstream server): token counts can then only be bounded, not counted."""
        result = ReceiptCheck(node_id=node_id, delivered=len(sent_ids))
        receipt = self._verified(node_id, final.get("receipt"), result)
        if receipt is not None:
            result.receipt = receipt
            self._compare(receipt, job, sent_ids, final, result)
            self._end(receipt, job, final, result)
            if unnamed is not None and not sent_ids:
                self._bound(receipt, final, unnamed, result)
            else:
                self._count(receipt, job, sent_ids, final, result)
        if result.problems:  # one incident per receipt, however many checks failed
            self.membership.note(
                NodeEvent(
                    node_id=node_id,
                    kind=EventKind.INCIDENT,
                    at=time.time(),
                    severity=Severity.SEVERE,
                    detail="; ".join(f"{kind}: {evidence}" for kind, evidence in result.problems)
                    + f" (request {job.request_id})",
                )
            )
        return result

    def _verified(self, node_id: str, body: object, result: ReceiptCheck) -> Receipt | None:
        record = self.membership.nodes.get(NodeId(node_id))
        if not isinstance(body, str) or record is None:
            result.problems.append(("integrity", "no receipt with the last event"))
            return None
        try:
            envelope = self.verifier.verify(
                body.encode(), purpose="receipt", expected_keyid=record.capability.public_key
            )
            return lenient(Receipt, envelope.payload)[0]
        except TrustError as exc:
            result.problems.append(("identity", f"receipt refused: {exc.kind}: {exc.detail}"))
        except ValidationError as exc:
            result.problems.append(("integrity", f"receipt malformed: {exc.errors()[0]['msg']}"))
        return None

    def _compare(
        self, r: Receipt, job: GenerateRequest, sent_ids: list[int], final: StreamEvent, result: ReceiptCheck
    ) -> None:
        record = self.membership.nodes[NodeId(result.node_id)]
        digest = next((o.weights_digest for o in record.capability.models if o.name == job.model), None)
        expected = {
            "request id": (r.request_id, job.request_id),
            "node id": (r.node_id, result.node_id),
            "model": (r.model, job.model),
            "weights digest": (r.weights_digest, digest),
            "input commitment": (r.input_commitment, input_commitment(wire_payload(job))),
            "output commitment": (r.output_commitment, token_commitment(sent_ids)),
        }
        for name, (got, want) in expected.items():
            if got != want:
                result.problems.append(("integrity", f"{name} mismatch: receipt says {got!r}, expected {want!r}"))
        self._cached(r, final, result)

    @staticmethod
    def _end(r: Receipt, job: GenerateRequest, final: StreamEvent, result: ReceiptCheck) -> None:
        """An answer may not end before the request's min_tokens, nor on end-of-sequence under ignore_eos (then
        only a stop string or max_tokens ends it)."""
        if final.get("finish_reason") != "stop":
            return
        sampling = job.sampling
        if r.completion_tokens < sampling.min_tokens:
            result.problems.append(
                ("integrity", f"ended after {r.completion_tokens} tokens, before min_tokens ({sampling.min_tokens})")
            )
        elif sampling.ignore_eos and not sampling.stop:
            result.problems.append(("integrity", "ended on end-of-sequence though the request says ignore_eos"))

    @staticmethod
    def _cached(r: Receipt, final: StreamEvent, result: ReceiptCheck) -> None:
        """The prefix-cache count the client is told (usage) is the one signed, and no more than the prompt."""
        said = final.get("cached_tokens", 0)
        if said != r.cached_tokens:
            result.problems.append(
                ("integrity", f"cached tokens mismatch: the stream says {said!r}, the receipt {r.cached_tokens}")
            )
        if not 0 <= r.cached_tokens <= r.prompt_tokens:
            result.problems.append(
                ("integrity", f"receipt claims {r.cached_tokens} cached of {r.prompt_tokens} prompt tokens")
            )

    def _count(
        self, r: Receipt, job: GenerateRequest, sent_ids: list[int], final: StreamEvent, result: ReceiptCheck
    ) -> None:
        total = len(job.resume) + len(sent_ids)
        if final.get("finish_reason") == "length" and total < job.sampling.max_tokens:
            result.problems.append(
                ("integrity", f"truncated: finish_reason length after {total} of {job.sampling.max_tokens} tokens")
            )
        result.claimed = r.completion_tokens - r.resumed
        allowance = 1 if final.get("finish_reason") == "stop" else 0  # the end-of-sequence token, never sent
        if not len(sent_ids) <= result.claimed <= len(sent_ids) + allowance:
            result.problems.append(
                ("settlement", f"receipt claims {result.claimed} tokens, the gateway counted {len(sent_ids)}")
            )

    def _bound(self, r: Receipt, final: StreamEvent, unnamed: tuple[int, int], result: ReceiptCheck) -> None:
        """Without token ids: at least one token per text chunk, at most one per character (+ end of sequence)."""
        chunks, chars = unnamed
        claimed = r.completion_tokens - r.resumed
        result.claimed = claimed
        if not chunks <= claimed <= max(chunks, chars) + 1:
            result.problems.append(
                ("settlement", f"receipt claims {claimed} tokens for {chunks} text chunks of {chars} characters")
            )
            return
        result.delivered = claimed  # bounded by what was received; the node's count is the best there is

    def entry(
        self,
        *,
        decision_id: str,
        request_id: str,
        model: str,
        check: ReceiptCheck,
        price_per_mtok: float | None,
        segment: int = 0,
    ) -> dict[str, Any]:
        """The ledger entry: the gateway's own count at the decided price; disputed if the receipt disagrees.
        One entry per (decision, segment): stored once however often the write is tried."""
        price = price_per_mtok or 0.0
        disputes = [f"{k}: {e}" for k, e in check.problems]
        return {
            "decision_id": decision_id,
            "request_id": request_id,
            "node_id": check.node_id,
            "model": model,
            "tokens": check.delivered,
            "claimed_tokens": check.claimed,
            "price_per_mtok": price,
            "amount_usd": check.delivered * price / 1e6,
            "status": "disputed" if disputes else ("ok" if check.receipted else "unreceipted"),
            "detail": "; ".join(disputes),
            "at": time.time(),
            "entry_key": f"{decision_id}/{segment}",
        }

    def write(self, entries: list[dict[str, Any]]) -> None:
        """Append entries through the store writer (off the event loop, in the background)."""
        if entries:
            self.writer.submit(self.writer.store.record_settlements, entries)

    async def commit(self, entries: list[dict[str, Any]]) -> None:
        """Append entries and wait until they are stored: an answer is delivered only once it is settled, so a
        gateway that dies cannot leave a delivered answer unpaid. On a database error the entries go to the
        store writer, which retries (the entry key keeps a retried write from counting twice)."""
        if not entries:
            return
        try:
            await self.settlements.commit(entries)
        except Exception as exc:
            log.warning("settlement write failed (%s); queued for retry", exc)
            self.write(entries)


__all__ = ["ReceiptCheck", "ReceiptChecker"]
