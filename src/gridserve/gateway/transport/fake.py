"""A scripted node transport for tests: each node plays a script of steps on asyncio's clock, so hedging,
retries, stalls and failover run in milliseconds without sockets or processes.

    fake = FakeTransport()
    fake.script("n1", Delay(0.05), Tokens(3, every_s=0.01), Stall())   # late first token, then goes silent
    fake.script("n2", Tokens(8, every_s=0.005), Finish())               # a healthy node
    fake.always("n3", Refuse(503, "busy"))                              # every call to n3

Each call to `generate` on a node takes the node's next script (then its `always` script; a node with neither is
Unreachable). Steps before the first event happen before the reply begins (`generate` awaits them: the node's
headers come with its first event, as a real node's do); the rest are played by the node on its own task into
a buffer the gateway reads from, so a node keeps sending while the gateway is busy, as a socket buffers bytes.

Token events are numbered by completion position: the token at position p has id p and text "<p>", and a
continuation after failover (`job.resume` of k tokens) starts at p = k. The client's text is therefore
"<0><1>...<n-1>" exactly when failover resumed at the right place.
"""

import asyncio
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from gridserve.gateway.transport.base import StageChannel, is_token_event
from gridserve.gateway.transport.errors import Refused, TransportError, Unreachable
from gridserve.trust import Identity
from gridserve.trust.challenge import answer as challenge_answer
from gridserve.types import GenerateRequest, NodeId, StreamEvent
from gridserve.types.embedding import EmbedRequest


@dataclass(frozen=True)
class Delay:
    """Time passes on the node."""

    seconds: float


@dataclass(frozen=True)
class Emit:
    """The node sends one event as given (an engine error: `Emit({"error": {"message": "..."}})`)."""

    event: StreamEvent


@dataclass(frozen=True)
class Tokens:
    """`count` token events, the first at once and then one every `every_s`, numbered by position."""

    count: int
    every_s: float = 0.0


@dataclass(frozen=True)
class Busy:
    """The node's engine works on other streams for `seconds`: a busy line every `every_s`, no token."""

    seconds: float
    every_s: float = 0.1


@dataclass(frozen=True)
class Finish:
    """The last event: finish reason and counts (completion tokens = the position reached)."""

    reason: str = "stop"


@dataclass(frozen=True)
class Stall:
    """The node goes silent and keeps the connection open."""


@dataclass(frozen=True)
class Fail:
    """The stream breaks with this error (BrokenStream, Malformed...). Before the first event: `generate` raises
    it (an Unreachable or Timeout node)."""

    error: TransportError


@dataclass(frozen=True)
class Refuse:
    """The node answers an error status instead of a stream (a first step only)."""

    status: int
    message: str = "refused"


Step = Delay | Emit | Tokens | Busy | Finish | Stall | Fail | Refuse


@dataclass
class FakeCall:
    """One generation the gateway opened, as the node saw it."""

    node_id: NodeId
    job: GenerateRequest
    opened_at: float
    """When the gateway opened it (the event loop's clock)."""
    sent: list[StreamEvent] = field(default_factory=list)
    closed: bool = False
    """The gateway closed the stream, or gave up on it before the reply began."""

    @property
    def tokens(self) -> int:
        return sum(len(e.get("token_ids", ())) for e in self.sent)


_END = object()


class _Buffer(asyncio.Queue[Any]):
    """asyncio's queue, whose next item may be looked at (`head`: None when empty)."""

    def _init(self, maxsize: int) -> None:
        self._queue = self.items = deque[Any]()

    def head(self) -> Any:
        return self.items[0] if self.items else None


class FakeStream:
    """The gateway's end of one scripted generation."""

    def __init__(self, call: FakeCall, steps: Sequence[Step], position: int) -> None:
        self.call = call
        self.buffer = _Buffer()
        self.busy_at = 0.0
        self.node = asyncio.get_running_loop().create_task(self._play(steps, position))

    async def _play(self, steps: Sequence[Step], position: int) -> None:
        for step in steps:
            if isinstance(step, Delay):
                await asyncio.sleep(step.seconds)
            elif isinstance(step, Emit):
                self._send(step.event)
            elif isinstance(step, Tokens):
                for i in range(step.count):
                    if i and step.every_s:
                        await asyncio.sleep(step.every_s)
                    self._send({"text": f"<{position}>", "token_ids": [position]})
                    position += 1
            elif isinstance(step, Busy):
                for i in range(max(1, round(step.seconds / step.every_s))):
                    await asyncio.sleep(step.every_s)
                    self._send({"busy": i + 1})
            elif isinstance(step, Finish):
                prompt = len(self.call.job.prompt or "")
                self._send({"finish_reason": step.reason, "prompt_tokens": prompt, "completion_tokens": position})
            elif isinstance(step, Stall):
                await asyncio.Event().wait()
            elif isinstance(step, Fail):
                self.buffer.put_nowait(step.error)
                return
        self.buffer.put_nowait(_END)

    def _send(self, event: StreamEvent) -> None:
        self.call.sent.append(event)
        self.buffer.put_nowait(event)

    async def next(self) -> StreamEvent | None:
        item = await self.buffer.get()
        while isinstance(item, dict) and "busy" in item:
            self.busy_at = asyncio.get_running_loop().time()
            item = await self.buffer.get()
        if item is _END:
            self.buffer.put_nowait(_END)  # ended streams stay ended
            return None
        if isinstance(item, TransportError):
            self.buffer.put_nowait(item)
            raise item
        event: StreamEvent = item
        return event

    def ready(self) -> bool:
        head = self.buffer.head()
        return isinstance(head, dict) and is_token_event(head)

    def close(self) -> None:
        self.call.closed = True
        self.node.cancel()


