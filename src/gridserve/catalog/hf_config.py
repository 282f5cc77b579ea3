"""Model specs from a Hugging Face `config.json`: the architecture read from its fields, the parameter counts
derived from it (dense and mixture-of-experts), so that a model's figures are its published config, not typed in.

Counted, per layer: attention (q, k, v, o with grouped-query heads, biases where the architecture has them,
Qwen3's q/k norms, gpt-oss's attention sinks; or DeepSeek's multi-head latent attention with its low-rank q and
kv projections), the MLP (gated: 3 x hidden x intermediate; a mixture of experts: every routed expert, the router,
shared experts) and two norms; then the input embedding, the final norm and the output head unless it is tied.

Active parameters (what one token reads) are the non-expert weights, the router and `experts_per_token` routed
experts per MoE layer, without an untied input embedding table, of which a token reads one row. Publishers differ
here: OpenAI's 3.6B / 5.1B active for gpt-oss leave the input embedding out as this does; Qwen's 3.3B for
Qwen3-30B-A3B counts it (`ParamCount.active_with_embedding`).

DeepSeek's multi-token-prediction module (`num_nextn_predict_layers`) is not part of the main model and is not
counted (671B, not the checkpoint's 685B).
"""

import json
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from gridserve.catalog.spec import ModelSpec

QKV_BIAS_TYPES = frozenset({"qwen2", "qwen2_moe"})
"""Architectures whose q, k and v projections carry a bias though the config names no `attention_bias`."""
QK_NORM_TYPES = frozenset({"qwen3", "qwen3_moe"})
"""Architectures with an RMSNorm over each head's queries and keys (head_dim weights each)."""
SINK_TYPES = frozenset({"gpt_oss"})
"""Architectures with a learned attention sink per head."""
EXPERT_BIAS_TYPES = frozenset({"gpt_oss"})
"""Architectures whose experts' projections and router carry biases."""


class ConfigError(ValueError):
    """A config.json that cannot be read as a model: the message is one readable line."""


@dataclass(frozen=True)
class ParamCount:
    total: float
    active: float
    """Read by one token: see the module docstring."""
    embedding: float
    """The input embedding table (vocab x hidden)."""
    tied: bool
    expert: float
    """Every routed expert over every MoE layer (0: dense)."""

    @property
    def active_with_embedding(self) -> float:
        """Active parameters counting the input embedding table as well (Qwen's and DeepSeek's convention)."""
        return self.active if self.tied else self.active + self.embedding


