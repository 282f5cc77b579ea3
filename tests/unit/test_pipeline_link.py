"""The stage link's failure boundary (gateway/pipeline/session.py) over a scripted fake node transport: its stage
links are the HTTP transport's channel on a fake WebSocket (what aiohttp raises goes through the channel's own
translation, as it does in the gateway), no sockets.

Whatever a dead or dying stage connection raises, and wherever it raises it (connecting, the hello, sending a
step, waiting for its answer, or a replacement failing while it is rebuilt), the session re-plans the stage onto
a spare and the logits stay those of a run without the failure. A cancelled exchange leaves no answer behind for
the next session to take as its own.
"""

import asyncio
import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import aiohttp
import numpy as np
import numpy.typing as npt
import pytest
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from gridserve.gateway.pipeline.session import LinkPool, PipelineSession, StageFailed
from gridserve.gateway.transport import BrokenStream, NodeTransport, Timeout, Unreachable
from gridserve.gateway.transport.errors import map_errors
from gridserve.gateway.transport.http import HttpStageChannel
from gridserve.planner.chain import NoChain, StageRoute
from gridserve.trust import Identity
from gridserve.trust.frames import Frame, FrameReader, encode

GATEWAY = Identity.generate()
HIDDEN = 4
N_LAYERS = 2
PROMPT = [1, 2, 3]
STEPS = 6
KILL_AT = 3
"""The victim's exchange (counted from its session's open) at which it fails: mid-generation."""


def _handshake_error() -> aiohttp.WSServerHandshakeError:
    url = URL("ws://127.0.0.1:1/internal/stage")
    info = aiohttp.RequestInfo(url, "GET", CIMultiDictProxy(CIMultiDict()), url)
    return aiohttp.WSServerHandshakeError(info, (), status=503, message="node restarting")


ERRORS: dict[str, Callable[[], BaseException]] = {
    "ClientConnectionResetError": lambda: aiohttp.ClientConnectionResetError("Cannot write to closing transport"),
    "ConnectionResetError": lambda: ConnectionResetError(104, "Connection reset by peer"),
    "BrokenPipeError": lambda: BrokenPipeError(32, "Broken pipe"),
    "ConnectionRefusedError": lambda: ConnectionRefusedError(111, "Connection refused"),
    "ServerDisconnectedError": lambda: aiohttp.ServerDisconnectedError(),
    "ClientOSError": lambda: aiohttp.ClientOSError(104, "Connection reset by peer"),
    "WSServerHandshakeError": _handshake_error,
    "TimeoutError": lambda: TimeoutError(),
    "RuntimeError": lambda: RuntimeError("Session is closed"),
    # what a stage link inside an outbound-only node's tunnel raises (transport/tunnel.py)
    "BrokenStream": lambda: BrokenStream("tunnel of the node closed: the connection ended", cause="tunnel closed"),
    "Unreachable": lambda: Unreachable("the tunnel of the node is closed", cause="tunnel closed"),
    "Timeout": lambda: Timeout("the stage link did not open in 10.0 s", cause="TimeoutError"),
}
CLOSED_KINDS = [aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR]
POINTS = ["connect", "hello", "send", "receive"]


# -- a fake stage node: a layer range of a tiny history-dependent model -------------------------------------
@dataclass
class FakeNode:
    """Layers [start, end) of a model whose output depends on every input of the session so far (as a KV
    cache does): a stage rebuilt without replaying the history gives other logits."""

    start: int
    end: int
    identity: Identity = field(default_factory=Identity.generate)
    caches: dict[str, list[npt.NDArray[np.float32]]] = field(default_factory=dict)
    fault: "Fault | None" = None
    signer: Identity | None = None
    """Who signs its answers (None: its own key; another key: a forged answer)."""
    connects: int = 0
    exchanges: int = 0
    """Frames answered since the last `open` (a fault fires at a given count)."""

    @property
    def route(self) -> StageRoute:
        endpoint = f"http://node-{self.identity.node_id[:8]}:1"
        return StageRoute(self.identity.node_id, endpoint, self.identity.public_key, self.start, self.end, N_LAYERS)

    def answer(self, frame: Frame) -> Frame:
        if frame.kind == "hello":
            return Frame("hello", meta={"start": self.start, "end": self.end, "n_layers": N_LAYERS})
        if frame.kind == "open":
            self.caches[frame.session] = [np.zeros(HIDDEN, np.float32) for _ in range(self.start, self.end)]
            return Frame("ack", frame.session, frame.step)
        if frame.kind == "close":
            self.caches.pop(frame.session, None)
            return Frame("ack", frame.session, frame.step)
        assert frame.array is not None
        out = self.run(frame.session, frame.array)
        if frame.kind == "replay":
            return Frame("ack", frame.session, frame.step)
        return Frame("out", frame.session, frame.step, {"compute_s": 0.001}, out)

    def run(self, session: str, x: npt.NDArray[Any]) -> npt.NDArray[np.float32]:
        h = (x[..., None] * np.arange(1, HIDDEN + 1)).astype(np.float32) if self.start == 0 else x.copy()
        for layer, acc in zip(range(self.start, self.end), self.caches[session], strict=True):
            for pos in range(h.shape[1]):
                acc += h[0, pos]
                h[0, pos] = 0.5 * h[0, pos] + 0.25 * acc + layer
        return h[:, -1:, :].reshape(1, HIDDEN) if self.end == N_LAYERS else h


