"""The gateway's receipt checks (gateway/integrity/receipts.py) on receipts signed by a real node key: an honest
receipt passes; a prefix-cache count that differs from the stream's, or exceeds the prompt, is an integrity
incident that quarantines the node's record (severe, never averaged away)."""

import time
from collections.abc import Iterator
from typing import Any

import pytest
from tests.unit.dispatch_support import CONFIG, registered, store_writer

from gridserve.gateway.integrity.receipts import ReceiptChecker
from gridserve.gateway.ops.metrics import GatewayMetrics
from gridserve.gateway.registry.membership import Membership
from gridserve.reliability import ReliabilityState
from gridserve.store import StoreWriter
from gridserve.trust import EnvelopeVerifier, FreshnessPolicy, Identity, sign_envelope
from gridserve.trust.commitments import input_commitment, token_commitment
from gridserve.types import Capability, GenerateRequest, ModelOffer, NodeId, SamplingParams, StreamEvent
from gridserve.types.base import wire_payload

NODE = Identity.generate()
JOB = GenerateRequest(request_id="r1", model="m", prompt="hello", sampling=SamplingParams(max_tokens=4))
SENT = [5, 6, 7, 8]
OFFER = ModelOffer(name="m", dtype="float32", quantization="none", max_context=64, weights_digest="sha256:w")


@pytest.fixture(scope="module")
def writer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StoreWriter]:
    yield from store_writer(tmp_path_factory.mktemp("store"))


def _checker(writer: StoreWriter) -> ReceiptChecker:
    membership = Membership(CONFIG, EnvelopeVerifier(FreshnessPolicy(), time.time), writer, GatewayMetrics())
    event = registered(NODE.node_id)
    cap: Capability = event.capability.model_copy(
        update={"node_id": NodeId(NODE.node_id), "public_key": NODE.public_key, "models": (OFFER,)}
    )
    membership.apply(type(event)(cap, at=event.at, registered_at=event.at, capability_at=event.at, last_seen=event.at))
    return ReceiptChecker(membership, writer)


def _final(cached_said: int, cached_signed: int, prompt: int = 10, **newer: Any) -> StreamEvent:
    payload: dict[str, Any] = {
        "request_id": JOB.request_id,
        "node_id": NODE.node_id,
        "model": JOB.model,
        "weights_digest": OFFER.weights_digest,
        "input_commitment": input_commitment(wire_payload(JOB)),
        "prompt_digest": "",
        "output_commitment": token_commitment(SENT),
        "resumed": 0,
        "prompt_tokens": prompt,
        "completion_tokens": len(SENT),
        "finish_reason": "length",
        "queue_s": 0.0,
        "prefill_s": 0.0,
        "decode_s": 0.0,
        "cached_tokens": cached_signed,
        **newer,
    }
    receipt = sign_envelope(NODE, payload, purpose="receipt", now=time.time()).decode()
    final = StreamEvent(finish_reason="length", prompt_tokens=prompt, completion_tokens=len(SENT), receipt=receipt)
    if cached_said:
        final["cached_tokens"] = cached_said
    return final


@pytest.mark.parametrize("cached", [0, 6, 10])
def test_an_honest_receipt_with_its_cached_count_passes(writer: StoreWriter, cached: int) -> None:
    check = _checker(writer).check(NODE.node_id, JOB, SENT, _final(cached, cached))
    assert check.ok and check.receipt is not None and check.receipt.cached_tokens == cached


def test_a_newer_nodes_receipt_is_read_without_the_fields_this_version_does_not_know(writer: StoreWriter) -> None:
    check = _checker(writer).check(NODE.node_id, JOB, SENT, _final(0, 0, draft_tokens=3, energy={"joules": 1.5}))
    assert check.ok and check.receipt is not None and check.receipt.completion_tokens == len(SENT), check.problems
    wrong = _checker(writer).check(NODE.node_id, JOB, SENT, _final(0, 0, draft_tokens=3, completion_tokens="four"))
    assert not wrong.ok and any("receipt malformed" in p for _, p in wrong.problems), "what it reads is checked"


@pytest.mark.parametrize(
    ("said", "signed", "evidence"),
    [
        (8, 2, "cached tokens mismatch: the stream says 8, the receipt 2"),
        (0, 2, "cached tokens mismatch: the stream says 0, the receipt 2"),
        (11, 11, "receipt claims 11 cached of 10 prompt tokens"),
    ],
)
def test_a_cached_count_that_differs_or_exceeds_the_prompt_is_an_integrity_incident(
    writer: StoreWriter, said: int, signed: int, evidence: str
) -> None:
    receipts = _checker(writer)
    check = receipts.check(NODE.node_id, JOB, SENT, _final(said, signed))
    assert not check.ok and ("integrity", evidence) in check.problems
    state = receipts.membership.book.state(NODE.node_id, time.time())
    assert state == ReliabilityState.QUARANTINED
