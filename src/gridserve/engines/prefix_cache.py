"""The transformers engine's prefix cache: the KV cache of recent prompts, in blocks, reused by later prompts that
start with the same tokens.

Blocks. A prompt's token ids are cut into blocks of `block` tokens (only whole blocks are kept). Block i's key is a
chain hash (BLAKE2b, 128 bits) over block i-1's key and block i's tokens, so it names every token before it: two
prompts share block i's key exactly when they share their first (i + 1) x `block` tokens. A block holds, for every
layer, the keys and values of its `block` positions (transformers' `DynamicCache` layers: a `DynamicLayer` per full
attention layer, a `DynamicSlidingWindowLayer` per sliding one). The cache holds at most `budget_bytes` of them,
least recently used out; a prompt's blocks are touched from its last to its first, so a prefix is always used more
recently than its continuations and eviction takes the leaves of the tree of prompts first.

Reuse. A new prompt of n tokens reuses its longest run of cached leading blocks, at most (n - 1) // `block` of them:
the last prompt token is always computed, for its logits. The reused blocks are put back together into a
`DynamicCache` (`restore`: the full layers get every reused position, the sliding layers their last window - 1, and
their position count), and prefill runs on the rest.

Why a hit gives the same output, bit for bit. Prefill over a suffix is not numerically the same as prefill over
the whole prompt (other matrix shapes, other rounding: the last logits differ by ~1e-7 on the tiny model). So the
engine never prefills a prompt in one forward pass: it always prefills in chunks aligned to the blocks, `[0, b)`,
`[b, 2b)`, ... and a last, possibly shorter, chunk (engines/torch_engine.py), cache or no cache. Block i's keys and
values are then computed by the same operation (same tokens [0, (i + 1) b), same shapes: `b` queries over
(i + 1) b keys, same cache contents before it, by induction) in every prompt that contains it; a stored block is that
result, copied. A cold run and a run that reuses k blocks therefore differ only in where blocks 0..k-1 come from
(computed now, or computed by the same operation earlier and stored), and run the same forward passes from chunk k
on, on bitwise-equal inputs: their logits are bitwise equal (for a fixed thread count, as everything in this
engine). Only blocks computed by chunked prefill are stored: keys and values computed token by token while decoding
would not be the same numbers, so a later turn reuses the earlier turn's prompt, not its answer. A chunk is one
block, so a reuse can start at any block boundary; tests/unit/test_prefix_cache.py checks the equality on the tiny
model and Gemma 3 270M.

One owner: the engine's worker thread (every method but `capacity_tokens` and `stats`).
"""

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from gridserve.engines.base import DEFAULT_PREFIX_CACHE_MB

BLOCK_TOKENS = 128
"""Tokens per block, and per prefill chunk, by default. Smaller blocks reuse more of a prompt but make every cold
prefill slower (smaller matrix products; Gemma 3 270M, 2 CPU threads, 1,000 tokens, best of 5: one pass 2.06 s,
chunks of 128 2.14 s, of 64 2.73 s, of 32 3.68 s). A model with a sliding window needs a smaller one (`cacheable`)."""

KV = tuple[tuple[torch.Tensor, torch.Tensor], ...]
"""One block's (keys, values) per layer, each `[1, kv_heads, block, head_dim]`."""


@dataclass(frozen=True)
class PrefixStats:
    blocks: int
    bytes: int
    lookups: int
    hits: int
    """Lookups that reused at least one block."""
    reused_tokens: int
    evicted_blocks: int


def block_keys(ids: Sequence[int], block: int) -> list[bytes]:
    """The chain hash of each whole block of `ids`."""
    keys: list[bytes] = []
    parent = b""
    for start in range(0, len(ids) - block + 1, block):
        digest = hashlib.blake2b(parent, digest_size=16)
        digest.update(array("q", ids[start : start + block]).tobytes())
        parent = digest.digest()
        keys.append(parent)
    return keys


def kv_bytes_per_token(model: Any) -> int:
    """Bytes of keys and values one token takes in every layer of `model`'s cache."""
    config = model.config.get_text_config(decoder=True)
    heads = config.num_key_value_heads or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    itemsize = torch.empty((), dtype=model.dtype).element_size()
    return int(config.num_hidden_layers * 2 * heads * head_dim * itemsize)


def new_cache(model: Any) -> Any:
    """An empty cache for `model`, as its forward pass would make one."""
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


def cacheable(model: Any, block: int) -> str | None:
    """Why `model`'s KV cache cannot be kept in blocks of `block` tokens, or None when it can: every layer must be
    a plain or sliding-window dynamic layer, and a sliding window must keep a whole chunk (block <= window - 1)."""
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    for index, layer in enumerate(new_cache(model).layers):
        if type(layer) is DynamicSlidingWindowLayer:
            if block > layer.sliding_window - 1:
                return f"layer {index}: a sliding window of {layer.sliding_window} cannot hold a block of {block}"
        elif type(layer) is not DynamicLayer:
            return f"layer {index}: {type(layer).__name__} is not a dynamic cache layer"
    return None