@dataclass
class Fault:
    """`error` at `point` once the node has answered `after` frames of the session."""

    point: str
    error: Callable[[], BaseException] | aiohttp.WSMsgType
    after: int = KILL_AT

    def raised(self) -> BaseException:
        assert not isinstance(self.error, aiohttp.WSMsgType)
        return self.error()


class FakeWS:
    """What the HTTP stage channel uses of aiohttp's ClientWebSocketResponse, over a FakeNode."""

    def __init__(self, node: FakeNode) -> None:
        self.node = node
        self.reader = FrameReader(me=node.identity.public_key, sender=GATEWAY.public_key)
        self.inbox: asyncio.Queue[aiohttp.WSMessage | BaseException] = asyncio.Queue()
        self.closed = False
        self.seq = 0
        self.hello_done = False
        self.ended_by_node = False

    def end(self) -> None:
        """The node closes this connection (a restart, a keep-alive timeout): a close frame, then nothing."""
        self.inbox.put_nowait(aiohttp.WSMessage(aiohttp.WSMsgType.CLOSE, 1001, "going away"))
        self.ended_by_node = True

    def _due(self, point: str) -> Fault | None:
        fault = self.node.fault
        if fault is None or fault.point != point:
            return None
        if point == "hello" and not self.hello_done:
            return fault
        return fault if point in ("send", "receive") and self.node.exchanges >= fault.after else None

    async def send_bytes(self, data: bytes) -> None:
        if self.ended_by_node:
            raise aiohttp.ClientConnectionResetError("Cannot write to closing transport")
        frame, _ = self.reader.decode(data)
        if frame.kind == "open":
            self.node.exchanges = 0
        hello = frame.kind == "hello"
        fault = self._due("hello" if hello else "send")
        if fault is not None:
            self._fail(fault, on_send=True)
            return
        self.hello_done = True
        fault = None if hello else self._due("receive")
        if fault is not None:
            self._fail(fault, on_send=False)
            return
        reply = self.node.answer(frame)
        self.node.exchanges += 1
        self.seq += 1
        out = encode(self.node.signer or self.node.identity, reply, to=GATEWAY.public_key, seq=self.seq)
        self.inbox.put_nowait(aiohttp.WSMessage(aiohttp.WSMsgType.BINARY, out, None))

    def _fail(self, fault: Fault, *, on_send: bool) -> None:
        """A closed kind: the frame went out and the connection ends instead of answering. An error: raised by
        the send, or by the receive that waits for the answer (a timeout there: no answer ever comes)."""
        if isinstance(fault.error, aiohttp.WSMsgType):
            self.inbox.put_nowait(aiohttp.WSMessage(fault.error, None, "fault"))
        elif on_send:
            raise fault.raised()
        elif not isinstance(fault.raised(), TimeoutError):
            self.inbox.put_nowait(fault.raised())

    async def receive(self) -> aiohttp.WSMessage:
        got = await self.inbox.get()
        if isinstance(got, BaseException):
            raise got
        return got

    async def close(self) -> bool:
        self.closed = True
        self.inbox.put_nowait(aiohttp.WSMessage(aiohttp.WSMsgType.CLOSED, None, None))
        return True


