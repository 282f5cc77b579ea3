"""The node's signed receipt for each generation, sent with its last event (`"receipt"`: an envelope)."""

import time
from typing import Any

import orjson

from gridserve.node.agent import NodeAgent
from gridserve.node.dishonest import Dishonesty
from gridserve.trust import Identity, sign_envelope
from gridserve.trust.commitments import input_commitment, token_commitment
from gridserve.types import NodeId, Receipt, TokenEvent

RECEIPT_LIFETIME_S = 60.0


class Receipter:
    """Collects the token ids a generation sends and signs the receipt at its end."""

    def __init__(self, agent: NodeAgent, request: dict[str, Any], weights_digest: str, lies: Dishonesty) -> None:
        self.agent, self.request, self.weights_digest, self.lies = agent, request, weights_digest, lies
        self.ids: list[int] = []

    def line(self, event: TokenEvent) -> bytes:
        """The event's NDJSON line; the last one carries the signed receipt."""
        self.ids.extend(event.token_ids)
        body = event.wire()
        if event.finish_reason is not None:
            body["receipt"] = self.sign(event).decode()
        return orjson.dumps(body) + b"\n"

    def receipt(self, final: TokenEvent) -> Receipt:
        resumed = len(self.request.get("resume") or ())
        return Receipt(
            request_id=str(self.request["request_id"]),
            node_id=NodeId(self.agent.identity.node_id),
            model=str(self.request["model"]),
            weights_digest=self.weights_digest,
            input_commitment=input_commitment(self.request),
            prompt_digest=final.prompt_digest,
            output_commitment=token_commitment(self.ids),
            resumed=resumed,
            prompt_tokens=final.prompt_tokens,
            cached_tokens=final.cached_tokens,
            completion_tokens=self.lies.claimed_tokens(final.completion_tokens),
            finish_reason=str(final.finish_reason),
            queue_s=final.queue_s,
            prefill_s=final.prefill_s,
            decode_s=final.decode_s,
            proof=final.proof,
        )

    def sign(self, final: TokenEvent) -> bytes:
        signer: Identity = self.lies.signer(self.agent.identity)
        payload = self.receipt(final).model_dump(mode="json")
        fresh = sign_envelope(signer, payload, purpose="receipt", now=time.time(), lifetime_s=RECEIPT_LIFETIME_S)
        return self.lies.replayed(fresh)
