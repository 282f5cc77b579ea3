"""The gateway's only way to a node: the NodeTransport protocol, its error tree, the aiohttp implementation and a
scripted fake for tests."""

from gridserve.gateway.transport.base import EventStream, NodeTransport, StageChannel
from gridserve.gateway.transport.errors import (
    BrokenStream,
    Malformed,
    Refused,
    Timeout,
    TransportError,
    Unreachable,
)
from gridserve.gateway.transport.http import AiohttpTransport

__all__ = [
    "AiohttpTransport",
    "BrokenStream",
    "EventStream",
    "Malformed",
    "NodeTransport",
    "Refused",
    "StageChannel",
    "Timeout",
    "TransportError",
    "Unreachable",
]
