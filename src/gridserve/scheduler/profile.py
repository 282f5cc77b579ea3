"""Profiles: which filters, which scorers with which weights, and which picker. Configuration, in YAML."""

import copy
import functools
import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from gridserve.scheduler import baselines as _baselines  # noqa: F401  (registers the plugins)
from gridserve.scheduler import filters as _filters  # noqa: F401
from gridserve.scheduler import pickers as _pickers  # noqa: F401
from gridserve.scheduler import prefix_baselines as _prefix_baselines  # noqa: F401
from gridserve.scheduler import scorers as _scorers  # noqa: F401
from gridserve.scheduler.plugins import FILTERS, PICKERS, SCORERS, Filter, Picker, Scorer, build


class ProfileError(ValueError):
    pass


@dataclass(frozen=True)
class Profile:
    name: str
    filters: tuple[Filter, ...]
    scorers: tuple[tuple[Scorer, float], ...]
    picker: Picker
    sample: int = 0
    """Decide over a uniform random sample of this many nodes when the pool is larger (the power of d choices,
    as large load balancers do); 0: every node. If nothing in the sample is eligible, the whole pool decides."""


def _entry(item: Any, where: str) -> tuple[str, dict[str, Any], float]:
    if isinstance(item, str):
        return item, {}, 1.0
    if not isinstance(item, dict) or "type" not in item:
        raise ProfileError(f"{where}: each entry needs a 'type'")
    args = item.get("args") or {}
    if not isinstance(args, dict):
        raise ProfileError(f"{where}: 'args' must be a mapping")
    weight = item.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, int | float) or not math.isfinite(weight) or weight < 0:
        raise ProfileError(f"{where}: weight must be a finite, non-negative number (got {weight!r})")
    return str(item["type"]), args, float(weight)


def profile_from_dict(doc: Any) -> Profile:
    if not isinstance(doc, dict):
        raise ProfileError("a profile is a mapping with name, filters, scorers and picker")
    try:
        filters = tuple(build(FILTERS, "filter", *_entry(f, "filters")[:2]) for f in doc.get("filters") or [])
        scorers = []
        for item in doc.get("scorers") or []:
            type_name, args, weight = _entry(item, "scorers")
            scorers.append((build(SCORERS, "scorer", type_name, args), weight))
        picker_type, picker_args, _ = _entry(doc.get("picker") or "max-score", "picker")
        picker = build(PICKERS, "picker", picker_type, picker_args)
    except ValueError as exc:
        raise ProfileError(str(exc)) from exc
    if not scorers:
        raise ProfileError("a profile needs at least one scorer")
    sample = doc.get("sample", 0)
    if isinstance(sample, bool) or not isinstance(sample, int) or sample < 0:
        raise ProfileError(f"sample must be a whole number >= 0 (got {sample!r})")
    name = str(doc.get("name", "custom"))
    return Profile(name=name, filters=filters, scorers=tuple(scorers), picker=picker, sample=sample)


def load_profile(path: Path) -> Profile:
    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ProfileError(f"cannot read profile {path}: {exc}") from exc
    return profile_from_dict(doc)


def named_profile(name: str) -> Profile:
    """A packaged profile: `default` or a baseline (`round-robin`, `random`, `least-loaded`, `capacity-only`,
    `petals-like`, `latency-ewma`, `prefix-load`, `cache-aware`, `kv-overlap`). Each call builds fresh plugins (a
    round-robin counter is not shared)."""
    return profile_from_dict(copy.deepcopy(_packaged_doc(name)))


@functools.cache
def _packaged_doc(name: str) -> Any:
    """A packaged profile's document, parsed once (PyYAML takes ~10 ms a parse; the plugins are still built anew
    from a copy on every call)."""
    path = resources.files("gridserve.scheduler").joinpath(f"profiles/{name}.yaml")
    if not path.is_file():
        known = sorted(
            p.name.removesuffix(".yaml") for p in resources.files("gridserve.scheduler").joinpath("profiles").iterdir()
        )
        raise ProfileError(f"no packaged profile {name!r}; known: {', '.join(known)}")
    return yaml.safe_load(path.read_text())


def default_profile() -> Profile:
    return named_profile("default")
