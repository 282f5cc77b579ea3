"""Test and bench support: receipts for checking an engine's output with the verifier directly, no node between."""

from typing import Any

from gridserve.types import NodeId, Receipt, TokenEvent


def unsigned_receipt(final: TokenEvent, model: str, **changes: Any) -> Receipt:
    """The receipt for a generation whose last event is `final` (counts, prompt digest, timings and proof from it;
    no resumed tokens; weights digest and input/output commitments left empty), with `changes` applied."""
    receipt = Receipt(
        request_id="r",
        node_id=NodeId("n"),
        model=model,
        weights_digest="",
        input_commitment="",
        prompt_digest=final.prompt_digest,
        output_commitment="",
        resumed=0,
        prompt_tokens=final.prompt_tokens,
        cached_tokens=final.cached_tokens,
        completion_tokens=final.completion_tokens,
        finish_reason=str(final.finish_reason),
        queue_s=final.queue_s,
        prefill_s=final.prefill_s,
        decode_s=final.decode_s,
        proof=final.proof,
    )
    return receipt.model_copy(update=changes)


__all__ = ["unsigned_receipt"]
