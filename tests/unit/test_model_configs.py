"""Model specs read from Hugging Face config.json files (catalog/hf_config.py): parameter counts derived from the
architecture against the figures each publisher gives, KV bytes per token against hand-computed ones, the
mixture-of-experts decode reads, and readable errors for configs that are not models."""

import itertools
import json
import tomllib
from dataclasses import replace
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gridserve.catalog import MODELS
from gridserve.catalog.hf_config import (
    ConfigError,
    count_params,
    load_config,
    shipped_config,
    spec_from_config,
    spec_from_file,
)
from gridserve.catalog.models import FROM_CONFIGS, ModelSpec
from gridserve.perfmodel import roofline

ROOT = Path(__file__).resolve().parents[2]
MOE = ("qwen3-30b-a3b", "gpt-oss-20b", "gpt-oss-120b", "deepseek-v3")


def within(derived: float, published: float, tolerance: float = 0.02) -> bool:
    return abs(derived - published) <= tolerance * published


# -- parameter counts against the published figures ----------------------------------------------------------------

# (catalogue name, the repository its config.json is copied from, total, active, whether the publisher's active
# figure counts the input embedding table). OpenAI's gpt-oss model card tabulates 20.91B / 3.61B and
# 116.83B / 5.13B with the embedding left out of the active figure (a token reads one row of it); Qwen's 3.3B
# for Qwen3-30B-A3B counts it (3.04B without it: 8% under, so this is the convention, not noise).
PUBLISHED = (
    ("qwen3-30b-a3b", "Qwen/Qwen3-30B-A3B", 30.5e9, 3.3e9, True),
    ("gpt-oss-20b", "openai/gpt-oss-20b", 21e9, 3.6e9, False),
    ("gpt-oss-120b", "openai/gpt-oss-120b", 117e9, 5.1e9, False),
    ("deepseek-v3", "deepseek-ai/DeepSeek-V3", 671e9, 37e9, False),
    ("llama-3.3-70b", "meta-llama/Llama-3.3-70B-Instruct", 70.6e9, 70.6e9, True),
)


@pytest.mark.parametrize(("name", "repo", "total", "active", "with_embedding"), PUBLISHED)
def test_derived_parameter_counts_match_the_published_ones(
    name: str, repo: str, total: float, active: float, with_embedding: bool
) -> None:
    config = shipped_config(name)
    assert config["_name_or_path"] == repo
    counted = count_params(config, name)
    assert within(counted.total, total), f"{name}: {counted.total / 1e9:.2f}B total, published {total / 1e9}B"
    derived = counted.active_with_embedding if with_embedding else counted.active
    assert within(derived, active), f"{name}: {derived / 1e9:.2f}B active, published {active / 1e9}B"
    spec = MODELS[name]
    assert spec.params == counted.total
    assert spec.token_params == (counted.active if spec.moe else counted.total)


def test_deepseek_v3_active_count_is_within_2_percent_either_way_of_counting_the_embedding() -> None:
    """DeepSeek's 37B does not say whether the input embedding (0.93B) counts: both readings are within 2%."""
    counted = count_params(shipped_config("deepseek-v3"))
    assert counted.embedding == 129280 * 7168
    assert within(counted.active, 37e9) and within(counted.active_with_embedding, 37e9)
    assert counted.active < 37e9 < counted.active_with_embedding


def test_the_exact_figures_openai_tabulates_for_gpt_oss() -> None:
    """The gpt-oss model card gives 20.91B / 3.61B and 116.83B / 5.13B: biases, sinks and the router included."""
    small, large = count_params(shipped_config("gpt-oss-20b")), count_params(shipped_config("gpt-oss-120b"))
    assert round(small.total / 1e9, 2) == 20.91 and round(small.active / 1e9, 2) == 3.61
    assert round(large.total / 1e9, 2) == 116.83 and round(large.active / 1e9, 2) == 5.13


