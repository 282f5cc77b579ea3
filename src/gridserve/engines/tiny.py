"""`tiny`: a seeded, randomly initialised Gemma 3 with a byte-level tokenizer, for fast tests.

Token ids: 0 pad, 1 bos, 2 eos, 3 + b for byte b. The model never emits bytes outside printable ASCII,
newline and eos (a fixed logit mask), so its output is always readable text.
"""

import functools
from collections.abc import Sequence
from typing import Any

import torch

from gridserve.catalog.models import TINY_MODEL, TINY_SEED
from gridserve.engines.base import DEFAULT_PREFIX_CACHE_MB
from gridserve.engines.torch_engine import LoadedModel, TorchEngine
from gridserve.types import ChatMessage, ModelOffer

TINY_CONTEXT = 4096
TINY_PREFIX_BLOCK = 32
"""Prefix-cache block (and prefill chunk) of the tiny model: its 64-token sliding window holds at most 63."""
PAD, BOS, EOS, OFFSET = 0, 1, 2, 3
VOCAB = OFFSET + 256


class ByteCodec:
    eos_ids = frozenset({EOS})

    def encode_prompt(self, text: str) -> list[int]:
        return [BOS, *(OFFSET + b for b in text.encode("utf-8"))]

    def encode_chat(self, messages: Sequence[ChatMessage]) -> list[int]:
        turns = "".join(f"<start_of_turn>{m.role}\n{m.content}<end_of_turn>\n" for m in messages)
        return self.encode_prompt(turns + "<start_of_turn>model\n")

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i - OFFSET for i in ids if i >= OFFSET).decode("utf-8", errors="replace")

    def token_bytes(self, token: int) -> bytes:
        """The bytes a token stands for (none for the specials)."""
        return bytes([token - OFFSET]) if token >= OFFSET else b""

    def grammar_tokenizer(self) -> Any:
        """The vocabulary as llguidance reads it (structured output: engines/grammar.py)."""
        return _byte_tokenizer()


class _ByteVocabulary:
    """The tiny model's tokens for llguidance's TokenizerWrapper: three specials, then one token per byte."""

    def __init__(self) -> None:
        self.eos_token_id = EOS
        self.bos_token_id = BOS
        self.tokens = [b"<pad>", b"<bos>", b"<eos>", *(bytes([b]) for b in range(256))]
        self.special_token_ids = [PAD, BOS, EOS]

    def __call__(self, text: str | bytes) -> list[int]:
        data = text.encode("utf-8") if isinstance(text, str) else text
        return [OFFSET + b for b in data]


@functools.cache
def _byte_tokenizer() -> Any:
    import llguidance

    return llguidance.LLTokenizer(llguidance.TokenizerWrapper(_ByteVocabulary()))


def build_tiny_model(seed: int = TINY_SEED) -> LoadedModel:
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        max_position_embeddings=TINY_CONTEXT,
        sliding_window=64,
        layer_types=["sliding_attention", "full_attention"],
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
    )
    torch.manual_seed(seed)
    model: Any = Gemma3ForCausalLM(config)
    allowed = [EOS, OFFSET + ord("\n"), *(OFFSET + b for b in range(32, 127))]
    mask = torch.full((VOCAB,), float("-inf"))
    mask[allowed] = 0.0
    return LoadedModel(model=model, codec=ByteCodec(), logit_mask=mask)


def tiny_offer() -> ModelOffer:
    return ModelOffer(name=TINY_MODEL, dtype="float32", max_context=TINY_CONTEXT, weights_digest=f"seed:{TINY_SEED}")


def tiny_engine(
    threads: int = 1,
    lazy: bool = False,
    cheat: tuple[str, ...] = (),
    prefix_cache_mb: int = DEFAULT_PREFIX_CACHE_MB,
    prefix_block: int = TINY_PREFIX_BLOCK,
) -> TorchEngine:
    """`cheat` (tests of the verifier): `wrong_model` loads other weights, `lazy_compute` skips the last layer;
    either way the offer still names the real weights. `prefix_cache_mb`: the prefix cache's budget (0: none);
    `prefix_block`: the prefill's chunk (and the cache's block) in tokens."""
    offer = tiny_offer()

    def loader() -> LoadedModel:
        loaded = build_tiny_model(TINY_SEED + 1 if "wrong_model" in cheat else TINY_SEED)
        if "lazy_compute" in cheat:
            loaded.model.model.layers = loaded.model.model.layers[:-1]
        return loaded

    return TorchEngine(
        kind="tiny",
        offer=offer,
        loader=loader,
        threads=threads,
        lazy=lazy,
        prefix_cache_bytes=prefix_cache_mb * 2**20,
        prefix_block=prefix_block,
    )
