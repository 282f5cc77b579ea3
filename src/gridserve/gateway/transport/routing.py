"""The gateway's NodeTransport: each node by the way its endpoint says (an outbound-only node's `tunnel://` over
its tunnel, every other over HTTP)."""

from collections.abc import Mapping
from typing import Any

from gridserve.gateway.transport.base import EventStream, NodeTransport, StageChannel
from gridserve.gateway.transport.http import AiohttpTransport
from gridserve.gateway.transport.tunnel import TunnelTransport
from gridserve.tunnel.wire import is_tunnel
from gridserve.types import GenerateRequest, NodeId
from gridserve.types.embedding import EmbedRequest


class RoutingTransport:
    def __init__(self, direct: AiohttpTransport, tunnels: TunnelTransport) -> None:
        self.direct, self.tunnels = direct, tunnels

    def _to(self, endpoint: str) -> NodeTransport:
        return self.tunnels if is_tunnel(endpoint) else self.direct

    async def start(self) -> None:
        await self.direct.start()
        await self.tunnels.start()

    async def aclose(self) -> None:
        await self.tunnels.aclose()
        await self.direct.aclose()

    async def generate(self, node_id: NodeId, endpoint: str, job: GenerateRequest) -> EventStream:
        return await self._to(endpoint).generate(node_id, endpoint, job)

    async def embed(self, node_id: NodeId, endpoint: str, job: EmbedRequest, timeout_s: float) -> bytes:
        return await self._to(endpoint).embed(node_id, endpoint, job, timeout_s)

    async def load(self, node_id: NodeId, endpoint: str, payload: Mapping[str, Any], timeout_s: float) -> None:
        await self._to(endpoint).load(node_id, endpoint, payload, timeout_s)

    async def probe(self, node_id: NodeId, endpoint: str, timeout_s: float, challenge: str) -> bytes:
        return await self._to(endpoint).probe(node_id, endpoint, timeout_s, challenge)

    async def stage_link(self, node_id: NodeId, endpoint: str, timeout_s: float) -> StageChannel:
        return await self._to(endpoint).stage_link(node_id, endpoint, timeout_s)
