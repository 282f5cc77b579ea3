"""What the gateway asks of a node, as one protocol: open a generation, ask for a load, probe its health, and
link to it as a pipeline stage. The gateway's dispatch and health checks speak only this protocol and catch only
the error tree of `errors.py`; `http.AiohttpTransport` carries it over HTTP, `fake.FakeTransport` plays scripted
nodes for millisecond tests.
"""

import re
from collections.abc import Mapping
from typing import Any, Protocol

from gridserve.types import GenerateRequest, NodeId, StreamEvent
from gridserve.types.embedding import EmbedRequest

NOT_TOKEN_KEYS = ("finish_reason", "error", "busy")
"""Keys that make an event with text something else than a token: the last event, a failure, a busy line."""
_NOT_TOKEN = re.compile("|".join(re.escape(f'"{key}"') for key in NOT_TOKEN_KEYS).encode())


def is_token_event(event: Mapping[str, Any]) -> bool:
    """Whether a node's event is a token: text, and none of `NOT_TOKEN_KEYS`."""
    return "text" in event and not any(key in event for key in NOT_TOKEN_KEYS)


def is_token_line(line: bytes) -> bool:
    """`is_token_event` of a node's NDJSON line, without parsing it. (A key is found by its quoted name: inside a
    JSON string a quote is escaped, so text cannot fake one.)"""
    return b'"text"' in line and _NOT_TOKEN.search(line) is None


class EventStream(Protocol):
    """A generation under way on one node."""

    async def next(self) -> StreamEvent | None:
        """The next event; None once the node ended the stream. Raises BrokenStream or Malformed. Busy lines
        are not events: they only move `busy_at`."""
        ...

    @property
    def busy_at(self) -> float:
        """When (the event loop's time) the node last said it is busy with other streams' work while this one
        waits (a `busy` line); 0.0 if never."""
        ...

    def ready(self) -> bool:
        """A token event is already here (read, not yet taken): `next()` returns it without waiting. False for
        anything else waiting (the last event, an error, a busy line) and when nothing is. The API sends every
        token made while this holds in one write (gateway/api/answers.py: `sse`)."""
        ...

    def close(self) -> None:
        """Stop reading and release the connection: the node sees the gateway go and stops the work."""
        ...


class StageChannel(Protocol):
    """A long-lived, ordered channel of binary frames to a pipeline stage node (the frames are signed and
    checked by the pipeline, trust/frames.py; the channel only carries them)."""

    @property
    def closed(self) -> bool: ...

    async def send(self, data: bytes) -> None: ...

    async def receive(self, timeout_s: float | None) -> bytes:
        """The next frame; raises Timeout after `timeout_s` (None: no limit), BrokenStream when the node closed the
        channel."""
        ...

    async def aclose(self) -> None: ...


class NodeTransport(Protocol):
    """Everything the gateway asks of a node. Every method raises only TransportError subclasses (besides
    cancellation); a method that returns has succeeded."""

    async def start(self) -> None:
        """Open the connection pool (in the serving event loop)."""
        ...

    async def aclose(self) -> None: ...

    async def generate(self, node_id: NodeId, endpoint: str, job: GenerateRequest) -> EventStream:
        """Open a gateway-signed generation on the node; returns once the node's reply began. Raises Refused
        (the node answered an error status), Unreachable or Timeout."""
        ...

    async def embed(self, node_id: NodeId, endpoint: str, job: EmbedRequest, timeout_s: float) -> bytes:
        """Ask the node (gateway-signed) for embeddings; returns its answer's body (an envelope the node signed:
        the caller checks it) once whole, within `timeout_s`. Raises Refused (an error status), Unreachable,
        Timeout or BrokenStream."""
        ...

    async def load(self, node_id: NodeId, endpoint: str, payload: Mapping[str, Any], timeout_s: float) -> None:
        """Ask the node (gateway-signed) to load a model or a layer range; returns when it took the request.
        Raises Refused when it declined, Unreachable or Timeout when it could not be asked."""
        ...

    async def probe(self, node_id: NodeId, endpoint: str, timeout_s: float, challenge: str) -> bytes:
        """One health check carrying `challenge`; returns the body when the node answered healthy within
        `timeout_s` (trust/challenge.py checks it). Raises Refused, Timeout or Unreachable otherwise."""
        ...

    async def stage_link(self, node_id: NodeId, endpoint: str, timeout_s: float) -> StageChannel:
        """Open a channel to the node's pipeline-stage endpoint."""
        ...


__all__ = ["EventStream", "NodeTransport", "StageChannel"]