@pytest.mark.parametrize("name", ["llama-3-8b", "qwen2.5-7b"])
def test_dense_table_entries_agree_with_their_configs(name: str) -> None:
    """The hand-written dense entries (8.03B, 7.62B) re-derived from their configs (meta-llama/Meta-Llama-3-8B,
    Qwen/Qwen2.5-7B): within 2%, and the same architecture."""
    table = MODELS[name]
    derived = spec_from_config(name, shipped_config(name), max_context=table.max_context)
    assert within(derived.params, table.params)
    assert derived.active_params is None and derived.token_params == derived.params
    same = ("layers", "hidden", "kv_heads", "head_dim", "vocab", "max_context")
    assert {k: getattr(derived, k) for k in same} == {k: getattr(table, k) for k in same}
    assert derived.kv_bytes_per_token() == table.kv_bytes_per_token()


def test_a_hand_count_of_llama_3_8b() -> None:
    h, inter, vocab, layers = 4096, 14336, 128256, 32
    attention = h * 4096 + 2 * h * 1024 + 4096 * h
    expected = 2 * vocab * h + layers * (attention + 3 * h * inter + 2 * h) + h
    assert count_params(shipped_config("llama-3-8b")).total == expected == 8_030_261_248


def test_the_catalogue_entries_are_their_shipped_configs() -> None:
    for name in FROM_CONFIGS:
        assert MODELS[name] == spec_from_config(name, shipped_config(name))
        assert not MODELS[name].real_engine
    assert {name for name in FROM_CONFIGS if MODELS[name].moe} == set(MOE)


def test_the_configs_are_package_data() -> None:
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["gridserve"]
    assert "catalog/configs/*.json" in data
    shipped = {p.name for p in resources.files("gridserve.catalog").joinpath("configs").iterdir()}
    assert {f"{name}.json" for name in FROM_CONFIGS} <= shipped


# -- KV cache --------------------------------------------------------------------------------------------------------

# 2 (K and V) x layers x KV heads x head_dim x 2 bytes; DeepSeek's MLA caches the 512-wide latent and the 64-wide
# rope key per layer: layers x (512 + 64) x 2 bytes.
KV_FP16 = {
    "qwen3-30b-a3b": 2 * 48 * 4 * 128 * 2,
    "gpt-oss-20b": 2 * 24 * 8 * 64 * 2,
    "gpt-oss-120b": 2 * 36 * 8 * 64 * 2,
    "deepseek-v3": 61 * (512 + 64) * 2,
    "llama-3.3-70b": 2 * 80 * 8 * 128 * 2,
    "llama-3-8b": 2 * 32 * 8 * 128 * 2,
    "qwen2.5-7b": 2 * 28 * 4 * 128 * 2,
}


@pytest.mark.parametrize(("name", "expected"), sorted(KV_FP16.items()))
def test_kv_bytes_per_token_from_the_configs(name: str, expected: int) -> None:
    spec = spec_from_config(name, shipped_config(name))
    assert spec.kv_bytes_per_token() == expected
    assert spec.kv_bytes_per_token("fp8") == expected / 2


def test_latent_attention_caches_far_less_than_its_heads_would() -> None:
    deepseek = MODELS["deepseek-v3"]
    assert deepseek.kv_latent == 576 and (deepseek.kv_heads, deepseek.head_dim) == (128, 192)
    per_head = 2 * deepseek.layers * deepseek.kv_heads * deepseek.head_dim * 2
    assert deepseek.kv_bytes_per_token() * 40 < per_head


