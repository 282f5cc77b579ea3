"""Model specs. Architecture figures come from each model's published config.json on its model card: typed in
for the older dense entries, read from the config itself (catalog/configs/, hf_config.py) for the newer ones."""

from pathlib import Path

from gridserve.catalog.hf_config import shipped_config, spec_from_config, spec_from_file
from gridserve.catalog.spec import DTYPE_BYTES, QUANT_BYTES_PER_PARAM, ModelSpec, bytes_per_param

__all__ = [
    "DTYPE_BYTES",
    "FROM_CONFIGS",
    "MODELS",
    "QUANT_BYTES_PER_PARAM",
    "TINY_MODEL",
    "TINY_SEED",
    "ModelSpec",
    "UnknownModel",
    "bytes_per_param",
    "model_spec",
    "register_config",
    "register_model",
]

TINY_MODEL = "gridserve-tiny"
TINY_SEED = 20261123
"""The tiny test model's name and the seed its weights are drawn from (engines/tiny.py)."""

MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        # google/gemma-3-270m config.json (GGUF metadata agrees): 18 layers, hidden 640, 1 KV head,
        # head_dim 256, vocab 262144.
        ModelSpec(
            name="gemma-3-270m",
            params=268e6,
            layers=18,
            hidden=640,
            kv_heads=1,
            head_dim=256,
            vocab=262144,
            max_context=32768,
            real_engine=True,
        ),
        # gridserve's own tiny Gemma 3 (engines/tiny.py).
        ModelSpec(
            name="gridserve-tiny",
            params=0.11e6,
            layers=2,
            hidden=64,
            kv_heads=1,
            head_dim=32,
            vocab=259,
            max_context=4096,
            real_engine=True,
        ),
        # meta-llama/Meta-Llama-3-8B config.json: 32 layers, hidden 4096, 8 KV heads, head_dim 128.
        ModelSpec(
            name="llama-3-8b",
            params=8.03e9,
            layers=32,
            hidden=4096,
            kv_heads=8,
            head_dim=128,
            vocab=128256,
            max_context=8192,
        ),
        # meta-llama/Meta-Llama-3-70B config.json: 80 layers, hidden 8192, 8 KV heads, head_dim 128.
        ModelSpec(
            name="llama-3-70b",
            params=70.6e9,
            layers=80,
            hidden=8192,
            kv_heads=8,
            head_dim=128,
            vocab=128256,
            max_context=8192,
        ),
        # Qwen/Qwen2.5-7B config.json: 28 layers, hidden 3584, 4 KV heads, head_dim 128.
        ModelSpec(
            name="qwen2.5-7b",
            params=7.62e9,
            layers=28,
            hidden=3584,
            kv_heads=4,
            head_dim=128,
            vocab=152064,
            max_context=32768,
        ),
        # mistralai/Mistral-7B-v0.1 config.json: 32 layers, hidden 4096, 8 KV heads, head_dim 128.
        ModelSpec(
            name="mistral-7b",
            params=7.24e9,
            layers=32,
            hidden=4096,
            kv_heads=8,
            head_dim=128,
            vocab=32000,
            max_context=32768,
        ),
        # Long-context models (prompts of today's agent and chat traffic run to 100k tokens and more).
        # meta-llama/Llama-3.1-8B config.json: 32 layers, hidden 4096, 32 heads, 8 KV heads (head_dim 128),
        # vocab 128256, max_position_embeddings 131072 (rope_scaling llama3, factor 8 over 8192).
        ModelSpec(
            name="llama-3.1-8b",
            params=8.03e9,
            layers=32,
            hidden=4096,
            kv_heads=8,
            head_dim=128,
            vocab=128256,
            max_context=131072,
        ),
        # meta-llama/Llama-3.1-70B config.json: 80 layers, hidden 8192, 64 heads, 8 KV heads (head_dim 128),
        # vocab 128256, max_position_embeddings 131072.
        ModelSpec(
            name="llama-3.1-70b",
            params=70.6e9,
            layers=80,
            hidden=8192,
            kv_heads=8,
            head_dim=128,
            vocab=128256,
            max_context=131072,
        ),
        # Qwen/Qwen2.5-72B-Instruct config.json: 80 layers, hidden 8192, 64 heads, 8 KV heads (head_dim 128),
        # vocab 152064; served at 32768 tokens as configured (its card's YaRN factor 4 reaches 131072: below).
        ModelSpec(
            name="qwen2.5-72b",
            params=72.7e9,
            layers=80,
            hidden=8192,
            kv_heads=8,
            head_dim=128,
            vocab=152064,
            max_context=32768,
        ),
        # Qwen/Qwen2.5-7B-Instruct with the YaRN rope_scaling its model card gives for long texts (factor 4.0 over
        # original_max_position_embeddings 32768): 131072 tokens; architecture as qwen2.5-7b above.
        ModelSpec(
            name="qwen2.5-7b-128k",
            params=7.62e9,
            layers=28,
            hidden=3584,
            kv_heads=4,
            head_dim=128,
            vocab=152064,
            max_context=131072,
        ),
        # Qwen/Qwen2.5-7B-Instruct-1M config.json: 28 layers, hidden 3584, 28 heads, 4 KV heads (head_dim 128),
        # vocab 152064, max_position_embeddings 1010000 (dual chunk attention over 262144-token chunks).
        ModelSpec(
            name="qwen2.5-7b-1m",
            params=7.62e9,
            layers=28,
            hidden=3584,
            kv_heads=4,
            head_dim=128,
            vocab=152064,
            max_context=1010000,
        ),
    )
}

