"""The gateway drives a pipeline: token ids to the first stage, hidden states along the chain, logits back.

Each stage node holds one long-lived WebSocket from the gateway (no connection set-up per token); every
frame is signed (trust/frames.py). For each generated token the gateway sends the step to stage 1, passes
its output to stage 2, and so on; the last stage returns the last position's logits and the gateway picks
the token exactly as a whole-model node would (engines/sampling.py), so greedy and seeded outputs equal
a single node's. The gateway keeps every stage's inputs of the session: when a stage node dies, its layer
range is re-planned onto other live stage nodes, their fresh KV caches are rebuilt by replaying those
inputs in the same shapes as before (so the cache is the same, bit for bit), and the step is retried.
"""

import asyncio
import contextlib
import itertools
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import numpy.typing as npt

from gridserve.gateway.transport import NodeTransport, StageChannel, TransportError
from gridserve.planner.chain import NoChain, StageRoute, plan_chain
from gridserve.trust import TrustError
from gridserve.trust.frames import Frame, FrameReader, encode
from gridserve.trust.identity import Identity
from gridserve.types import NodeId, SamplingParams

if TYPE_CHECKING:  # torch is imported on first use: the gateway starts without it
    from gridserve.engines.torch_engine import TextCodec

_T = TypeVar("_T")

CONNECT_TIMEOUT_S = 10.0


class StageFailed(Exception):
    """A stage node could not run a step (connection lost, refused, or an engine error)."""

    def __init__(self, node_id: str, detail: str) -> None:
        super().__init__(f"stage {node_id[:12]}: {detail}")
        self.node_id = node_id


class LinkBroken(ConnectionError):
    """The link's connection ended, or a reply did not answer the frame sent (the stream is out of step)."""


LINK_ERRORS: tuple[type[BaseException], ...] = (
    TransportError,  # the channel's own tree (transport/errors.py): Unreachable or Refused (the link did not open),
    # BrokenStream (reset, closed by the node, its tunnel ended), Timeout
    OSError,  # LinkBroken; TimeoutError (a reply or the opening not in time; asyncio.TimeoutError is TimeoutError)
    RuntimeError,  # what the HTTP channel leaves untranslated: aiohttp's "Session is closed", a second receive()
    TrustError,  # a reply that fails its signature, freshness or sequence checks
)
"""Everything a dead or dying stage connection raises, at any point of an exchange (connect, hello, send, receive).
`StageLink.exchange` turns each into `StageFailed`: the one error the session re-plans around."""


@dataclass
class Exchange:
    sent_bytes: int
    received_bytes: int
    round_trip_s: float
    compute_s: float


