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
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import aiohttp
import numpy as np
import numpy.typing as npt

from gridserve.planner.chain import NoChain, StageRoute, plan_chain
from gridserve.trust import TrustError
from gridserve.trust.frames import Frame, FrameReader, encode
from gridserve.trust.identity import Identity
from gridserve.types import SamplingParams

if TYPE_CHECKING:  # torch is imported on first use: the gateway starts without it
    from gridserve.engines.torch_engine import TextCodec

MAX_FRAME = 64 * 1024 * 1024


class StageFailed(Exception):
    """A stage node could not run a step (connection lost, refused, or an engine error)."""

    def __init__(self, node_id: str, detail: str) -> None:
        super().__init__(f"stage {node_id[:12]}: {detail}")
        self.node_id = node_id


@dataclass
class Exchange:
    sent_bytes: int
    received_bytes: int
    round_trip_s: float
    compute_s: float


class StageLink:
    """One long-lived, signed WebSocket to a stage node; one exchange at a time."""

    def __init__(self, identity: Identity, route: StageRoute, http: aiohttp.ClientSession) -> None:
        self.identity, self.route, self.http = identity, route, http
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.reader = FrameReader(me=identity.public_key, sender=route.public_key)
        self.seq = 0
        self.lock = asyncio.Lock()

    @property
    def open(self) -> bool:
        return self.ws is not None and not self.ws.closed

    async def connect(self, timeout_s: float = 10.0) -> None:
        url = self.route.endpoint.replace("http://", "ws://", 1).replace("https://", "wss://", 1) + "/internal/stage"
        try:
            self.ws = await self.http.ws_connect(
                url,
                max_msg_size=MAX_FRAME,
                timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=timeout_s),
                heartbeat=None,
            )
            self.reader = FrameReader(me=self.identity.public_key, sender=self.route.public_key)
            hello, _, _ = await self._send_recv(Frame("hello"), None, timeout_s)
        except (aiohttp.ClientError, OSError, TimeoutError, TrustError) as exc:
            raise StageFailed(self.route.node_id, f"cannot connect ({type(exc).__name__}: {exc})") from exc
        if (hello.meta.get("start"), hello.meta.get("end")) != (self.route.start, self.route.end):
            raise StageFailed(
                self.route.node_id, f"runs layers {hello.meta}, not [{self.route.start}, {self.route.end})"
            )

    async def exchange(self, frame: Frame, wire_dtype: str | None, timeout_s: float) -> tuple[Frame, Exchange]:
        async with self.lock:
            if not self.open:
                await self.connect()
            started = time.perf_counter()
            try:
                reply, sent, received = await self._send_recv(frame, wire_dtype, timeout_s)
            except (aiohttp.ClientError, OSError, TimeoutError, TrustError, ConnectionError) as exc:
                await self.aclose()
                raise StageFailed(self.route.node_id, f"{type(exc).__name__}: {exc}") from exc
            elapsed = time.perf_counter() - started
        if reply.kind == "error":
            raise StageFailed(self.route.node_id, f"{reply.meta.get('type')}: {reply.meta.get('message')}")
        compute = float(reply.meta.get("compute_s", 0.0))
        return reply, Exchange(sent, received, elapsed, compute)

    async def _send_recv(self, frame: Frame, wire_dtype: str | None, timeout_s: float) -> tuple[Frame, int, int]:
        assert self.ws is not None
        self.seq += 1
        data = encode(self.identity, frame, to=self.route.public_key, seq=self.seq, wire_dtype=wire_dtype)
        await self.ws.send_bytes(data)
        msg = await asyncio.wait_for(self.ws.receive(), timeout_s)
        if msg.type != aiohttp.WSMsgType.BINARY:
            raise ConnectionError(f"stage connection closed ({msg.type.name}: {msg.extra or ''})")
        reply, _ = self.reader.decode(msg.data)
        return reply, len(data), len(msg.data)

    async def aclose(self) -> None:
        if self.ws is not None:
            await self.ws.close()
        self.ws = None


class LinkPool:
    """The gateway's long-lived links, one per stage node, opened on first use and reused by every session."""

    def __init__(self, identity: Identity, http: aiohttp.ClientSession) -> None:
        self.identity, self.http = identity, http
        self.links: dict[str, StageLink] = {}

    async def link(self, route: StageRoute) -> StageLink:
        """The node's link; a new one only if the node now has another address, key or layer range (a route's
        cost changes with every RTT probe: that keeps the connection)."""
        found = self.links.get(route.node_id)
        if found is not None and _same_node(found.route, route):
            return found
        if found is not None:
            await found.aclose()
        found = StageLink(self.identity, route, self.http)
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

    async def _call(self, route: StageRoute, frame: Frame) -> Frame:
        link = await self.pool.link(route)
        reply, ex = await link.exchange(
            frame, self.wire_dtype if frame.array is not None and route.start > 0 else None, self.step_timeout_s
        )
        if frame.kind in ("step", "replay"):
            timing = self.timings.setdefault(route.node_id, StageTiming(route.node_id, route.start, route.end))
            timing.add(ex)
        return reply

    async def _replan(self, index: int, exc: StageFailed) -> int:
        """Replace chain[index] by other live stage nodes covering the same layers, open the session on them
        and rebuild their caches; returns how many stages replaced it."""
        started = time.perf_counter()
        dead = self.chain[index]
        avoid = frozenset({exc.node_id, *(r.node_id for r in self.chain)})
        sub = plan_chain(self.routes(), dead.n_layers, start=dead.start, end=dead.end, avoid=avoid)
        for route in sub:
            await self._call(route, Frame("open", self.session))
        history = self.inputs.get(dead.start, [])
        for past in history:  # same inputs, same shapes, same order: the same cache, bit for bit
            x = past
            for i, route in enumerate(sub):
                last = i == len(sub) - 1
                if i > 0:  # a boundary inside the old span: record its inputs for a later re-plan
                    self.inputs.setdefault(route.start, []).append(x)
                out = await self._call(route, Frame("replay" if last else "step", self.session, 0, array=x))
                if not last:
                    assert out.array is not None
                    x = out.array
        self.chain[index : index + 1] = sub
        self.replans.append(
            Replan(self.steps, dead.node_id, [r.node_id for r in sub], len(history), time.perf_counter() - started)
        )
        return len(sub)


async def generate_tokens(
    session: PipelineSession,
    prompt: list[int],
    params: SamplingParams,
    *,
    eos_ids: frozenset[int],
    logit_mask: Any = None,
) -> AsyncIterator[tuple[int, npt.NDArray[np.float32]]]:
    """Greedy or seeded generation over the chain: yields (token, the logits it was picked from).
    `logit_mask`: an additive torch tensor over the vocabulary, or None."""
    import torch

    from gridserve.engines.sampling import fresh_seed, pick_token

    seed = params.seed if params.seed is not None else fresh_seed()
    ids = prompt
    for step in itertools.count():
        logits = await session.forward(ids)
        scores = torch.from_numpy(np.array(logits))
        if logit_mask is not None:
            scores = scores + logit_mask
        token = pick_token(scores, params, seed, step)
        yield token, logits
        if token in eos_ids or step + 1 >= params.max_tokens:
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
    from gridserve.engines.gemma import GEMMA_MODEL, HFCodec, ensure_cache

    if model == GEMMA_MODEL:
        from transformers import AutoTokenizer

        return ModelHead(HFCodec(AutoTokenizer.from_pretrained(str(ensure_cache()))))
    raise NoChain(f"the gateway has no tokenizer for {model!r}")
