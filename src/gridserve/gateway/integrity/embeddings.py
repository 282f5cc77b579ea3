"""What the gateway checks of a node's embeddings (nodes are untrusted).

Every answer (`read_reply`): signed by the node's own key for this request and model, one vector per input, each
of the model's width (the catalogue's hidden size where the model is known: a pooled hidden state has that width,
gridserve's engines' and llama.cpp's alike; otherwise one width for every vector of the answer), every value
finite. An answer that fails is an integrity incident at the node (`Integrity`): the request goes on to the next
node, and the client never sees it.

A sample (`EmbeddingAudit`): where the gateway's verifier runs the model at the node's precision (the tiny model
and Gemma 3 270M in float32: gateway/integrity/audit.py), it re-computes a few inputs of an answer, chosen at random
(the node cannot tell which), at the node's audit rate, and compares the vectors: further apart than
`AUDIT_TOLERANCE` is a failed audit, a severe incident. Quantized or unknown weights (an upstream server) get the
per-answer checks only: the verifier's float32 vectors are not theirs."""

import asyncio
import logging
import unicodedata
from typing import TYPE_CHECKING

import numpy as np
from pydantic import ValidationError

from gridserve.catalog.models import MODELS
from gridserve.gateway.integrity.audit import Auditor, AuditResult, Verifier
from gridserve.gateway.registry.membership import Membership
from gridserve.reliability import NodeEvent
from gridserve.trust import EnvelopeVerifier, TrustError
from gridserve.types import ModelOffer
from gridserve.types.base import lenient
from gridserve.types.embedding import EMBED_REPLY_PURPOSE, BadVector, EmbedReply, EmbedRequest, Floats, decode_vectors

if TYPE_CHECKING:
    from gridserve.engines.torch_engine import LoadedModel

log = logging.getLogger("gridserve.gateway")
AUDIT_TOLERANCE = 0.02
"""Largest distance between a node's vector and the verifier's (both unit length: cosine similarity 0.9998) for an
honest node. Honest float differences (thread counts, kernels) are ~1e-6; other weights or a skipped layer are far
beyond it."""
AUDIT_INPUTS = 4
"""Inputs of an answer the verifier re-computes (at random: a node cannot tell which to compute honestly)."""


SPECIAL_TOKENS_PER_INPUT = 4
"""Tokens an input may add beyond its bytes (begin and end markers; gridserve's engines add one, llama.cpp's
embedding at most two)."""


def most_tokens(inputs: tuple[str, ...]) -> int:
    """The most input tokens the gateway pays a node for `inputs` (the node counts them; the gateway has no
    tokeniser): at most one token per byte of the input as the tokeniser may normalise it first (NFKC or NFKD can
    lengthen it: "\ufdfa" is 3 bytes and 33 after NFKC), plus its special tokens. Byte-level tokenisers and byte
    fallback give exactly one per byte; merges fewer."""
    return sum(_longest_bytes(text) + SPECIAL_TOKENS_PER_INPUT for text in inputs)


def _longest_bytes(text: str) -> int:
    """UTF-8 bytes of `text` as given or in the longer of the compatibility normal forms tokenisers apply."""
    forms = (unicodedata.normalize(form, text) for form in ("NFKC", "NFKD"))
    return max(len(text.encode("utf-8")), *(len(form.encode("utf-8")) for form in forms))


class BadReply(Exception):
    """The node's answer is not a valid one for the request (an integrity failure: the message says how)."""


def expected_dimensions(model: str) -> int | None:
    """The width of the model's vectors when the catalogue knows the model (its hidden size), else None."""
    spec = MODELS.get(model)
    return spec.hidden if spec is not None else None


