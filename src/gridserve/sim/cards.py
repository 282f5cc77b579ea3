"""Which cards of a simulated grid serve its model, and why: the "cards" section of `gridserve simulate`'s report.

Every figure comes from the code the simulator and the gateway run, not from a copy of it:

- fit: `engines.emulated.placement_for` chooses the widest precision whose weights (every parameter: all the
  experts of a mixture of experts) fit in the card's memory less the KV reserve; a card it refuses is left out of
  the simulated grid (`gridserve simulate` says so);
- speed: `perfmodel.predict` (decode streams the weights one token reads: a mixture of experts' active ones at
  batch 1, and with a full batch the further experts its sequences are routed to, `roofline.moe_factor`);
- price: `perfmodel.derived_price_per_mtok`, what the scheduler charges for an emulated node with no operator price;
- nodes: the simulated grid's own nodes (`Simulation(config).nodes`, drawn as every policy's run draws them);
- traffic: each served request's `Outcome.accelerator` (the card of the node that finished it).
"""

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from gridserve.catalog import hardware_spec, model_spec
from gridserve.catalog.hardware import HardwareSpec
from gridserve.catalog.models import ModelSpec
from gridserve.engines.placement import KV_RESERVE, PLACEMENTS, EmulationError, placement_for
from gridserve.perfmodel import Load, derived_price_per_mtok, predict
from gridserve.scheduler import named_profile
from gridserve.sim.engine import Outcome, SimConfig, Simulation
from gridserve.sim.grid import DECENTRALIZED_MIX

GIB = 2**30


def precision(dtype: str, quantization: str) -> str:
    """How a placement reads: its quantization, or its dtype when unquantized."""
    return dtype if quantization == "none" else quantization


def _gib(nbytes: float) -> str:
    return f"{nbytes / GIB:.1f} GiB"


def _params(value: float) -> str:
    return f"{value / 1e9:.1f}B"


def card_fit(model: ModelSpec, hw: HardwareSpec) -> dict[str, Any]:
    """Whether `hw` serves `model` and why (the placement chosen and its weights against the card's memory, or what
    even the smallest placement needs), what one decoded token reads, the predicted decode speed of one sequence
    and ITL of a full batch, and the derived price. JSON-ready; figures are None where the card does not serve."""
    usable = hw.memory_gib * GIB * (1 - KV_RESERVE)
    held = f"all {_params(model.params)} params" + (f", {model.experts} experts," if model.moe else "")
    entry: dict[str, Any] = {
        "card": hw.key,
        "name": hw.name,
        "memory_gib": hw.memory_gib,
        "usable_gib": round(usable / GIB, 2),
        "bandwidth_gbs": hw.bandwidth_gbs,
        "batch_slots": max(1, hw.batch_slots),
        "params_held": model.params,
        "params_per_token": model.decode_params(1),
    }
    try:
        dtype, quant = placement_for(model, hw)
    except EmulationError:
        smallest = PLACEMENTS[-1]
        need = model.weight_bytes(*smallest)
        return {
            **entry,
            "serves": False,
            "dtype": None,
            "quantization": None,
            "weight_gib": round(need / GIB, 2),
            "reason": f"does not fit even at {precision(*smallest)}: needs {_gib(need)}, has {hw.memory_gib:g} GiB "
            f"({_gib(usable)} usable after the {KV_RESERVE:.0%} KV reserve)",
            "bytes_per_token": None,
            "decode_tokens_per_s": None,
            "itl_full_batch_s": None,
            "full_batch_tokens_per_s": None,
            "price_per_mtok": None,
        }
    weights = model.weight_bytes(dtype, quant)
    reason = f"{precision(dtype, quant)}: {held} take {_gib(weights)} of {_gib(usable)} usable ({hw.memory_gib:g} GiB)"
    wider = PLACEMENTS[: PLACEMENTS.index((dtype, quant))] if (dtype, quant) in PLACEMENTS else ()
    if wider:
        reason += f"; {precision(*wider[-1])} would need {_gib(model.weight_bytes(*wider[-1]))}"
    slots = max(1, hw.batch_slots)
    alone = predict(model, hw, prompt_tokens=1, dtype=dtype, quantization=quant)
    full = predict(model, hw, prompt_tokens=1, dtype=dtype, quantization=quant, load=Load(active=slots - 1))
    return {
        **entry,
        "serves": True,
        "dtype": dtype,
        "quantization": quant,
        "weight_gib": round(weights / GIB, 2),
        "reason": reason,
        "bytes_per_token": model.decode_bytes(1, dtype, quant),
        "decode_tokens_per_s": round(alone.decode_tokens_per_s, 2),
        "itl_full_batch_s": round(full.itl_s, 6),
        "full_batch_tokens_per_s": round(slots / full.itl_s, 1),
        "price_per_mtok": round(derived_price_per_mtok(model, hw, dtype, quant), 4),
    }


