"""The simulator report's cards section (sim/cards.py): which cards of the default mix serve a model and why, what a
decoded token reads (a mixture of experts' active parameters, not all it holds), predicted speed, price, node and
traffic shares; and `gridserve simulate` writing it for MoE models and a model read from a config.json."""

import json
import shutil
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from gridserve.catalog import MODELS, hardware_spec, model_spec
from gridserve.engines.placement import placement_for
from gridserve.perfmodel import Load, derived_price_per_mtok, predict
from gridserve.scheduler import named_profile
from gridserve.sim.cards import card_fit, cards_section, markdown
from gridserve.sim.engine import Outcome, SimConfig, Simulation
from gridserve.sim.grid import DECENTRALIZED_MIX

AZURE_CONV = Path("/work/shared/data/azure-llm-2023/AzureLLMInferenceTrace_conv.csv")


def _by_card(model: str, mix: dict[str, float] | None = None) -> dict[str, dict[str, Any]]:
    config = SimConfig(nodes=20, model=model, mix=dict(mix or DECENTRALIZED_MIX))
    return {c["card"]: c for c in cards_section(config)}


def test_qwen3_30b_a3b_serves_on_every_card_but_the_t4_and_says_why() -> None:
    cards = _by_card("qwen3-30b-a3b", mix={k: v for k, v in DECENTRALIZED_MIX.items() if k != "t4"})
    assert list(cards) == list(DECENTRALIZED_MIX)
    assert [c for c, e in cards.items() if not e["serves"]] == ["t4"]
    t4 = cards["t4"]
    assert t4["reason"].startswith("does not fit even at q4_k_m: needs 17.4 GiB, has 16 GiB")
    assert "14.4 GiB usable" in t4["reason"]
    assert t4["nodes"] == 0 and t4["bytes_per_token"] is None and t4["price_per_mtok"] is None
    # the widest placement that fits, and what the next wider one would have needed
    assert (cards["rtx4090"]["dtype"], cards["rtx4090"]["quantization"]) == ("float16", "q4_k_m")
    assert cards["rtx4090"]["reason"] == (
        "q4_k_m: all 30.5B params, 128 experts, take 17.4 GiB of 21.6 GiB usable (24 GiB); q8_0 would need 30.2 GiB"
    )
    assert cards["l40s"]["quantization"] == "q8_0" and "float16 would need 56.9 GiB" in cards["l40s"]["reason"]
    assert cards["h100-sxm"]["quantization"] == "none" and "would need" not in cards["h100-sxm"]["reason"]


def test_an_moe_token_reads_its_active_parameters_but_the_card_holds_them_all() -> None:
    spec = model_spec("qwen3-30b-a3b")
    for card in ("rtx4090", "l40s", "h100-sxm"):
        fit = card_fit(spec, hardware_spec(card))
        assert 29e9 < fit["params_held"] < 31e9  # 30.5B published
        assert 2.8e9 < fit["params_per_token"] < 3.4e9  # "A3B": 3.3B active published (3.0B without the embedding)
        per_param = fit["weight_gib"] * 2**30 / fit["params_held"]
        # bytes read per token: the active ~3B params at the placement's width, about a tenth of the weights held
        assert fit["bytes_per_token"] == pytest.approx(fit["params_per_token"] * per_param, rel=1e-3)
        assert 0.08 < fit["bytes_per_token"] / (fit["weight_gib"] * 2**30) < 0.12
    # a dense 8B model reads every weight it holds: the 30B MoE decodes faster on the same card at the same width
    dense = card_fit(model_spec("llama-3-8b"), hardware_spec("h100-sxm"))
    moe = card_fit(spec, hardware_spec("h100-sxm"))
    assert dense["bytes_per_token"] == pytest.approx(model_spec("llama-3-8b").weight_bytes())
    assert dense["params_per_token"] == dense["params_held"]
    assert moe["decode_tokens_per_s"] > 2 * dense["decode_tokens_per_s"]