class _Fields:
    """A config's fields with readable errors (a multimodal config's language model is its `text_config`)."""

    def __init__(self, name: str, config: Mapping[str, Any]) -> None:
        text = config.get("text_config")
        if "num_hidden_layers" not in config and isinstance(text, Mapping):
            config = {**config, **text}
        self.name, self.config = name, config

    def has(self, key: str) -> bool:
        return self.config.get(key) is not None

    def first(self, *keys: str) -> str | None:
        """The first of `keys` the config gives a value for."""
        return next((k for k in keys if self.has(k)), None)

    def integer(self, *keys: str, default: int | None = None) -> int:
        """The first of `keys` present, a non-negative integer; `default` if none is (an error if no default)."""
        key = self.first(*keys)
        if key is None:
            if default is None:
                raise ConfigError(f"{self.name}: config.json has no {' or '.join(keys)}")
            return default
        value = self.config[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(f"{self.name}: config.json {key} must be a non-negative integer, not {value!r}")
        return value

    def positive(self, *keys: str, default: int | None = None) -> int:
        value = self.integer(*keys, default=default)
        if value <= 0:
            raise ConfigError(f"{self.name}: config.json {keys[0]} must be positive, not {value}")
        return value

    def flag(self, key: str, default: bool = False) -> bool:
        value = self.config.get(key)
        return default if value is None else bool(value)

    @property
    def model_type(self) -> str:
        return str(self.config.get("model_type", ""))


@dataclass(frozen=True)
class _Shape:
    """The architecture's sizes, read once."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    experts: int
    per_token: int

    @classmethod
    def read(cls, f: _Fields) -> "_Shape":
        layers, hidden = f.positive("num_hidden_layers"), f.positive("hidden_size")
        heads = f.positive("num_attention_heads")
        experts = f.integer("num_experts", "num_local_experts", "n_routed_experts", default=0)
        per_token = f.positive("num_experts_per_tok", "experts_per_token") if experts else 0
        if per_token > experts:
            raise ConfigError(f"{f.name}: config.json routes each token to {per_token} of {experts} experts")
        return cls(
            layers=layers,
            hidden=hidden,
            heads=heads,
            kv_heads=f.positive("num_key_value_heads", default=heads),
            head_dim=_head_dim(f, hidden, heads),
            vocab=f.positive("vocab_size"),
            tied=f.flag("tie_word_embeddings"),
            experts=experts,
            per_token=per_token,
        )


def _head_dim(f: _Fields, hidden: int, heads: int) -> int:
    if f.has("head_dim"):
        return f.positive("head_dim")
    if hidden % heads:
        raise ConfigError(f"{f.name}: config.json has no head_dim and hidden_size is not a multiple of the heads")
    return hidden // heads


# -- attention ------------------------------------------------------------------------------------------------------


def _attention_params(f: _Fields, s: _Shape) -> int:
    if f.has("kv_lora_rank"):
        return _latent_attention_params(f, s)
    q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
    weights = s.hidden * q + 2 * s.hidden * kv + q * s.hidden
    qkv_bias = f.flag("attention_bias") or f.model_type in QKV_BIAS_TYPES
    bias = (q + 2 * kv if qkv_bias else 0) + (s.hidden if f.flag("attention_bias") else 0)  # o's bias
    norms = 2 * s.head_dim if f.model_type in QK_NORM_TYPES else 0
    sinks = s.heads if f.model_type in SINK_TYPES else 0
    return weights + bias + norms + sinks


def _latent_attention_params(f: _Fields, s: _Shape) -> int:
    """DeepSeek's multi-head latent attention: queries through a low-rank q_lora (or directly), keys and values
    through the compressed kv_lora latent plus a shared rope key, each low-rank side with its norm."""
    kv_rank, rope = f.positive("kv_lora_rank"), f.positive("qk_rope_head_dim")
    nope, v_dim = f.positive("qk_nope_head_dim"), f.positive("v_head_dim")
    q_out = s.heads * (nope + rope)
    q_rank = f.integer("q_lora_rank", default=0)
    q = s.hidden * q_rank + q_rank + q_rank * q_out if q_rank else s.hidden * q_out
    kv = s.hidden * (kv_rank + rope) + kv_rank + kv_rank * s.heads * (nope + v_dim)
    return q + kv + s.heads * v_dim * s.hidden


def _kv_latent(f: _Fields) -> int:
    """Values cached per token and layer by latent attention (kv_lora_rank + qk_rope_head_dim; 0: none): vLLM and
    SGLang cache the compressed latent and the rope key, not per-head keys and values."""
    if not f.has("kv_lora_rank"):
        return 0
    return f.positive("kv_lora_rank") + f.positive("qk_rope_head_dim")


# -- MLP ------------------------------------------------------------------------------------------------------------


def _moe_layers(f: _Fields, s: _Shape) -> list[bool]:
    """Which layers are mixtures of experts: DeepSeek's first_k_dense_replace and moe_layer_freq, Qwen's
    decoder_sparse_step and mlp_only_layers; every layer otherwise (Mixtral, gpt-oss)."""
    if not s.experts:
        return [False] * s.layers
    first_dense = f.integer("first_k_dense_replace", default=0)
    freq = f.positive("moe_layer_freq", default=1)
    step = f.positive("decoder_sparse_step", default=1)
    dense_only = set(f.config.get("mlp_only_layers") or ())
    return [i >= first_dense and i % freq == 0 and (i + 1) % step == 0 and i not in dense_only for i in range(s.layers)]


def _gated_mlp(hidden: int, intermediate: int, bias: bool) -> int:
    """gate, up (hidden -> intermediate) and down (intermediate -> hidden) projections."""
    return 3 * hidden * intermediate + ((2 * intermediate + hidden) if bias else 0)


def _dense_mlp_params(f: _Fields, s: _Shape) -> int:
    return _gated_mlp(s.hidden, f.positive("intermediate_size"), f.flag("mlp_bias"))


@dataclass(frozen=True)
class _MoeLayer:
    """One MoE layer's parameters: every routed expert, one of them, and what every token reads (router,
    shared experts)."""

    routed: int
    expert: int
    always: int


def _moe_layer(f: _Fields, s: _Shape) -> _MoeLayer:
    width = f.positive("moe_intermediate_size", "intermediate_size")
    bias = f.model_type in EXPERT_BIAS_TYPES
    expert = _gated_mlp(s.hidden, width, bias)
    router = s.hidden * s.experts + (s.experts if bias or f.config.get("topk_method") == "noaux_tc" else 0)
    shared = f.integer("n_shared_experts", default=0) * _gated_mlp(s.hidden, width, False)
    if f.has("shared_expert_intermediate_size"):  # Qwen2-MoE: one shared expert of its own width, and its gate
        shared += _gated_mlp(s.hidden, f.positive("shared_expert_intermediate_size"), False) + s.hidden
    return _MoeLayer(routed=s.experts * expert, expert=expert, always=router + shared)


# -- the whole model ------------------------------------------------------------------------------------------------


def _count(f: _Fields, s: _Shape) -> ParamCount:
    flags = _moe_layers(f, s)
    moe_count, dense_count = sum(flags), s.layers - sum(flags)
    dense_mlp = _dense_mlp_params(f, s) if dense_count else 0
    moe = _moe_layer(f, s) if moe_count else _MoeLayer(0, 0, 0)
    shared_layer = _attention_params(f, s) + 2 * s.hidden  # attention and the two norms
    embedding = s.vocab * s.hidden
    head = 0 if s.tied else embedding
    body = s.layers * shared_layer + dense_count * dense_mlp + s.hidden  # + the final norm
    total = embedding + head + body + moe_count * (moe.always + moe.routed)
    active = (embedding if s.tied else head) + body + moe_count * (moe.always + s.per_token * moe.expert)
    return ParamCount(
        total=float(total),
        active=float(active),
        embedding=float(embedding),
        tied=s.tied,
        expert=float(moe_count * moe.routed),
    )


def count_params(config: Mapping[str, Any], name: str = "model") -> ParamCount:
    """Total and active parameters derived from the architecture `config` describes."""
    f = _Fields(name, config)
    return _count(f, _Shape.read(f))


def _sliding(f: _Fields, layers: int) -> tuple[int | None, tuple[int, ...]]:
    """(window, the layers using it): `layer_types` where given (gpt-oss alternates), else every layer from
    `max_window_layers` on (Qwen) or all of them (Mistral); none where `use_sliding_window` is false."""
    window = f.integer("sliding_window", default=0)
    if not window or not f.flag("use_sliding_window", default=True):
        return None, ()
    types = f.config.get("layer_types")
    if isinstance(types, list):
        at = tuple(i for i, t in enumerate(types[:layers]) if t == "sliding_attention")
    else:
        at = tuple(range(min(layers, f.integer("max_window_layers", default=0)), layers))
    return (window, at) if at else (None, ())


def spec_from_config(name: str, config: Mapping[str, Any], *, max_context: int | None = None) -> ModelSpec:
    """The catalogue spec of the model `config` (a parsed config.json) describes; ConfigError (one line) when it
    lacks what the spec needs. `max_context`: the context served (default: max_position_embeddings)."""
    if not isinstance(config, Mapping):
        raise ConfigError(f"{name}: config.json must hold a JSON object, not {type(config).__name__}")
    f = _Fields(name, config)
    s = _Shape.read(f)
    counted = _count(f, s)
    window, sliding = _sliding(f, s.layers)
    context = max_context if max_context is not None else f.positive("max_position_embeddings")
    moe = s.experts > 0 and counted.expert > 0
    return ModelSpec(
        name=name,
        params=counted.total,
        layers=s.layers,
        hidden=s.hidden,
        kv_heads=s.kv_heads,
        head_dim=_qk_head_dim(f, s),
        vocab=s.vocab,
        max_context=context,
        active_params=counted.active if moe else None,
        experts=s.experts if moe else 0,
        experts_per_token=s.per_token if moe else 0,
        expert_params=counted.expert,
        kv_latent=_kv_latent(f),
        sliding_window=window,
        sliding_layers=len(sliding),
        sliding_at=sliding,
    )


def _qk_head_dim(f: _Fields, s: _Shape) -> int:
    """The per-head query/key width (latent attention: nope + rope parts)."""
    if f.has("kv_lora_rank"):
        return f.positive("qk_nope_head_dim") + f.positive("qk_rope_head_dim")
    return s.head_dim


# -- files ----------------------------------------------------------------------------------------------------------


def load_config(path: Path) -> dict[str, Any]:
    """A config.json as a dict; ConfigError (one line) when it cannot be read or is not a JSON object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read model config {path}: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"model config {path} is not valid JSON: {_one_line(exc)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"model config {path} must hold a JSON object, not {type(data).__name__}")
    return data


def spec_from_file(path: Path, name: str | None = None, *, max_context: int | None = None) -> ModelSpec:
    """The spec of a config.json file, named `name` or after the file's directory (a Hugging Face checkout:
    `Qwen3-30B-A3B/config.json` is `Qwen3-30B-A3B`)."""
    model = name or path.resolve().parent.name
    return spec_from_config(model, load_config(path), max_context=max_context)


def shipped_config(name: str) -> dict[str, Any]:
    """A config.json shipped with gridserve (catalog/configs/NAME.json)."""
    text = resources.files("gridserve.catalog").joinpath("configs", f"{name}.json").read_text(encoding="utf-8")
    data = json.loads(text)
    assert isinstance(data, dict)
    return data


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split())
