"""The stage node's end of a pipeline: `WS /internal/stage`, one long-lived connection from the gateway.

Every message both ways is a signed binary frame (trust/frames.py). The gateway says `hello` first (signed
by the gateway key this node registered with); then `open` a session, `step` it (inputs in, outputs back),
`replay` recorded inputs into a fresh cache (a re-planned stage), and `close` it. Replies: `out` (the
stage's output tensor), `ack`, or `error`; each carries the stage's own compute time, which the gateway's
per-stage timings (and the doctor) read.
"""

import logging
from typing import TYPE_CHECKING

from fastapi import FastAPI, WebSocket, WebSocketDisconnect

from gridserve.engines.base import EngineError, InvalidRequest
from gridserve.node.agent import NodeAgent
from gridserve.trust import TrustError
from gridserve.trust.frames import Frame, FrameReader, encode

if TYPE_CHECKING:  # torch: imported only where a stage engine was made
    from gridserve.engines.stage_engine import StageEngine

log = logging.getLogger("gridserve.node")


class _Conn:
    def __init__(self, ws: WebSocket, agent: NodeAgent, gateway_key: str) -> None:
        self.ws, self.agent, self.gateway_key = ws, agent, gateway_key
        self.reader = FrameReader(me=agent.identity.public_key, sender=gateway_key)
        self.seq = 0

    async def send(self, frame: Frame) -> None:
        self.seq += 1
        await self.ws.send_bytes(encode(self.agent.identity, frame, to=self.gateway_key, seq=self.seq))


def add_stage_routes(app: FastAPI, agent: NodeAgent, engine: "StageEngine") -> None:
    @app.websocket("/internal/stage")
    async def stage(ws: WebSocket) -> None:
        await ws.accept()
        if agent.gateway_key is None:
            await ws.close(code=1013, reason="this node has not registered with a gateway yet")
            return
        conn = _Conn(ws, agent, agent.gateway_key)
        try:
            hello, _ = conn.reader.decode(await ws.receive_bytes())
            if hello.kind != "hello":
                raise TrustError("the first frame must be a hello")
        except TrustError as exc:
            log.warning("refused stage connection: %s (%s)", exc.kind, exc.detail)
            engine.stats.note_error(f"refused stage connection: {exc.kind}")
            await ws.close(code=1008, reason=exc.kind)
            return
        span = engine.span
        await conn.send(Frame("hello", meta={"start": span.start, "end": span.end, "n_layers": span.n_layers}))
        try:
            while True:
                data = await ws.receive_bytes()
                await _serve(conn, engine, data)
        except WebSocketDisconnect:
            pass
        except TrustError as exc:
            log.warning("stage connection closed: %s (%s)", exc.kind, exc.detail)
            engine.stats.note_error(f"refused stage frame: {exc.kind}")
            await ws.close(code=1008, reason=exc.kind)


async def _serve(conn: _Conn, engine: "StageEngine", data: bytes) -> None:
    frame, _ = conn.reader.decode(data)  # TrustError ends the connection
    try:
        if frame.kind == "open":
            engine.open(frame.session)
            await conn.send(Frame("ack", frame.session, frame.step))
        elif frame.kind == "close":
            engine.close(frame.session)
            await conn.send(Frame("ack", frame.session, frame.step))
        elif frame.kind in ("step", "replay"):
            if frame.array is None:
                raise InvalidRequest("a step carries a tensor")
            result = await engine.step(frame.session, frame.array, replay=frame.kind == "replay")
            meta = {"compute_s": round(result.compute_s, 6)}
            if result.array is None:
                await conn.send(Frame("ack", frame.session, frame.step, meta))
            else:
                await conn.send(Frame("out", frame.session, frame.step, meta, result.array))
        else:
            raise InvalidRequest(f"unknown frame kind {frame.kind!r}")
    except EngineError as exc:
        kind = "invalid_request" if isinstance(exc, InvalidRequest) else "engine_error"
        await conn.send(Frame("error", frame.session, frame.step, {"type": kind, "message": str(exc)}))