def test_gpt_oss_20b_serves_on_every_card_of_the_default_mix() -> None:
    cards = _by_card("gpt-oss-20b")
    assert all(c["serves"] for c in cards.values())
    assert cards["t4"]["quantization"] == "q4_k_m" and "q8_0 would need 20.7 GiB" in cards["t4"]["reason"]
    assert cards["rtx4090"]["quantization"] == "q8_0"
    spec = model_spec("gpt-oss-20b")
    assert 20e9 < spec.params < 22e9 and 3.3e9 < cards["h100-sxm"]["params_per_token"] < 3.9e9
    assert sum(c["nodes"] for c in cards.values()) == 20
    assert sum(c["node_share"] for c in cards.values()) == pytest.approx(1.0, abs=1e-3)


def test_the_figures_are_the_simulators_and_the_schedulers() -> None:
    config = SimConfig(nodes=30, model="gpt-oss-20b", seed=3)
    sim = Simulation(config, named_profile("default"))
    cards = {c["card"]: c for c in cards_section(config)}
    spec = sim.model
    for node in sim.nodes:
        fit = cards[node.hw.key]
        assert (fit["dtype"], fit["quantization"]) == (node.dtype, node.quant) == placement_for(spec, node.hw)
        assert fit["price_per_mtok"] == pytest.approx(node.price_per_mtok, abs=1e-4)
        assert fit["weight_gib"] == pytest.approx(node.weight_bytes / 2**30, abs=0.01)
    for key, fit in cards.items():
        hw = hardware_spec(key)
        alone = predict(spec, hw, prompt_tokens=1, dtype=fit["dtype"], quantization=fit["quantization"])
        full = predict(
            spec,
            hw,
            prompt_tokens=1,
            dtype=fit["dtype"],
            quantization=fit["quantization"],
            load=Load(active=hw.batch_slots - 1),
        )
        assert fit["decode_tokens_per_s"] == pytest.approx(1 / alone.itl_s, abs=0.01)
        assert fit["itl_full_batch_s"] == pytest.approx(full.itl_s, abs=1e-6)
        # a full batch of an MoE reads more experts than one sequence: its ITL grows beyond the dense growth
        assert full.itl_s > alone.itl_s * (1 + 0.02 * (hw.batch_slots - 1))
        price = derived_price_per_mtok(spec, hw, fit["dtype"], fit["quantization"])
        assert fit["price_per_mtok"] == pytest.approx(price, abs=1e-4)
        assert fit["nodes"] == sum(1 for n in sim.nodes if n.hw.key == key)


def test_traffic_shares_come_from_the_outcomes() -> None:
    def served(card: str, tokens: int) -> Outcome:
        return Outcome(0.0, 100, tokens, f"n-{card}", card, 0.1, 0.01, 0.2)

    failed = Outcome(0.0, 100, 50, None, "", float("inf"), float("inf"), 0.0)
    outcomes = [served("rtx4090", 30), served("rtx4090", 10), served("h100-sxm", 60), failed]
    config = SimConfig(nodes=10, model="llama-3-8b")
    cards = {c["card"]: c for c in cards_section(config, {"default": outcomes, "idle": []})}
    assert cards["rtx4090"]["served"]["default"] == {"requests": pytest.approx(2 / 3, abs=1e-4), "tokens": 0.4}
    assert cards["h100-sxm"]["served"]["default"] == {"requests": pytest.approx(1 / 3, abs=1e-4), "tokens": 0.6}
    assert cards["t4"]["served"]["default"] == {"requests": 0.0, "tokens": 0.0}
    assert all(c["served"]["idle"] == {"requests": 0.0, "tokens": 0.0} for c in cards.values())
    lines = markdown(list(cards.values()), model_spec("llama-3-8b"), 0.5)
    assert lines[0] == "## Cards" and "llama-3-8b is dense" in lines[2]
    assert "| default | 66.7% / 40.0% |" in "\n".join(lines)
    # a dense model on every card: every card serves, figures in every row
    rows = [line for line in lines if line.startswith("| ") and "| yes |" in line]
    assert len(rows) == len(DECENTRALIZED_MIX)