class StageLink:
    """One long-lived, signed channel to a stage node (a WebSocket, direct or inside an outbound-only node's
    tunnel: whichever the transport opens for the node's endpoint); one exchange at a time.

    A reader task stays on the channel for its whole life, so the link answers the node's keep-alive pings while
    it is idle (over HTTP, aiohttp answers a ping only inside `receive()`; uvicorn closes a connection whose pings
    go unanswered for 20 s, and a link idle between two requests would then fail the next one on a healthy node)
    and learns at once that the node closed it or died. It is also the one place where the channel's errors become
    `StageFailed` (`LINK_ERRORS`)."""

    def __init__(self, identity: Identity, route: StageRoute, transport: NodeTransport) -> None:
        self.identity, self.route, self.transport = identity, route, transport
        self.ws: StageChannel | None = None
        self.reader = FrameReader(me=identity.public_key, sender=route.public_key)
        self.seq = 0
        self.lock = asyncio.Lock()
        self._replies: asyncio.Queue[bytes | BaseException] = asyncio.Queue()
        self._listener: asyncio.Task[None] | None = None

    @property
    def open(self) -> bool:
        """Connected, and the connection has not ended (as far as the reader task has seen)."""
        listening = self._listener is not None and not self._listener.done()
        return self.ws is not None and not self.ws.closed and listening

    async def connect(self, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
        """Open the connection and say hello; StageFailed if that cannot be done."""
        async with self.lock:
            await self._guarded(self._connect(timeout_s), "cannot connect")

    async def exchange(self, frame: Frame, wire_dtype: str | None, timeout_s: float) -> tuple[Frame, Exchange]:
        """Send `frame`, wait for the node's answer; StageFailed if the node cannot give it (the link is then
        closed: the next exchange connects again)."""
        async with self.lock:
            if not self.open:
                await self._guarded(self._connect(CONNECT_TIMEOUT_S), "cannot connect")
            started = time.perf_counter()
            reply, sent, received = await self._guarded(self._send_recv(frame, wire_dtype, timeout_s), "")
            elapsed = time.perf_counter() - started
        if reply.kind == "error":
            raise StageFailed(self.route.node_id, f"{reply.meta.get('type')}: {reply.meta.get('message')}")
        compute = float(reply.meta.get("compute_s", 0.0))
        return reply, Exchange(sent, received, elapsed, compute)

    async def _guarded(self, step: Awaitable[_T], what: str) -> _T:
        """The boundary: any of `LINK_ERRORS` closes the link and becomes StageFailed. Anything else (a
        cancelled request among them) closes the link too and goes on: an answer may still be on its way, and
        no later exchange may take it for its own."""
        try:
            return await step
        except LINK_ERRORS as exc:
            await self.aclose()
            detail = _describe(exc)
            raise StageFailed(self.route.node_id, f"{what} ({detail})" if what else detail) from exc
        except BaseException:
            await self.aclose()
            raise

    async def _connect(self, timeout_s: float) -> None:
        await self.aclose()
        opening = self.transport.stage_link(NodeId(self.route.node_id), self.route.endpoint, timeout_s)
        channel = self.ws = await asyncio.wait_for(opening, timeout_s)
        self.reader = FrameReader(me=self.identity.public_key, sender=self.route.public_key)
        self._replies = asyncio.Queue()
        self._listener = asyncio.create_task(_listen(channel, self._replies), name=f"stage-link-{self.route.node_id}")
        hello, _, _ = await self._send_recv(Frame("hello"), None, timeout_s)
        if (hello.meta.get("start"), hello.meta.get("end")) != (self.route.start, self.route.end):
            raise StageFailed(
                self.route.node_id, f"runs layers {hello.meta}, not [{self.route.start}, {self.route.end})"
            )

    async def _send_recv(self, frame: Frame, wire_dtype: str | None, timeout_s: float) -> tuple[Frame, int, int]:
        if self.ws is None:
            raise LinkBroken("stage connection closed")
        self.seq += 1
        data = encode(self.identity, frame, to=self.route.public_key, seq=self.seq, wire_dtype=wire_dtype)
        await self.ws.send(data)
        answer = await asyncio.wait_for(self._replies.get(), timeout_s)
        if isinstance(answer, BaseException):
            raise answer
        reply, _ = self.reader.decode(answer)
        if (reply.session, reply.step) != (frame.session, frame.step):
            raise LinkBroken(f"a reply for {reply.session}/{reply.step} to {frame.kind} {frame.session}/{frame.step}")
        return reply, len(data), len(answer)

    async def aclose(self) -> None:
        """Close the connection (the link connects again on its next exchange)."""
        channel, listener = self.ws, self._listener
        self.ws, self._listener = None, None  # first: a second cancellation leaves the link closed all the same
        if listener is not None:
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listener
        if channel is not None:
            with contextlib.suppress(TransportError):  # (a channel that broke: closed all the same)
                await channel.aclose()


def _describe(exc: BaseException) -> str:
    """An error for StageFailed's detail: a transport error by the foreign exception it replaced, when there was
    one ("ClientConnectionResetError: Cannot write to closing transport"), else by its own class."""
    name = exc.cause if isinstance(exc, TransportError) and exc.cause else type(exc).__name__
    return f"{name}: {exc}"


async def _listen(channel: StageChannel, replies: "asyncio.Queue[bytes | BaseException]") -> None:
    """The link's reader: replies go to the queue; the end of the channel goes there as an error (BrokenStream
    when the node closed it), for the exchange waiting on the queue to raise."""
    try:
        while True:
            replies.put_nowait(await channel.receive(None))  # over HTTP, answers the node's pings on the way
    except Exception as exc:  # e.g. the pong written on a transport the node has closed
        replies.put_nowait(exc)


class LinkPool:
    """The gateway's long-lived links, one per stage node, opened on first use and reused by every session."""

    def __init__(self, identity: Identity, transport: NodeTransport) -> None:
        self.identity, self.transport = identity, transport
        self.links: dict[str, StageLink] = {}

    async def link(self, route: StageRoute) -> StageLink:
        """The node's link; a new one only if the node now has another address, key or layer range (a route's
        cost changes with every RTT probe: that keeps the connection)."""
        found = self.links.get(route.node_id)
        if found is not None and _same_node(found.route, route):
            return found
        if found is not None:
            await found.aclose()
        found = StageLink(self.identity, route, self.transport)
        self.links[route.node_id] = found
        return found

    async def aclose(self) -> None:
        for link in self.links.values():
            await link.aclose()
        self.links.clear()


def _same_node(a: StageRoute, b: StageRoute) -> bool:
    return (a.endpoint, a.public_key, a.start, a.end) == (b.endpoint, b.public_key, b.start, b.end)


@dataclass
class StageTiming:
    """What one stage cost this session: the doctor reads it to tell compute from communication."""

    node_id: str
    start: int
    end: int
    steps: int = 0
    compute_s: float = 0.0
    round_trip_s: float = 0.0
    sent_bytes: int = 0
    received_bytes: int = 0

    def add(self, ex: Exchange) -> None:
        self.steps += 1
        self.compute_s += ex.compute_s
        self.round_trip_s += ex.round_trip_s
        self.sent_bytes += ex.sent_bytes
        self.received_bytes += ex.received_bytes

    def merge(self, other: "StageTiming") -> None:
        self.steps += other.steps
        self.compute_s += other.compute_s
        self.round_trip_s += other.round_trip_s
        self.sent_bytes += other.sent_bytes
        self.received_bytes += other.received_bytes

    def as_dict(self) -> dict[str, Any]:
        return {
            "node_id": self.node_id,
            "layers": [self.start, self.end],
            "steps": self.steps,
            "compute_s": round(self.compute_s, 6),
            "transfer_s": round(max(0.0, self.round_trip_s - self.compute_s), 6),
            "sent_bytes": self.sent_bytes,
            "received_bytes": self.received_bytes,
        }


@dataclass
class Replan:
    at_step: int
    failed: str
    replaced_by: list[str]
    replayed_steps: int
    seconds: float


@dataclass
class PipelineSession:
    """One generation over a chain of stage nodes, driven step by step."""

    pool: LinkPool
    chain: list[StageRoute]
    routes: Callable[[], Sequence[StageRoute]]
    """The live stage routes for this model now (for re-planning)."""
    wire_dtype: str | None = None
    """None: activations go as float32 (bitwise exact); "bfloat16": half the bytes, rounded."""
    step_timeout_s: float = 30.0
    session: str = field(default_factory=lambda: "ps-" + secrets.token_hex(8))
    inputs: dict[int, list[npt.NDArray[Any]]] = field(default_factory=dict)
    """Layer boundary -> every input that crossed it this session, in order (replayed after a re-plan)."""
    timings: dict[str, StageTiming] = field(default_factory=dict)
    replans: list[Replan] = field(default_factory=list)
    failed: set[str] = field(default_factory=set)
    """Nodes whose stage failed this session: no later re-plan picks them (the registry may list a dead node
    for a few heartbeats more)."""
    steps: int = 0
    forward_s: float = 0.0
    """The gateway's wall time over all steps (every stage in turn, re-plans included)."""

    async def open(self) -> None:
        index = 0
        while index < len(self.chain):
            try:
                await self._call(self.chain[index], Frame("open", self.session))
                index += 1
            except StageFailed as exc:
                index += await self._replan(index, exc)  # (opens the new stages; nothing to replay yet)

    async def close(self) -> None:
        for route in self.chain:
            with contextlib.suppress(StageFailed):
                await self._call(route, Frame("close", self.session))

    async def forward(self, ids: Sequence[int]) -> npt.NDArray[np.float32]:
        """Run the chain on `ids` (the prompt, or the last token) and return the last position's logits."""
        started = time.perf_counter()
        x: npt.NDArray[Any] = np.asarray([list(ids)], dtype=np.int64)
        index = 0
        while index < len(self.chain):
            route = self.chain[index]
            try:
                out = await self._call(route, Frame("step", self.session, self.steps, array=x))
            except StageFailed as exc:
                await self._replan(index, exc)
                continue  # the same boundary, now served by the new stage(s)
            self.inputs.setdefault(route.start, []).append(x)
            assert out.array is not None
            x = out.array
            index += 1
        self.steps += 1
        self.forward_s += time.perf_counter() - started
        return x.reshape(-1).astype(np.float32, copy=False)

    async def _call(self, route: StageRoute, frame: Frame, timings: dict[str, StageTiming] | None = None) -> Frame:
        link = await self.pool.link(route)
        reply, ex = await link.exchange(
            frame, self.wire_dtype if frame.array is not None and route.start > 0 else None, self.step_timeout_s
        )
        if frame.kind in ("step", "replay"):
            into = self.timings if timings is None else timings
            into.setdefault(route.node_id, StageTiming(route.node_id, route.start, route.end)).add(ex)
        return reply

    async def _replan(self, index: int, exc: StageFailed) -> int:
        """Replace chain[index] by other live stage nodes covering the same layers, open the session on them
        and rebuild their caches; returns how many stages replaced it. A replacement that fails while it is
        rebuilt failed as a stage too: the span is planned again without it, until it is rebuilt or no chain
        is left (NoChain). Each failed node is one Replan."""
        started = time.perf_counter()
        dead = self.chain[index]
        lost = [dead.node_id]
        self.failed.add(exc.node_id)
        while True:
            self.failed.update(lost)
            avoid = frozenset({*self.failed, *(r.node_id for r in self.chain)})
            sub = plan_chain(self.routes(), dead.n_layers, start=dead.start, end=dead.end, avoid=avoid)
            try:
                inputs, timings = await self._rebuild(dead.start, sub)
                break
            except StageFailed as again:
                lost.append(again.node_id)
        for boundary, seen in inputs.items():  # boundaries inside the old span: for a later re-plan
            self.inputs.setdefault(boundary, []).extend(seen)
        for node, timing in timings.items():
            self.timings.setdefault(node, StageTiming(node, timing.start, timing.end)).merge(timing)
        self.chain[index : index + 1] = sub
        replayed, seconds = len(self.inputs.get(dead.start, [])), time.perf_counter() - started
        self.replans.extend(Replan(self.steps, node, [r.node_id for r in sub], replayed, seconds) for node in lost)
        return len(sub)

    async def _rebuild(
        self, start: int, sub: list[StageRoute]
    ) -> tuple[dict[int, list[npt.NDArray[Any]]], dict[str, StageTiming]]:
        """Open the session on `sub` and replay every input that crossed `start` through it (same inputs, same
        shapes, same order: the same cache, bit for bit). Returns the inputs that crossed the boundaries inside
        the span and the stages' timings, for the caller to keep once the whole rebuild has succeeded."""
        inputs: dict[int, list[npt.NDArray[Any]]] = {}
        timings: dict[str, StageTiming] = {}
        for route in sub:
            await self._call(route, Frame("open", self.session))
        for past in self.inputs.get(start, []):
            x = past
            for i, route in enumerate(sub):
                last = i == len(sub) - 1
                if i > 0:
                    inputs.setdefault(route.start, []).append(x)
                out = await self._call(route, Frame("replay" if last else "step", self.session, 0, array=x), timings)
                if not last:
                    assert out.array is not None
                    x = out.array
        return inputs, timings


async def generate_tokens(
    session: PipelineSession,
    prompt: list[int],
    params: SamplingParams,
    *,
    eos_ids: frozenset[int],
    logit_mask: Any = None,
    codec: Any = None,
) -> AsyncIterator[tuple[int, npt.NDArray[np.float32]]]:
    """Greedy or seeded generation over the chain, under the request's TokenRule (the engines' own): yields
    (token, the logits it was picked from). `logit_mask`: an additive torch tensor over the vocabulary, or None."""
    import torch

    from gridserve.engines.sampling import TokenRule, fresh_seed, pick_token

    seed = params.seed if params.seed is not None else fresh_seed()
    rule = TokenRule(params, eos_ids, logit_mask, prompt, codec)
    ids = prompt
    for step in itertools.count():
        logits = await session.forward(ids)
        token = pick_token(rule.scores(torch.from_numpy(np.array(logits)), step), params, seed, step)
        rule.note(token)
        yield token, logits
        if rule.ends(token) or step + 1 >= params.max_tokens:
            return
        ids = [token]


@dataclass(frozen=True)
class ModelHead:
    """What the gateway needs of a model to drive its pipeline: the tokenizer and the token mask."""

    codec: "TextCodec"
    logit_mask: Any = None
    """An additive torch tensor over the vocabulary (-inf for ids never emitted), or None."""


def load_head(model: str) -> ModelHead:
    """The tokenizer of a model the grid can pipeline (the weights stay on the stage nodes)."""
    from gridserve.catalog.models import TINY_MODEL

    if model == TINY_MODEL:
        from gridserve.engines.tiny import build_tiny_model

        loaded = build_tiny_model()
        return ModelHead(loaded.codec, loaded.logit_mask)
    from gridserve.engines.gemma import GEMMA_MODEL, gemma_codec

    if model == GEMMA_MODEL:
        return ModelHead(gemma_codec())
    raise NoChain(f"the gateway has no tokenizer for {model!r}")