class FakeTransport:
    """Scripted nodes (see the module docstring). `calls` lists every generation opened, in order."""

    def __init__(self) -> None:
        self.scripts: dict[str, deque[tuple[Step, ...]]] = {}
        self.defaults: dict[str, tuple[Step, ...]] = {}
        self.calls: list[FakeCall] = []
        self.health: dict[str, TransportError] = {}
        """Nodes whose probes fail, and how."""
        self.probes: list[NodeId] = []
        self.identities: dict[str, Identity] = {}
        """Nodes whose probes sign the challenge (with this key); the others answer unsigned, as a stranger."""
        self.loads: list[tuple[NodeId, dict[str, Any]]] = []
        self.load_answers: dict[str, TransportError] = {}
        """Nodes whose load requests fail, and how (Refused: the node declined)."""
        self.embeds: list[tuple[NodeId, EmbedRequest]] = []
        self.embed_answers: dict[str, bytes | TransportError] = {}
        """What each node answers an embeddings request: its body (a signed envelope), or how the call fails; a node
        not named is unreachable."""

    def script(self, node_id: str, *steps: Step) -> None:
        """The node's next generation plays `steps` (scripts queue up, one per call)."""
        self.scripts.setdefault(node_id, deque()).append(steps)

    def always(self, node_id: str, *steps: Step) -> None:
        """Every generation on the node plays `steps` once its queued scripts are used up."""
        self.defaults[node_id] = steps

    def calls_to(self, node_id: str) -> list[FakeCall]:
        return [c for c in self.calls if c.node_id == node_id]

    async def start(self) -> None:
        return None

    async def aclose(self) -> None:
        return None

    async def generate(self, node_id: NodeId, endpoint: str, job: GenerateRequest) -> FakeStream:
        queued = self.scripts.get(node_id)
        steps = queued.popleft() if queued else self.defaults.get(node_id)
        if steps is None:
            raise Unreachable(f"no node at {endpoint}", cause="ClientConnectorError")
        call = FakeCall(node_id, job, asyncio.get_running_loop().time())
        self.calls.append(call)
        try:
            rest = await _before_reply(steps)
        except BaseException:
            call.closed = True  # refused, unreachable, or given up by the gateway before the reply
            raise
        return FakeStream(call, rest, len(job.resume))

    async def load(self, node_id: NodeId, endpoint: str, payload: Mapping[str, Any], timeout_s: float) -> None:
        self.loads.append((node_id, dict(payload)))
        error = self.load_answers.get(node_id)
        if error is not None:
            raise error

    async def embed(self, node_id: NodeId, endpoint: str, job: EmbedRequest, timeout_s: float) -> bytes:
        self.embeds.append((node_id, job))
        answer = self.embed_answers.get(node_id, Unreachable(f"no node at {endpoint}", cause="ClientConnectorError"))
        if isinstance(answer, TransportError):
            raise answer
        return answer

    async def probe(self, node_id: NodeId, endpoint: str, timeout_s: float, challenge: str) -> bytes:
        self.probes.append(node_id)
        error = self.health.get(node_id)
        if error is not None:
            raise error
        identity = self.identities.get(node_id)
        signature = challenge_answer(identity, challenge) if identity is not None else ""
        return orjson.dumps({"status": "ok", "node_id": node_id, "challenge_signature": signature})

    async def stage_link(self, node_id: NodeId, endpoint: str, timeout_s: float) -> StageChannel:
        raise Unreachable("the fake transport has no stage links")


async def _before_reply(steps: Sequence[Step]) -> Sequence[Step]:
    """Play the steps that come before the reply begins; returns the rest."""
    for i, step in enumerate(steps):
        if isinstance(step, Delay):
            await asyncio.sleep(step.seconds)
        elif isinstance(step, Refuse):
            raise Refused(step.status, step.message, body=f'{{"error": {{"message": "{step.message}"}}}}')
        elif isinstance(step, Fail):
            raise step.error
        else:
            return steps[i:]
    return ()


__all__ = [
    "Busy",
    "Delay",
    "Emit",
    "Fail",
    "FakeCall",
    "FakeStream",
    "FakeTransport",
    "Finish",
    "Refuse",
    "Stall",
    "Step",
    "Tokens",
]