# -- gridserve simulate, in-process ----------------------------------------------------------------------------------


@pytest.fixture
def catalogue() -> Iterator[None]:
    """`--model-config` adds to the process's catalogue: put it back."""
    saved = dict(MODELS)
    yield
    MODELS.clear()
    MODELS.update(saved)


def _simulate(tmp_path: Path, *args: str) -> tuple[dict[str, Any], str, str]:
    from gridserve.cli.main import app

    if not AZURE_CONV.exists():
        pytest.skip(f"{AZURE_CONV} is not here")
    out = tmp_path / "out"
    small = ("--nodes", "10", "--limit", "30", "--loads", "0.5", "--load", "0.5", "--refine", "0")
    done = CliRunner().invoke(
        app,
        ["simulate", "--trace", str(AZURE_CONV), "--out", str(out), *small, "--policies", "default,round-robin", *args],
    )
    assert done.exit_code == 0, (done.output, done.exception)
    return json.loads((out / "report.json").read_text()), (out / "summary.md").read_text(), done.output


@pytest.mark.parametrize(
    ("model", "left_out"),
    [("qwen3-30b-a3b", ["t4"]), ("gpt-oss-20b", [])],
)
def test_simulate_shows_which_cards_serve_an_moe_model(tmp_path: Path, model: str, left_out: list[str]) -> None:
    report, summary, console = _simulate(tmp_path, "--model", model)
    assert report["model"] == model
    cards = {c["card"]: c for c in report["cards"]}
    assert list(cards) == list(DECENTRALIZED_MIX)
    assert [k for k, c in cards.items() if not c["serves"]] == left_out
    assert sum(c["nodes"] for c in cards.values()) == 10
    for policy in ("default", "round-robin"):
        shares = [c["served"][policy] for c in cards.values()]
        assert sum(s["requests"] for s in shares) == pytest.approx(1.0, abs=1e-3)
        assert sum(s["tokens"] for s in shares) == pytest.approx(1.0, abs=1e-3)
        assert all(cards[k]["served"][policy]["requests"] == 0 for k in left_out)
    # the summary: the policy table, then the cards table with what its columns mean, then the traffic per card
    assert summary.index("| policy | SLO attainment") < summary.index("## Cards")
    assert "| card | serves | why | weights GiB / memory GiB | GB read/token |" in summary
    assert "Columns: *serves* and *why*" in summary and "is a mixture of experts" in summary
    for key in DECENTRALIZED_MIX:
        assert f"\n| {key} | {'no' if key in left_out else 'yes'} | " in summary
    assert "\n| default | " in summary.split("Traffic per card at load 0.5")[1]
    if left_out:
        assert "does not fit on t4 even at q4_k_m: simulated without them" in console
        assert "| t4 | no | does not fit even at q4_k_m: needs 17.4 GiB, has 16 GiB" in summary
    assert f"cards for {model}" in console and "requests served per card at load 0.5" in console


def test_simulate_serves_a_model_from_a_config_json_not_in_the_catalogue(tmp_path: Path, catalogue: None) -> None:
    shipped = resources.files("gridserve.catalog").joinpath("configs", "qwen3-30b-a3b.json")
    folder = tmp_path / "My-MoE-30B"
    folder.mkdir()
    with resources.as_file(shipped) as source:
        shutil.copy(source, folder / "config.json")
    assert "My-MoE-30B" not in MODELS
    report, summary, _ = _simulate(tmp_path, "--model-config", str(folder / "config.json"))
    assert report["model"] == "My-MoE-30B"  # named after its directory
    cards = {c["card"]: c for c in report["cards"]}
    assert not cards["t4"]["serves"] and all(c["serves"] for k, c in cards.items() if k != "t4")
    assert 2.8e9 < cards["rtx4090"]["params_per_token"] < 3.4e9 < 29e9 < cards["rtx4090"]["params_held"]
    assert "My-MoE-30B is a mixture of experts (128 experts, 8 per token)" in summary