FROM_CONFIGS = (
    # Qwen/Qwen3-30B-A3B: 48 layers, 128 experts (8 per token, width 768), every layer MoE; 30.5B total, 3.3B active.
    "qwen3-30b-a3b",
    # openai/gpt-oss-20b: 24 layers, 32 experts (4 per token), attention alternating sliding (128) and full. Ships
    # its experts in MXFP4 (~4.25 bits a weight: ~13 GB); the catalogue sizes it at the node's dtype/quantization.
    "gpt-oss-20b",
    # openai/gpt-oss-120b: 36 layers, 128 experts (4 per token); MXFP4 experts as gpt-oss-20b (~63 GB shipped).
    "gpt-oss-120b",
    # deepseek-ai/DeepSeek-V3: 61 layers (3 dense, 58 MoE: 256 routed experts, 8 per token, 1 shared), multi-head
    # latent attention (KV cache: kv_lora_rank 512 + rope key 64 per layer). Ships in FP8 (block-scaled e4m3).
    "deepseek-v3",
    # meta-llama/Llama-3.3-70B-Instruct: dense, 80 layers, 8 KV heads, 131072 tokens.
    "llama-3.3-70b",
)
"""Catalogue models built from the config.json shipped for them (catalog/configs/NAME.json, whose
`_name_or_path` names the Hugging Face repository it is copied from)."""

MODELS.update({name: spec_from_config(name, shipped_config(name)) for name in FROM_CONFIGS})


def register_model(spec: ModelSpec) -> ModelSpec:
    """Add a model to the catalogue for this process (`--model-config`); an existing name is replaced."""
    MODELS[spec.name] = spec
    return spec


def register_config(path: Path, name: str | None = None) -> ModelSpec:
    """Read a Hugging Face config.json and add its model to the catalogue for this process, named `name` or
    after the file's directory; `hf_config.ConfigError` (one line) if it cannot be read as a model."""
    return register_model(spec_from_file(path, name))


class UnknownModel(KeyError):
    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name

    def __str__(self) -> str:
        return f"unknown model {self.name!r}; known: {', '.join(sorted(MODELS))}"


def model_spec(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except KeyError:
        raise UnknownModel(name) from None