def test_sliding_windows_are_read_where_they_apply() -> None:
    oss = MODELS["gpt-oss-20b"]
    assert (oss.sliding_window, oss.sliding_layers) == (128, 12)  # every other layer of 24
    assert (MODELS["gpt-oss-120b"].sliding_window, MODELS["gpt-oss-120b"].sliding_layers) == (128, 18)
    qwen = spec_from_config("q", shipped_config("qwen2.5-7b"))  # sliding_window 131072, use_sliding_window false
    assert (qwen.sliding_window, qwen.sliding_layers) == (None, 0)
    mistral = {**shipped_config("llama-3-8b"), "sliding_window": 4096}  # Mistral-7B-v0.1: every layer
    assert spec_from_config("m", mistral).sliding_layers == 32
    qwen_on = {**shipped_config("qwen2.5-7b"), "use_sliding_window": True, "max_window_layers": 21}
    assert spec_from_config("q", qwen_on).sliding_layers == 28 - 21


# -- mixture-of-experts layout --------------------------------------------------------------------------------------


def test_deepseek_v3_has_three_dense_layers_and_a_shared_expert() -> None:
    config = shipped_config("deepseek-v3")
    h, width = 7168, 2048
    expert = 3 * h * width
    counted = count_params(config)
    assert counted.expert == 58 * 256 * expert
    all_moe = count_params({**config, "first_k_dense_replace": 0})
    assert all_moe.total - counted.total == 3 * (257 * expert + 256 * h + 256 - 3 * h * 18432)
    no_shared = count_params({**config, "n_shared_experts": 0})
    assert counted.active - no_shared.active == 58 * expert


def test_qwen_sparse_step_and_dense_only_layers() -> None:
    config = shipped_config("qwen3-30b-a3b")
    every_other = count_params({**config, "decoder_sparse_step": 2})
    assert every_other.expert == count_params(config).expert / 2
    listed = count_params({**config, "mlp_only_layers": [0, 1, 2]})
    assert listed.expert == count_params(config).expert * 45 / 48


def test_a_qwen2_moe_shared_expert_with_its_own_width_and_gate() -> None:
    base = {**shipped_config("qwen3-30b-a3b"), "model_type": "qwen2_moe"}
    shared = count_params({**base, "shared_expert_intermediate_size": 5632})
    assert shared.active - count_params(base).active == 48 * (3 * 2048 * 5632 + 2048)


def test_a_multimodal_config_is_read_from_its_text_config() -> None:
    text = shipped_config("llama-3-8b")
    wrapped = {"model_type": "llava", "text_config": text, "vision_config": {"hidden_size": 1024}}
    assert spec_from_config("m", wrapped) == spec_from_config("m", text)


# -- decode reads (property) ----------------------------------------------------------------------------------------


@st.composite
def moe_specs(draw: st.DrawFn) -> ModelSpec:
    experts = draw(st.integers(1, 512))
    per_token = draw(st.integers(1, experts))
    params = draw(st.floats(1e8, 1e12))
    expert_params = params * draw(st.floats(0.01, 0.99))
    active = params - expert_params * (1 - per_token / experts)
    return ModelSpec(
        name="moe",
        params=params,
        layers=draw(st.integers(1, 128)),
        hidden=4096,
        kv_heads=8,
        head_dim=128,
        vocab=32000,
        max_context=4096,
        active_params=active,
        experts=experts,
        experts_per_token=per_token,
        expert_params=expert_params,
    )


shipped_moe = st.sampled_from(MOE).map(MODELS.__getitem__)


@settings(max_examples=300, deadline=None)
@given(spec=st.one_of(moe_specs(), shipped_moe), batches=st.lists(st.integers(1, 100_000), min_size=2, max_size=8))
def test_decode_reads_grow_with_the_batch_from_the_active_weights_to_all_of_them(
    spec: ModelSpec, batches: list[int]
) -> None:
    assert spec.moe and spec.token_params <= spec.params
    reads = [spec.decode_params(b) for b in sorted(batches)]
    assert all(a <= b for a, b in itertools.pairwise(reads))
    assert spec.decode_params(1) == pytest.approx(spec.token_params, rel=1e-12)
    assert all(spec.token_params * (1 - 1e-12) <= r <= spec.params for r in reads)
    for b in batches:  # the roofline's ratio (compiled into the scheduler's kernel) is the same figure
        factor = roofline.moe_factor(float(b), *roofline.moe_terms(spec))
        assert factor * spec.token_params == pytest.approx(spec.decode_params(b), rel=1e-9)
        assert spec.decode_bytes(b, "float16") == pytest.approx(2 * spec.decode_params(b), rel=1e-12)