class FakeTransport:
    """What StageLink uses of the NodeTransport: stage_link, to the fake nodes by endpoint (a fault at connect is
    raised as aiohttp's ws_connect would raise it, through the HTTP transport's error boundary)."""

    def __init__(self, nodes: list[FakeNode]) -> None:
        self.nodes = {n.route.endpoint: n for n in nodes}
        self.connects = 0

    async def stage_link(self, node_id: str, endpoint: str, timeout_s: float) -> HttpStageChannel:
        self.connects += 1
        node = self.nodes[endpoint]
        assert node_id == node.identity.node_id
        node.connects += 1
        ws = FakeWS(node)
        fault = node.fault
        if fault is not None and fault.point == "connect" and node.exchanges >= fault.after:
            if isinstance(fault.error, aiohttp.WSMsgType):  # accepted, then ended before the hello's answer
                ws.inbox.put_nowait(aiohttp.WSMessage(fault.error, None, "fault"))
            else:
                with map_errors("open"):
                    raise fault.raised()
        return HttpStageChannel(cast(aiohttp.ClientWebSocketResponse, ws))


def fake_ws(link_channel: object) -> FakeWS:
    """The fake WebSocket under a link's channel."""
    assert isinstance(link_channel, HttpStageChannel)
    return cast(FakeWS, link_channel.ws)


# -- driving a session -----------------------------------------------------------------------------------
@dataclass
class Grid:
    first: FakeNode
    victim: FakeNode
    spares: list[FakeNode]
    transport: FakeTransport
    pool: LinkPool

    def session(self, timeout_s: float = 5.0) -> PipelineSession:
        routes = [n.route for n in (self.first, self.victim, *self.spares)]
        chain = [self.first.route, self.victim.route]
        return PipelineSession(self.pool, chain, lambda: routes, step_timeout_s=timeout_s)


def grid(spares: int = 1) -> Grid:
    first, victim = FakeNode(0, 1), FakeNode(1, 2)
    extra = [FakeNode(1, 2) for _ in range(spares)]
    transport = FakeTransport([first, victim, *extra])
    return Grid(first, victim, extra, transport, LinkPool(GATEWAY, cast(NodeTransport, transport)))


async def generate(session: PipelineSession, before_step: Callable[[int], None] = lambda _: None) -> list[bytes]:
    """Open, run the prompt and STEPS-1 tokens, close; the logits of every step, as bytes."""
    await session.open()
    out = []
    ids = PROMPT
    for step in range(STEPS):
        before_step(step)
        logits = await session.forward(ids)
        out.append(logits.tobytes())
        ids = [int(np.argmax(logits)) % HIDDEN + step]
    await session.close()
    return out


@functools.cache
def expected() -> list[bytes]:
    """The logits of the run without a failure."""
    return asyncio.run(generate(grid().session()))


def fault_for(point: str, error: str | aiohttp.WSMsgType) -> Fault:
    made = error if isinstance(error, aiohttp.WSMsgType) else ERRORS[error]
    return Fault(point, made)


def run_with_fault(fault: Fault, spares: int = 1, timeout_s: float = 5.0) -> tuple[Grid, PipelineSession, list[bytes]]:
    g = grid(spares)

    def inject(step: int) -> None:
        if step == 1:  # the victim has answered open and the prompt's step; it fails a few frames later
            g.victim.fault = fault
            if fault.point in ("connect", "hello"):  # it drops the connection; reconnecting fails
                fake_ws(g.pool.links[g.victim.route.node_id].ws).end()
                fault.after = 0

    async def go() -> tuple[PipelineSession, list[bytes]]:
        session = g.session(timeout_s)
        logits = await generate(session, inject)
        return session, logits

    session, logits = asyncio.run(go())
    return g, session, logits


def assert_replanned(g: Grid, session: PipelineSession, logits: list[bytes], point: str = "") -> None:
    assert logits == expected()  # the spare's cache was rebuilt: the same logits, bit for bit
    assert [r.failed for r in session.replans] == [g.victim.route.node_id]
    assert session.replans[0].replaced_by == [g.spares[0].route.node_id]
    assert session.replans[0].replayed_steps >= 1
    assert [r.node_id for r in session.chain] == [g.first.route.node_id, g.spares[0].route.node_id]
    if point in ("connect", "hello"):  # the link saw the node end its connection and failed to connect again
        assert g.victim.connects == 2


@pytest.mark.parametrize("point", POINTS)
@pytest.mark.parametrize("error", sorted(ERRORS))
def test_a_stage_link_error_anywhere_is_a_replan(point: str, error: str) -> None:
    fault = fault_for(point, error)
    if error == "TimeoutError" and point == "receive":
        g, session, logits = run_with_fault(fault, timeout_s=0.5)  # the answer never comes
    else:
        g, session, logits = run_with_fault(fault)
    assert_replanned(g, session, logits, point)