def cards_section(
    config: SimConfig,
    served: Mapping[str, Sequence[Outcome]] | None = None,
    mix: Mapping[str, float] = DECENTRALIZED_MIX,
) -> list[dict[str, Any]]:
    """One entry per card of `mix` (the default mix: cards the simulated grid left out included, with why): its fit
    and figures (`card_fit`) for `config.model`, its share of `mix`, its nodes in the simulated grid of `config`
    and, per policy of `served` (policy -> the outcomes of its run at the reported load), the shares of the served
    requests and of their output tokens that a node of that card finished."""
    model = model_spec(config.model)
    nodes = Counter(n.hw.key for n in Simulation(config, named_profile("default")).nodes)
    total_nodes = max(1, sum(nodes.values()))
    by_policy = {}
    for policy, outcomes in (served or {}).items():
        done = [o for o in outcomes if not o.failed]
        requests = Counter(o.accelerator for o in done)
        tokens: Counter[str] = Counter()
        for o in done:
            tokens[o.accelerator] += o.output_tokens
        by_policy[policy] = (requests, max(1, len(done)), tokens, max(1, sum(tokens.values())))
    cards = list(mix) + [c for c in sorted(nodes) if c not in mix]
    entries = []
    for card in cards:
        entry = card_fit(model, hardware_spec(card))
        entries.append(
            {
                **entry,
                "mix_share": mix.get(card, 0.0),
                "nodes": nodes.get(card, 0),
                "node_share": round(nodes.get(card, 0) / total_nodes, 4),
                "served": {
                    policy: {
                        "requests": round(requests[card] / n_requests, 4),
                        "tokens": round(tokens[card] / n_tokens, 4),
                    }
                    for policy, (requests, n_requests, tokens, n_tokens) in by_policy.items()
                },
            }
        )
    return entries


def describe_model(model: ModelSpec) -> str:
    """One sentence: what every card must hold and what one decoded token reads."""
    if model.moe:
        return (
            f"{model.name} is a mixture of experts ({model.experts} experts, {model.experts_per_token} per token): a "
            f"card holds all {_params(model.params)} parameters, a decoded token reads "
            f"{_params(model.decode_params(1))} of them (a full batch reads more: its sequences are routed to more "
            "experts)."
        )
    return f"{model.name} is dense: a card holds its {_params(model.params)} parameters and a decoded token reads all."


def markdown(cards: Sequence[dict[str, Any]], model: ModelSpec, load: float) -> list[str]:
    """The summary's cards section: what the columns mean, a row per card, then per policy the share of traffic
    each serving card took at `load`."""
    if not cards:
        return []
    lines = [
        "## Cards",
        "",
        describe_model(model)
        + f" Columns: *serves* and *why*: the widest precision ({', then '.join(precision(*p) for p in PLACEMENTS)})"
        f" whose weights fit in the card's memory less the {KV_RESERVE:.0%} KV reserve (*usable*), as an emulated"
        " node chooses (a card that holds"
        " none is left out of the simulated grid); *weights GiB*: every parameter at that precision; *GB read/token*:"
        " weight bytes one decoded token streams; *tok/s at batch 1*: predicted decode speed of one sequence alone;"
        " *ITL full batch*: predicted inter-token latency with every batch slot busy; *$/Mtok*: the derived price per"
        " million generated tokens; *nodes*: the card's share of the simulated nodes.",
        "",
        "| card | serves | why | weights GiB / memory GiB | GB read/token | tok/s at batch 1 |"
        " ITL full batch ms (slots) | $/Mtok | nodes |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in cards:
        if c["serves"]:
            figures = (
                f"{c['bytes_per_token'] / 1e9:.2f} | {c['decode_tokens_per_s']:.1f} | "
                f"{c['itl_full_batch_s'] * 1e3:.1f} ({c['batch_slots']}) | {c['price_per_mtok']:.3f}"
            )
        else:
            figures = "- | - | - | -"
        lines.append(
            f"| {c['card']} | {'yes' if c['serves'] else 'no'} | {c['reason']} | "
            f"{c['weight_gib']:.1f} / {c['memory_gib']:g} | {figures} | {c['node_share']:.1%} ({c['nodes']}) |"
        )
    policies = list(dict.fromkeys(p for c in cards for p in c["served"]))
    serving = [c for c in cards if c["serves"]]
    if policies and serving:
        lines += [
            "",
            f"Traffic per card at load {load}: the share of the served requests / of their output tokens that a node"
            " of the card finished (a request that failed over counts for the node that finished it).",
            "",
            "| policy | " + " | ".join(c["card"] for c in serving) + " |",
            "|---|" + "---|" * len(serving),
        ]
        for policy in policies:
            cells = [
                f"{c['served'][policy]['requests']:.1%} / {c['served'][policy]['tokens']:.1%}"
                if policy in c["served"]
                else "-"
                for c in serving
            ]
            lines.append(f"| {policy} | " + " | ".join(cells) + " |")
    return lines
