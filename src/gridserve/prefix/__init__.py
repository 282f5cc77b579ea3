"""Which node probably holds which prompt prefix in its KV cache: block hashes of prompts (`blocks`) and the
index the gateway and the simulator keep of them (`index`)."""

from gridserve.prefix.blocks import CHAT_BLOCK_CHARS, text_blocks
from gridserve.prefix.index import PrefixIndex

__all__ = ["CHAT_BLOCK_CHARS", "PrefixIndex", "text_blocks"]