def read_reply(verifier: EnvelopeVerifier, body: bytes, public_key: str, job: EmbedRequest) -> tuple[Floats, int]:
    """(one vector per input as an (n, d) float32 array, prompt tokens) of a node's signed answer; BadReply
    naming the first thing wrong with it."""
    try:
        envelope = verifier.verify(body, purpose=EMBED_REPLY_PURPOSE, expected_keyid=public_key)
        reply = lenient(EmbedReply, envelope.payload)[0]
    except TrustError as exc:
        raise BadReply(f"the answer's signature does not hold ({exc.kind}: {exc.detail})") from exc
    except ValidationError as exc:
        raise BadReply(f"the answer is not an embeddings answer ({exc.errors()[0]['msg']})") from exc
    if (reply.request_id, reply.model) != (job.request_id, job.model):
        raise BadReply(f"the answer is for {reply.request_id} of {reply.model}, not {job.request_id} of {job.model}")
    if len(reply.vectors) != len(job.inputs):
        raise BadReply(f"{len(reply.vectors)} vectors for {len(job.inputs)} inputs")
    width = expected_dimensions(job.model)
    if width is not None and reply.dimensions != width:
        raise BadReply(f"vectors of {reply.dimensions} values; {job.model}'s have {width}")
    try:
        vectors = decode_vectors(reply.vectors, reply.dimensions)
    except BadVector as exc:
        raise BadReply(str(exc)) from exc
    if not np.isfinite(vectors).all():
        row = int(np.argwhere(~np.isfinite(vectors))[0][0])
        raise BadReply(f"vector {row} holds a value that is not finite")
    return vectors, reply.prompt_tokens


class Integrity:
    """Incidents of the answers that fail `read_reply` (one owner: the membership's ledger)."""

    def __init__(self, membership: Membership) -> None:
        self.membership = membership

    def incident(self, node_id: str, request_id: str, problem: str) -> None:
        log.warning("invalid embeddings from %s: %s", node_id, problem)
        self.membership.note(NodeEvent.severe(node_id, f"integrity: embeddings: {problem} (request {request_id})"))


def verifiable(auditor: Auditor, offer: ModelOffer | None) -> bool:
    """Whether the verifier computes this offer's vectors: a model it runs, whatever precision the node says it
    runs it at (the node's own say-so must not exempt it; half precision moves a unit vector by ~1e-3, far inside
    the audit's distance)."""
    return offer is not None and auditor.verifier.supports(offer.name)


class EmbeddingAudit:
    """Sampled re-computation of embeddings on the gateway's verifier (its thread; its model cache)."""

    def __init__(self, auditor: Auditor) -> None:
        self.auditor = auditor
        self.pending: set[asyncio.Task[None]] = set()

    def maybe_audit(self, node_id: str, offer: ModelOffer | None, job: EmbedRequest, vectors: Floats) -> bool:
        """Start an audit of the answer at the node's audit rate, off the request path; True if one started."""
        auditor = self.auditor
        if not verifiable(auditor, offer) or auditor.rng.random() >= auditor.rate(node_id):
            return False
        picks = sorted(auditor.rng.sample(range(len(job.inputs)), min(AUDIT_INPUTS, len(job.inputs))))
        task = asyncio.create_task(self._audit(node_id, job, picks, vectors[picks].copy()))
        self.pending.add(task)
        task.add_done_callback(self.pending.discard)
        return True

    async def _audit(self, node_id: str, job: EmbedRequest, picks: list[int], vectors: Floats) -> None:
        try:
            result = await self.auditor.verifier.run(check_embeddings, node_id, job, picks, vectors)
        except Exception:  # a verifier bug must not accuse a node: logged, counted, no incident
            log.exception("embeddings audit of %s on %s could not run", job.request_id, node_id)
            self.auditor.metrics.audits.labels(result="error").inc()
            return
        self.auditor.record(result)


def check_embeddings(
    verifier: Verifier, node_id: str, job: EmbedRequest, picks: list[int], vectors: Floats
) -> AuditResult:
    """Where the verifier's models live (Verifier.run): the picked inputs' vectors against the verifier's own."""
    import torch

    from gridserve.engines.pooling import mean_pooled

    loaded: LoadedModel = verifier._model(job.model)
    problems: list[str] = []
    with torch.inference_mode():
        for index, vector in zip(picks, vectors, strict=True):
            own = mean_pooled(loaded.model, loaded.codec.encode_prompt(job.inputs[index]))
            distance = float(np.linalg.norm(vector.astype(np.float64) - own.astype(np.float64)))
            if distance > AUDIT_TOLERANCE:
                problems.append(
                    f"audit: embedding of input {index} is {distance:.4f} from the model's (tolerance "
                    f"{AUDIT_TOLERANCE})"
                )
                break
    return AuditResult(node_id, job.request_id, tuple(problems), proof_checked=False)


__all__ = [
    "AUDIT_INPUTS",
    "AUDIT_TOLERANCE",
    "BadReply",
    "EmbeddingAudit",
    "Integrity",
    "check_embeddings",
    "expected_dimensions",
    "most_tokens",
    "read_reply",
    "verifiable",
]
