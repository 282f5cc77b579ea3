"""Model specs. Architecture figures come from each model's published config.json on its model card."""

from dataclasses import dataclass

DTYPE_BYTES: dict[str, float] = {"float32": 4, "float16": 2, "bfloat16": 2, "fp8": 1}
QUANT_BYTES_PER_PARAM: dict[str, float | None] = {
    # None: use the dtype's width. GGUF figures are bits-per-weight / 8 (llama.cpp quantize README).
    "none": None,
    "q8_0": 8.5 / 8,
    "q6_k": 6.56 / 8,
    "q5_k_m": 5.69 / 8,
    "q4_k_m": 4.89 / 8,
    "awq": 4.25 / 8,
    "gptq": 4.25 / 8,
    "int8": 1.0,
    "fp8": 1.0,
}


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    name: str
    params: float
    layers: int
    hidden: int
    kv_heads: int
    head_dim: int
    vocab: int
    max_context: int
    real_engine: bool = False
    """Served by a real engine in gridserve; emulated nodes never claim such a model."""

    def kv_bytes_per_token(self, dtype: str = "float16") -> float:
        return 2 * self.layers * self.kv_heads * self.head_dim * DTYPE_BYTES[dtype]

    def weight_bytes(self, dtype: str = "float16", quantization: str = "none") -> float:
        per_param = QUANT_BYTES_PER_PARAM.get(quantization)
        return self.params * (per_param if per_param is not None else DTYPE_BYTES[dtype])

    def kv_room_tokens(self, memory_bytes: float, dtype: str = "float16", quantization: str = "none") -> int:
        """Tokens of KV cache a device of `memory_bytes` holds beside the weights at this precision (0: none)."""
        free = memory_bytes - self.weight_bytes(dtype, quantization)
        return max(0, int(free / self.kv_bytes_per_token()))


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
