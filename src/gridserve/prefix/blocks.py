"""Prompts as chains of block hashes: block i's hash covers blocks 0..i, so equal hashes mean equal prefixes.

The gateway does not tokenize (nodes do, each with its own tokenizer), so it hashes the text it sends: a chat's
messages rendered with their roles, in blocks of `CHAT_BLOCK_CHARS` characters (~32 tokens at the gateway's 4
characters a token). Only whole blocks count: a prompt's trailing partial block changes when the next turn
extends it. Hashes are Python's (fast, salted per process): the index lives in one gateway process and is
rebuilt from traffic after a restart. The simulator uses a trace's own block ids (Mooncake's `hash_ids`)."""

from collections.abc import Sequence

from gridserve.types import ChatMessage

CHARS_PER_TOKEN = 4
"""The gateway's prompt-length estimate (it does not tokenize), in characters a token."""
CHAT_BLOCK_CHARS = 128
"""Characters per block of prompt text."""
_SEP = "\x1e"
"""Between a message's role and its content, and after each message (ASCII record separator)."""


def render(prompt: str | None, messages: Sequence[ChatMessage] | None) -> str:
    """The text whose blocks are hashed: a completion's prompt, or a chat's messages with their roles (a
    later turn's rendering starts with every earlier turn's)."""
    if messages is None:
        return prompt or ""
    return "".join(f"{m.role}{_SEP}{m.content}{_SEP}" for m in messages)


def text_blocks(text: str, block_chars: int = CHAT_BLOCK_CHARS) -> list[int]:
    """The chain hash of each whole block of `text`."""
    out: list[int] = []
    h = 0
    for start in range(0, len(text) - block_chars + 1, block_chars):
        h = hash((h, text[start : start + block_chars]))
        out.append(h)
    return out


__all__ = ["CHARS_PER_TOKEN", "CHAT_BLOCK_CHARS", "render", "text_blocks"]