def test_decode_reads_at_batch_sizes_by_hand() -> None:
    qwen = MODELS["qwen3-30b-a3b"]  # 128 experts, 8 a token
    per_expert = qwen.expert_params / 128
    touched_4 = 128 * (1 - (1 - 8 / 128) ** 4)  # 28.9 experts per layer
    assert qwen.decode_params(4) == pytest.approx(qwen.token_params + per_expert * (touched_4 - 8))
    # every expert touched: every weight but the input embedding table (a token reads one row of it)
    assert qwen.decode_params(1_000) == pytest.approx(qwen.params - 151936 * 2048, rel=1e-9)
    dense = MODELS["llama-3-8b"]
    assert dense.decode_bytes(64) == dense.decode_bytes(1) == dense.weight_bytes()


def test_an_inconsistent_moe_spec_is_refused() -> None:
    qwen = MODELS["qwen3-30b-a3b"]
    for bad in (
        {"experts_per_token": 0},
        {"experts_per_token": 129},
        {"active_params": None},
        {"active_params": qwen.params * 2},
        {"expert_params": 0.0},
    ):
        with pytest.raises(ValueError, match="qwen3-30b-a3b"):
            replace(qwen, **bad)


# -- errors and files -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"num_hidden_layers": None}, "has no num_hidden_layers"),
        ({"hidden_size": "big"}, "hidden_size must be a non-negative integer, not 'big'"),
        ({"num_attention_heads": 0}, "num_attention_heads must be positive"),
        ({"vocab_size": True}, "vocab_size must be a non-negative integer"),
        ({"max_position_embeddings": None}, "has no max_position_embeddings"),
        ({"num_experts_per_tok": None}, "has no num_experts_per_tok or experts_per_token"),
        ({"head_dim": None, "hidden_size": 2050}, "has no head_dim and hidden_size is not a multiple"),
        ({"num_experts_per_tok": 129}, "routes each token to 129 of 128 experts"),
    ],
)
def test_a_config_missing_what_is_needed_says_so_in_one_line(change: dict[str, Any], message: str) -> None:
    config = {k: v for k, v in {**shipped_config("qwen3-30b-a3b"), **change}.items() if v is not None}
    with pytest.raises(ConfigError, match=message) as caught:
        spec_from_config("broken", config)
    assert str(caught.value).startswith("broken: ") and "\n" not in str(caught.value)


def test_max_context_may_be_given_instead_of_read() -> None:
    config = {k: v for k, v in shipped_config("llama-3-8b").items() if k != "max_position_embeddings"}
    assert spec_from_config("m", config, max_context=4096).max_context == 4096


def test_files_are_named_after_their_directory_and_bad_ones_are_one_line(tmp_path: Path) -> None:
    folder = tmp_path / "Qwen3-30B-A3B"
    folder.mkdir()
    good = folder / "config.json"
    good.write_text(json.dumps(shipped_config("qwen3-30b-a3b")))
    assert spec_from_file(good) == replace(MODELS["qwen3-30b-a3b"], name="Qwen3-30B-A3B")
    assert spec_from_file(good, "mine").name == "mine"
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "list.json").write_text("[1, 2]")
    for path, message in (
        (tmp_path / "missing.json", "cannot read model config"),
        (tmp_path / "bad.json", "is not valid JSON"),
        (tmp_path / "list.json", "must hold a JSON object, not list"),
    ):
        with pytest.raises(ConfigError, match=message) as caught:
            load_config(path)
        assert "\n" not in str(caught.value)
