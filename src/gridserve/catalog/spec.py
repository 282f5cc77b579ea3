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


TYPICAL_SEQUENCE_TOKENS = 2048
"""The length a sequence is taken to have where a KV figure must assume one (the room of a prefix cache of many
prompts, the KV of an emulated node's active requests): it only matters for models with sliding windows, whose
sliding layers keep at most their window of each sequence. A power of two: per token, exact."""


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
    """Layers that attend over only the last `sliding_window` tokens: their KV cache keeps at most that many of a
    sequence's tokens (`kv_bytes`), the other layers every token."""
    sliding_at: tuple[int, ...] = ()
    """Which layers slide (0-based), where the config says (gpt-oss's `layer_types`; Qwen's from
    `max_window_layers` on; Mistral's all); empty with sliding layers: spread evenly (`layer_windows`)."""

    def __post_init__(self) -> None:
        if self.experts or self.experts_per_token or self.expert_params or self.active_params is not None:
            self._check_moe()
        if self.sliding_layers or self.sliding_at:
            self._check_windows()

    def _check_windows(self) -> None:
        if not 0 < self.sliding_layers <= self.layers or self.sliding_window is None or self.sliding_window < 1:
            raise ValueError(f"{self.name}: sliding layers need a window and a count in 1..{self.layers} (layers)")
        at = self.sliding_at
        if at and (
            len(at) != self.sliding_layers or len(set(at)) != len(at) or not all(0 <= i < self.layers for i in at)
        ):
            raise ValueError(
                f"{self.name}: sliding_at must name {self.sliding_layers} distinct layers of {self.layers}"
            )

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
        """KV bytes one token takes in every layer, as if none slid: what a token adds to a sequence shorter than
        any window, and the bound `kv_bytes` never exceeds. A sequence's memory is `kv_bytes`."""
        return self.layers * self._kv_width() * DTYPE_BYTES[dtype]

    def _kv_width(self) -> int:
        return self.kv_latent if self.kv_latent else 2 * self.kv_heads * self.head_dim

    def kv_split(self, dtype: str = "float16") -> tuple[float, float, int]:
        """(KV bytes a token takes in the full-attention layers, in the sliding layers, the window in tokens; 0:
        none). A model without windows: (`kv_bytes_per_token`, 0.0, 0), the same bytes to the bit."""
        width = self._kv_width()
        full = (self.layers - self.sliding_layers) * width * DTYPE_BYTES[dtype]
        if not self.sliding_layers or self.sliding_window is None:
            return full, 0.0, 0
        return full, self.sliding_layers * width * DTYPE_BYTES[dtype], self.sliding_window

    def kv_bytes(self, tokens: float, dtype: str = "float16") -> float:
        """KV bytes one sequence of `tokens` tokens holds: full-attention layers every token, sliding layers at
        most their window. The scheduler's memory filter computes this from its columns in the same order (full x
        tokens + sliding x min(tokens, window)), bit for bit; without windows, `kv_bytes_per_token` x tokens."""
        full, sliding, window = self.kv_split(dtype)
        return full * tokens + sliding * min(tokens, window)

    def kv_bytes_per_held_token(self, dtype: str = "float16", sequence_tokens: int = TYPICAL_SEQUENCE_TOKENS) -> float:
        """KV bytes per token of a cache holding many sequences of `sequence_tokens` tokens (a prefix cache of
        recent prompts, the batch of a busy node): `kv_bytes` of one over its length. Without windows (or for
        sequences within the window), `kv_bytes_per_token` exactly (the typical length is a power of two)."""
        return self.kv_bytes(sequence_tokens, dtype) / sequence_tokens

    def layer_windows(self) -> tuple[int, ...]:
        """Tokens each layer's KV cache keeps of a sequence, layer by layer (0: every token): the window on the
        sliding layers (`sliding_at`, else spread evenly over the model), 0 on the others."""
        window = self.sliding_window or 0
        if not self.sliding_layers or not window:
            return (0,) * self.layers
        at = set(self.sliding_at) or {
            i
            for i in range(self.layers)
            if (i + 1) * self.sliding_layers // self.layers > i * self.sliding_layers // self.layers
        }
        return tuple(window if i in at else 0 for i in range(self.layers))

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
        """Tokens of KV cache a device of `memory_bytes` holds beside the weights at this precision (0: none), as
        sequences of `TYPICAL_SEQUENCE_TOKENS` (`kv_bytes_per_held_token`: the bytes of a model without windows)."""
        free = memory_bytes - self.weight_bytes(dtype, quantization)
        return max(0, int(free / self.kv_bytes_per_held_token()))