class PrefixCache:
    def __init__(self, *, budget_bytes: int, block: int, bytes_per_token: int) -> None:
        if block < 1:
            raise ValueError(f"block must be at least 1 token (got {block})")
        self.block = block
        self.budget_bytes = max(0, budget_bytes)
        self.bytes_per_token = bytes_per_token
        self._blocks: OrderedDict[bytes, KV] = OrderedDict()
        """Least recently used first."""
        self._bytes = 0
        self._lookups = self._hits = self._reused = self._evicted = 0

    @classmethod
    def for_model(cls, model: Any, budget_bytes: int, block: int = BLOCK_TOKENS) -> "PrefixCache":
        """A cache for `model`; its budget is 0 (nothing kept) if the model's cache layers cannot be kept in blocks."""
        if cacheable(model, block) is not None:
            budget_bytes = 0
        return cls(budget_bytes=budget_bytes, block=block, bytes_per_token=kv_bytes_per_token(model))

    @property
    def enabled(self) -> bool:
        return self.budget_bytes >= self.block * self.bytes_per_token > 0

    def capacity_tokens(self) -> int:
        """Prompt tokens the budget holds (whole blocks)."""
        per_block = self.block * self.bytes_per_token
        return (self.budget_bytes // per_block) * self.block if per_block > 0 else 0

    def stats(self) -> PrefixStats:
        return PrefixStats(len(self._blocks), self._bytes, self._lookups, self._hits, self._reused, self._evicted)

    def lookup(self, keys: Sequence[bytes], tokens: int) -> int:
        """How many leading blocks of a sequence of `tokens` tokens (whose block keys are `keys`) to reuse: the
        cached run, leaving at least the last token to compute. Touches them (first block most recent)."""
        if not self.enabled:
            return 0
        self._lookups += 1
        limit = min(len(keys), (tokens - 1) // self.block)
        found = 0
        while found < limit and keys[found] in self._blocks:
            found += 1
        self.touch(keys[:found])
        if found:
            self._hits += 1
            self._reused += found * self.block
        return found

    def restore(self, model: Any, keys: Sequence[bytes]) -> Any:
        """A `DynamicCache` holding the blocks `keys` (consecutive, from the first), as if prefilled."""
        from transformers import DynamicCache

        if not keys:
            return new_cache(model)
        blocks = [self._blocks[key] for key in keys]
        layers = len(blocks[0])
        data = [
            (torch.cat([b[i][0] for b in blocks], dim=-2), torch.cat([b[i][1] for b in blocks], dim=-2))
            for i in range(layers)
        ]
        return DynamicCache(data, config=model.config)

    def store(self, key: bytes, cache: Any, protect: Collection[bytes]) -> bool:
        """Keep the last `block` positions of every layer of `cache` (the chunk just prefilled) as block `key`,
        evicting least recently used blocks, never one of `protect` (the blocks of the prompt in hand). False when
        the block does not fit."""
        if not self.enabled:
            return False
        if key in self._blocks:
            self._blocks.move_to_end(key)
            return True
        b = self.block
        if any(not layer.is_initialized or layer.keys.shape[-2] < b for layer in cache.layers):
            return False  # a layer the model never ran (a model cut short of its config's layers)
        kv = tuple((layer.keys[..., -b:, :].clone(), layer.values[..., -b:, :].clone()) for layer in cache.layers)
        size = sum(k.nbytes + v.nbytes for k, v in kv)
        if not self._make_room(size, protect):
            return False
        self._blocks[key] = kv
        self._bytes += size
        return True

    def touch(self, keys: Sequence[bytes]) -> None:
        """Mark a prompt's blocks used, its first block most recently."""
        for key in reversed(keys):
            if key in self._blocks:
                self._blocks.move_to_end(key)

    def clear(self) -> None:
        self._blocks.clear()
        self._bytes = 0

    def _make_room(self, size: int, protect: Collection[bytes]) -> bool:
        if size > self.budget_bytes:
            return False
        while self._bytes + size > self.budget_bytes:
            oldest = next(iter(self._blocks))
            if oldest in protect:  # only the prompt in hand is left: keep its earlier blocks
                return False
            kv = self._blocks.pop(oldest)
            self._bytes -= sum(k.nbytes + v.nbytes for k, v in kv)
            self._evicted += 1
        return True


__all__ = [
    "BLOCK_TOKENS",
    "DEFAULT_PREFIX_CACHE_MB",
    "PrefixCache",
    "PrefixStats",
    "block_keys",
    "cacheable",
    "kv_bytes_per_token",
    "new_cache",
]