@pytest.mark.parametrize("point", POINTS)
@pytest.mark.parametrize("kind", CLOSED_KINDS, ids=lambda k: k.name)
def test_a_closed_connection_anywhere_is_a_replan(point: str, kind: aiohttp.WSMsgType) -> None:
    g, session, logits = run_with_fault(fault_for(point, kind))
    assert_replanned(g, session, logits, point)


def test_a_reply_that_fails_its_signature_is_a_replan() -> None:
    g = grid()

    def forge(step: int) -> None:
        if step == 2:  # from now on another key signs what arrives on the victim's link
            g.victim.signer = Identity.generate()

    session = g.session()
    logits = asyncio.run(generate(session, forge))
    assert_replanned(g, session, logits)


@pytest.mark.parametrize("error", ["ClientConnectionResetError", "ServerDisconnectedError", "TimeoutError"])
def test_a_replacement_that_fails_while_rebuilt_is_replanned_too(error: str) -> None:
    """The spare's own link fails during the re-plan (its open or its replay): the span goes to the next spare,
    and both failures are recorded."""
    g = grid(spares=2)
    g.spares[0].fault = Fault("send", ERRORS[error], after=2)  # it acks the open and one replay, fails the next

    async def go() -> tuple[PipelineSession, list[bytes]]:
        session = g.session()

        def kill(step: int) -> None:
            if step == 2:
                g.victim.fault = Fault("send", ERRORS["ClientConnectionResetError"], after=0)

        return session, await generate(session, kill)

    session, logits = asyncio.run(go())
    assert logits == expected()
    assert [r.failed for r in session.replans] == [g.victim.route.node_id, g.spares[0].route.node_id]
    assert all(r.replaced_by == [g.spares[1].route.node_id] for r in session.replans)
    assert g.spares[0].route.node_id not in session.timings  # it served no step: nothing to bill it for
    assert [r.node_id for r in session.chain] == [g.first.route.node_id, g.spares[1].route.node_id]


def test_no_spare_left_ends_the_session_with_no_chain() -> None:
    g = grid(spares=1)
    g.spares[0].fault = Fault("send", ERRORS["ConnectionResetError"], after=0)
    g.victim.fault = Fault("send", ERRORS["ClientConnectionResetError"], after=KILL_AT)
    with pytest.raises(NoChain):
        asyncio.run(generate(g.session()))


def test_a_cancelled_exchange_leaves_no_answer_for_the_next_session() -> None:
    """A request cancelled while a stage computes (the client went away): its answer still arrives, and the next
    session on the same link must not take it for its own (it would be one answer behind ever after)."""
    g = grid()

    async def go() -> list[bytes]:
        first = g.session()
        await first.open()
        await first.forward(PROMPT)
        ws = fake_ws(g.pool.links[g.victim.route.node_id].ws)
        real_put = ws.inbox.put_nowait
        parked: list[aiohttp.WSMessage | BaseException] = []
        answered = asyncio.Event()

        def park(msg: aiohttp.WSMessage | BaseException) -> None:
            parked.append(msg)
            answered.set()

        ws.inbox.put_nowait = park  # type: ignore[method-assign]
        task = asyncio.create_task(first.forward([2]))
        await answered.wait()  # the victim has computed the step; its answer is on its way
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        ws.inbox.put_nowait = real_put  # type: ignore[method-assign]
        for msg in parked:  # and arrives after all
            real_put(msg)
        return await generate(g.session())

    assert asyncio.run(go()) == expected()


def test_a_stage_failed_exchange_closes_the_link_and_the_next_one_reconnects() -> None:
    g = grid()

    async def go() -> None:
        link = await g.pool.link(g.victim.route)
        await link.exchange(Frame("open", "s"), None, 1.0)
        g.victim.fault = Fault("send", ERRORS["ClientConnectionResetError"], after=0)
        with pytest.raises(StageFailed, match="ClientConnectionResetError: Cannot write to closing transport"):
            await link.exchange(Frame("close", "s"), None, 1.0)
        assert not link.open
        g.victim.fault = None
        reply, _ = await link.exchange(Frame("open", "s"), None, 1.0)
        assert reply.kind == "ack" and link.open and g.transport.connects == 2

    asyncio.run(go())
