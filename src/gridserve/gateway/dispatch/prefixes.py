"""Prefix-aware routing at the gateway: the prefix index (gridserve.prefix) kept from what this gateway sends.

Before a decision, `lookup` names the nodes that probably hold the request's prompt prefix in their KV cache
and how many prompt tokens each would reuse (`ScheduleRequest.cached_tokens`); the scheduler predicts prefill on
the rest, on each node's own hardware. After it, the lifecycle tells it which node prefilled the prompt: the one
that opened the answer, and the one that finished it after a failover.

The index trusts no node: it holds what the gateway itself dispatched. A node that registers again (a restart)
or goes down starts empty. Its capacity is the node's KV room for the model (device memory less the weights,
from the catalogue) or what the node advertises for its prefix cache, whichever is smaller.
"""

import math

from gridserve.catalog.models import DTYPE_BYTES, MODELS
from gridserve.gateway.lifecycle.record import Finished, Settled
from gridserve.gateway.lifecycle.subscribers import Scope, Subscriber
from gridserve.gateway.pipeline.candidate import is_pipeline
from gridserve.prefix import CHAT_BLOCK_CHARS, PrefixIndex
from gridserve.prefix.blocks import CHARS_PER_TOKEN, render, text_blocks
from gridserve.prefix.index import DEFAULT_CAPACITY_BLOCKS
from gridserve.scheduler.snapshot import NodeStatic
from gridserve.types import Capability, GenerateRequest
from gridserve.types.scheduling import Decision

TOKENS_PER_BLOCK = CHAT_BLOCK_CHARS / CHARS_PER_TOKEN
_STATE = "prefix"
_OPENED_ON = "prefix.opened_on"


class PrefixAffinity(Subscriber):
    def __init__(self, *, enabled: bool = True, block_chars: int = CHAT_BLOCK_CHARS) -> None:
        self.enabled = enabled
        self.block_chars = block_chars
        self.index = PrefixIndex()
        self.block_tokens: dict[str, int] = {}
        """Nodes whose prefix cache reuses whole blocks of this many tokens (their capability says so)."""

    # -- before the decision --------------------------------------------------------------------------------------

    def lookup(self, scope: Scope, job: GenerateRequest, prompt_tokens: int) -> tuple[tuple[str, int], ...]:
        """(node, prompt tokens it probably holds) for the nodes holding this prompt's first block or more; the
        prompt's blocks are kept on `scope` for `opened`."""
        if not self.enabled:
            return ()
        blocks = text_blocks(render(job.prompt, job.messages), self.block_chars)
        scope.state[_STATE] = blocks
        limit = max(0, prompt_tokens - 1)  # the last prompt token is always computed
        if not limit:
            return ()
        found = []
        for node, n in self.index.match(blocks).items():
            tokens = min(limit, int(n * TOKENS_PER_BLOCK))
            block = self.block_tokens.get(node)
            if block:
                tokens -= tokens % block  # the node reuses whole blocks only
            if tokens:
                found.append((node, tokens))
        return tuple(found)

    # -- membership -----------------------------------------------------------------------------------------------

    def registered(self, capability: Capability) -> None:
        """A node (re)registered: its cache starts empty, sized for the models it serves."""
        self.index.drop(capability.node_id)
        self.index.set_capacity(capability.node_id, capacity_blocks(capability))
        if capability.prefix_block_tokens:
            self.block_tokens[capability.node_id] = capability.prefix_block_tokens
        else:
            self.block_tokens.pop(capability.node_id, None)

    def lost(self, node_id: str) -> None:
        """The node went down: whatever it held may be gone."""
        self.index.drop(node_id)

    # -- the lifecycle --------------------------------------------------------------------------------------------

    def prefilled(self, scope: Scope, node_id: str) -> None:
        """`node_id` prefilled the prompt looked up in `scope`: it holds its blocks now."""
        blocks = scope.state.get(_STATE)
        if blocks:
            self.index.insert(node_id, blocks)
            scope.state[_OPENED_ON] = node_id

    def opened(self, scope: Scope, decision: Decision, served_by: str, fields: dict[str, object]) -> None:
        if not is_pipeline(served_by):  # (a pipeline's stages each hold a part of the KV cache)
            self.prefilled(scope, served_by)

    def finished(self, scope: Scope, end: Finished, settled: Settled) -> None:
        blocks = scope.state.get(_STATE)
        if blocks and not end.pipeline and end.served_by and end.served_by != scope.state.get(_OPENED_ON):
            self.index.insert(end.served_by, blocks)  # a failover: the node that took over prefilled it too


def capacity_blocks(capability: Capability) -> int:
    """Blocks of prompt the node can keep: the smallest KV room among its models' (memory less weights, over
    KV bytes a token of a typical prompt takes: ModelSpec.kv_room_tokens), capped by what it advertises for its
    prefix cache."""
    static = NodeStatic.of(capability)
    room = math.inf
    for offer in capability.models:
        spec = MODELS.get(offer.name)
        if spec is None or not static.memory_bytes:
            continue
        dtype = offer.dtype if offer.dtype in DTYPE_BYTES else "float16"
        room = min(room, spec.kv_room_tokens(static.memory_bytes, dtype, offer.quantization))
    if capability.prefix_cache_tokens is not None:
        room = min(room, capability.prefix_cache_tokens)
    if math.isinf(room):
        return DEFAULT_CAPACITY_BLOCKS
    return int(room / TOKENS_PER_BLOCK)


__all__ = ["PrefixAffinity", "capacity_blocks"]
