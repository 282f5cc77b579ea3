"""A model's architecture as the performance model reads it: sizes, KV cache, and for a mixture of experts the
parameters a token reads. The catalogue of specs is models.py; hf_config.py derives specs from config.json."""

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


def bytes_per_param(dtype: str = "float16", quantization: str = "none") -> float:
    per_param = QUANT_BYTES_PER_PARAM.get(quantization)
    return per_param if per_param is not None else DTYPE_BYTES[dtype]


def experts_touched(experts: float, per_token: float, batch: float) -> float:
    """Expected distinct experts a decode step over `batch` sequences reads in one MoE layer, each sequence routed
    to `per_token` of `experts` (taken as uniform and independent): E x (1 - (1 - k/E)^b)."""
    missed: float = (1.0 - per_token / experts) ** max(1.0, batch)
    return experts * (1.0 - missed)


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    name: str
    params: float
    """Every parameter (for a mixture of experts: every expert): what memory must hold."""
    layers: int
    hidden: int
    kv_heads: int
    head_dim: int
    vocab: int
    max_context: int
    real_engine: bool = False
    """Served by a real engine in gridserve; emulated nodes never claim such a model."""
    active_params: float | None = None
    """Parameters one token's forward pass reads, for a mixture of experts (None: dense, every one of `params`):
    the non-expert weights and its routed experts, without an untied input embedding (a token reads one row)."""
    experts: int = 0
    """Routed experts in each MoE layer (0: dense)."""
    experts_per_token: int = 0
    """Routed experts each token goes to, per MoE layer."""
    expert_params: float = 0.0
    """Parameters of the routed experts: all of them, over all MoE layers (part of `params`)."""
    kv_latent: int = 0
    """Values cached per token and layer when attention caches a compressed latent instead of keys and values
    (DeepSeek's MLA: kv_lora_rank + qk_rope_head_dim); 0: keys and values, 2 x kv_heads x head_dim."""
    sliding_window: int | None = None
    sliding_layers: int = 0
    """Layers that attend over only the last `sliding_window` tokens. Stored; KV sizing still assumes full
    attention on every layer (an over-estimate for long contexts, never an under-estimate)."""

    def __post_init__(self) -> None:
        if self.experts or self.experts_per_token or self.expert_params or self.active_params is not None:
            self._check_moe()

    def _check_moe(self) -> None:
        active = self.active_params
        if not 0 < self.experts_per_token <= self.experts:
            raise ValueError(f"{self.name}: experts per token must be in 1..{self.experts} (experts)")
        if not 0 < self.expert_params <= self.params:
            raise ValueError(f"{self.name}: expert parameters must be positive and at most the total")
        if active is None or not 0 < active <= self.params:
            raise ValueError(f"{self.name}: a mixture of experts needs active parameters in (0, params]")

    @property
    def moe(self) -> bool:
        return self.experts > 0

    @property
    def token_params(self) -> float:
        """Parameters one token's forward pass computes with: the active ones (MoE) or all (dense)."""
        return self.params if self.active_params is None else self.active_params

    @property
    def routed_share(self) -> float:
        """The share of one sequence's decode reads that are its routed experts (0: dense)."""
        if not self.moe:
            return 0.0
        return self.expert_params * self.experts_per_token / self.experts / self.token_params

    def kv_bytes_per_token(self, dtype: str = "float16") -> float:
        width = self.kv_latent if self.kv_latent else 2 * self.kv_heads * self.head_dim
        return self.layers * width * DTYPE_BYTES[dtype]

    def weight_bytes(self, dtype: str = "float16", quantization: str = "none") -> float:
        """Bytes of every weight: what a device must hold."""
        return self.params * bytes_per_param(dtype, quantization)

    def decode_params(self, batch: float = 1) -> float:
        """Parameters a decode step over `batch` sequences reads: all of them (dense); the active ones at batch 1
        (MoE), and as the batch grows the further experts its sequences are routed to, up to every expert (every
        weight but an untied input embedding table)."""
        if not self.moe:
            return self.params
        touched = experts_touched(self.experts, self.experts_per_token, batch)
        extra = self.expert_params / self.experts * (touched - self.experts_per_token)
        return min(self.params, self.token_params + extra)

    def decode_bytes(self, batch: float = 1, dtype: str = "float16", quantization: str = "none") -> float:
        """Weight bytes a decode step over `batch` sequences streams (dense: `weight_bytes`, at any batch)."""
        if not self.moe:
            return self.weight_bytes(dtype, quantization)
        return self.decode_params(batch) * bytes_per_param(dtype, quantization)

    def kv_room_tokens(self, memory_bytes: float, dtype: str = "float16", quantization: str = "none") -> int:
        """Tokens of KV cache a device of `memory_bytes` holds beside the weights at this precision (0: none)."""
        free = memory_bytes - self.weight_bytes(dtype, quantization)
        return max(0, int(free / self.kv_bytes_per_token()))
