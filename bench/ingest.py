"""Heartbeat ingestion at grid scale: a real gateway (embedded SQLite store) takes signed heartbeats from many
simulated nodes, each heartbeating every `--interval` seconds (phases spread evenly), over HTTP on 127.0.0.1.

The simulated nodes are Ed25519 identities in this process: each registers once (signed capability), then
sends signed heartbeats with fresh telemetry and a rising sequence number. Their `/health` (the gateway probes
nodes) is answered by one small server here. Nodes join at `--join-rate` a second and heartbeat from the moment
they have registered; once all have, one interval of warm-up, then the heartbeats due in the next `--duration`
seconds are measured:
- heartbeats_per_s: heartbeats the gateway acknowledged per second;
- ingest_p50_ms / ingest_p99_ms: request to acknowledgement, as the node sees it;
- gateway_cpu_cores: the gateway process's CPU time over the wall time (1.0 = one core busy);
- loadgen_cpu_cores: the same for this process (signing, HTTP, answering the gateway's /health probes): it
  shares the machine with the gateway, so it speaks HTTP/1.1 through bare asyncio protocols on uvloop;
- lag_p99_ms: how late this load generator sent heartbeats against their schedule (if it cannot keep up, the
  offered rate is lower than nominal: reported, not hidden);
- loadgen_gc_max_pause_ms: the longest garbage collection in this process during the window. The generator holds
  10,000 identities and node tasks: with Python's default thresholds its own full collections (~100 ms) landed in
  the measured latencies, so it collects as the gateway does (gateway/main.py GC_THRESHOLDS) and freezes what it
  built before the window.

Prints JSON: {"runs": [{"nodes", "heartbeats_per_s", "ingest_p99_ms", "gateway_cpu_cores", ...}]}.
With `--transport outbound`, every simulated node holds a tunnel (an outbound-only node's WebSocket) instead:
heartbeats and the gateway's probes go over it; gateway_rss_per_node_kb (the gateway's resident memory grown per
node joined) compared with the http run's is the memory a connection costs.
Run: `.venv/bin/python bench/ingest.py [--nodes 1000,10000] [--duration 30] [--join-rate 50]
[--transport http,outbound]`.
"""

import argparse
import asyncio
import collections
import gc
import json
import math
import statistics
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import orjson
import psutil
import uvloop
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console
from rich.progress import Progress

from gridserve.cli.grid import LocalGrid, free_port_block
from gridserve.gateway.main import GC_THRESHOLDS
from gridserve.trust import EnvelopeVerifier, FreshnessPolicy, Identity, sign_envelope
from gridserve.trust.challenge import answer as challenge_answer
from gridserve.tunnel import handshake
from gridserve.tunnel.channel import Opener, Sealer
from gridserve.tunnel.wire import CONTROL, Frame, Kind, decode, encode, endpoint_for, split_request
from gridserve.tunnel.wire import PATH as TUNNEL_PATH
from lean_ws import LeanWebSocket
from lean_ws import connect as lean_connect  # (bench/: python puts the script's directory on the path)
from stats import percentile

CARDS = ("rtx4090", "rtx3090", "a10g", "l40s", "a100-80g", "t4")


def gc_pauses(port: int) -> dict[str, float]:
    """The gateway's garbage-collector pauses so far (its /metrics): per generation, count and seconds, and the
    cumulative count per bucket bound (le) of generation 2."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name != "gridserve_gc_pause_seconds":
            continue
        for sample in family.samples:
            generation = sample.labels.get("generation", "")
            if sample.name.endswith("_count") or sample.name.endswith("_sum"):
                out[f"gen{generation}{sample.name.rsplit('_', 1)[1]}"] = sample.value
            elif sample.name.endswith("_bucket") and generation == "2":
                out[f"gen2_le_{sample.labels['le']}"] = sample.value
    return out


def gc_report(before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
    """Collections and pause seconds in the window per generation; the largest generation-2 pause's bucket."""
    delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    report: dict[str, Any] = {}
    for gen in "012":
        report[f"gc_gen{gen}_collections"] = int(delta.get(f"gen{gen}count", 0))
        report[f"gc_gen{gen}_pause_s"] = round(delta.get(f"gen{gen}sum", 0.0), 4)
    bounds = sorted((float(k[len("gen2_le_") :]), v) for k, v in delta.items() if k.startswith("gen2_le_"))
    total = delta.get("gen2count", 0.0)
    report["gc_gen2_max_pause_le_s"] = next((le for le, n in bounds if n >= total), None) if total else None
    return report


def capability(ident: Identity, i: int, health_port: int, outbound: bool = False) -> dict[str, Any]:
    card = CARDS[i % len(CARDS)]
    return {
        "node_id": ident.node_id,
        "public_key": ident.public_key,
        "endpoint": endpoint_for(ident.node_id) if outbound else f"http://127.0.0.1:{health_port}/n{i}",
        "engine": f"emulated:{card}",
        "models": [
            {
                "name": "llama-3-8b",
                "dtype": "float16",
                "quantization": "none",
                "max_context": 8192,
                "weights_digest": "emulated:llama-3-8b",
            }
        ],
        "hardware": {"accelerator": card, "emulated": True},
        "runtime": {"gridserve": "bench", "python": "bench", "engine": f"emulated:{card}"},
    }


def telemetry(i: int, k: int) -> dict[str, Any]:
    return {
        "utilization": ((i + k) % 10) / 10,
        "memory_used_bytes": 8 * 2**30,
        "memory_total_bytes": 24 * 2**30,
        "active_requests": (i + k) % 4,
        "tokens_per_s": 40.0 + (i % 7),
    }


class _Health(asyncio.Protocol):
    """Answers each request (the gateway's `GET /n{i}/health?challenge=C` probes, no bodies) as node i: 200 with
    its node id and its signature of the challenge (trust/challenge.py), as a real node does."""

    def __init__(self, identities: list[Identity]) -> None:
        self.identities = identities
        self.transport: asyncio.Transport | None = None
        self.buffer = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not asyncio.Transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        *requests, self.buffer = self.buffer.split(b"\r\n\r\n")
        if requests and self.transport is not None:
            self.transport.write(b"".join(self._answer(r) for r in requests))

    def _answer(self, request: bytes) -> bytes:
        target = request.split(b" ", 2)[1].decode() if request.count(b" ") >= 2 else ""
        path, _, query = target.partition("?")
        index = int(path.split("/")[1][1:]) if path.startswith("/n") else -1
        challenge = query.removeprefix("challenge=")
        identity = self.identities[index] if 0 <= index < len(self.identities) else None
        body = orjson.dumps(
            {
                "status": "ok",
                "node_id": identity.node_id if identity else "",
                "challenge_signature": challenge_answer(identity, challenge) if identity and challenge else "",
            }
        )
        head = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(body)
        return head + body


async def health_server(port: int, identities: list[Identity]) -> asyncio.Server:
    """All simulated nodes' /health on one port: a bare protocol, so answering the gateway's probes costs this
    process (which also generates the load) one signature a probe (the gateway probes at most 256 nodes a round,
    every 0.5 s)."""
    loop = asyncio.get_running_loop()
    return await loop.create_server(lambda: _Health(identities), "127.0.0.1", port, backlog=4096)


class _Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection to the gateway, one request at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.waiter: asyncio.Future[tuple[int, bytes]] | None = None
        self.closed = False
        self.used = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not asyncio.Transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError("gateway closed the connection"))

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        head = self.buffer[:end].lower() + b"\r\n"
        at = head.find(b"\r\ncontent-length:")
        length = int(head[at + 17 : head.find(b"\r\n", at + 2)]) if at >= 0 else 0
        if len(self.buffer) < end + 4 + length:
            return
        status, body = int(head[9:12]), self.buffer[end + 4 : end + 4 + length]
        self.buffer = self.buffer[end + 4 + length :]
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result((status, body))

    async def post(self, request: bytes) -> tuple[int, bytes]:
        assert self.transport is not None
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(request)
        return await self.waiter


class LeanClient:
    """POSTs over up to `limit` keep-alive connections with a bare protocol: the load generator shares the
    machine with the gateway, and aiohttp's client costs several times the CPU per request (at 10,000 nodes
    this process could not keep the schedule: the measurement was of the generator, not the gateway)."""

    def __init__(self, port: int, limit: int) -> None:
        self.port = port
        self.limit = limit
        self.idle: list[_Connection] = []
        self.opened = 0
        self.waiters: collections.deque[asyncio.Future[_Connection | None]] = collections.deque()

    async def _take(self) -> _Connection:
        while self.idle:
            conn = self.idle.pop()
            if not conn.closed:
                return conn
            self.opened -= 1
        if self.opened >= self.limit:
            waiter: asyncio.Future[_Connection | None] = asyncio.get_running_loop().create_future()
            self.waiters.append(waiter)
            handed = await waiter  # a live connection, or None: a slot to open one in
            if handed is not None:
                return handed
        else:
            self.opened += 1
        try:
            transport, conn = await asyncio.get_running_loop().create_connection(_Connection, "127.0.0.1", self.port)
        except OSError:
            self._give(None)
            raise
        conn.transport = cast(asyncio.Transport, transport)  # uvloop calls connection_made later
        return conn

    def _give(self, conn: _Connection | None) -> None:
        if conn is not None and conn.closed:
            conn = None
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return
        if conn is None:
            self.opened -= 1
        else:
            self.idle.append(conn)

    async def post(self, path: str, body: bytes, timeout_s: float = 30.0) -> tuple[int, bytes]:
        request = (
            f"POST {path} HTTP/1.1\r\nhost: 127.0.0.1:{self.port}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\n\r\n"
        ).encode() + body
        for attempt in (1, 2):
            conn = await self._take()
            reused = conn.used
            conn.used = True
            try:
                async with asyncio.timeout(timeout_s):
                    return await conn.post(request)
            except ConnectionError:
                if reused and attempt == 1:  # the gateway closed it as idle (keep-alive timeout) as we sent: again
                    continue
                raise
            except BaseException:
                if conn.transport is not None:
                    conn.transport.close()
                conn.closed = True
                raise
            finally:
                self._give(conn)
        raise AssertionError("unreachable")


def signed_beat(identity: Identity, payload: dict[str, Any]) -> bytes:
    return sign_envelope(identity, payload, purpose="heartbeat", now=time.time())


class Tunnel:
    """A simulated outbound-only node's tunnel (tunnel/wire.py): the signed handshake (the welcome checked, every
    later frame tagged and checked, as a node does: that cost is this process's, not the gateway's), heartbeats as
    frames answered in order, and the gateway's /health probes answered inside it as a node's app would."""

    def __init__(self, identity: Identity) -> None:
        self.identity = identity
        self.ws: LeanWebSocket | None = None
        self.greeting: asyncio.Queue[Frame] = asyncio.Queue()
        self.replies: collections.deque[asyncio.Future[tuple[int, bytes]]] = collections.deque()
        self.verifier = EnvelopeVerifier(FreshnessPolicy(), time.time)
        self.sealer: Sealer | None = None
        self.opener: Opener | None = None
        self.channel_beats = False

    async def open(self, port: int) -> None:
        self.ws = await lean_connect(port, TUNNEL_PATH, self._on_message)
        challenge = orjson.loads((await self.greeting.get()).payload)["challenge"]
        greeting = handshake.hello(self.identity, challenge)
        self.ws.send(encode(Kind.HELLO, CONTROL, greeting.body))
        welcome = await self.greeting.get()
        if welcome.kind != Kind.WELCOME:
            raise RuntimeError(f"tunnel refused: {welcome.payload[:200]!r}")
        welcomed = handshake.check_welcome(
            self.verifier, welcome.payload, greeting, node_id=self.identity.node_id, gateway_key=None
        )
        self.sealer, self.opener = welcomed.sealer, welcomed.opener
        self.channel_beats = welcomed.channel_beats

    def beat(self, payload: dict[str, Any]) -> tuple[Kind, bytes]:
        """What a node sends: the bare payload in a BEAT where the gateway takes them, else the signed one."""
        if self.channel_beats:
            return Kind.BEAT, orjson.dumps(payload)
        return Kind.HEARTBEAT, signed_beat(self.identity, payload)

    async def heartbeat(self, beat: tuple[Kind, bytes]) -> tuple[int, bytes]:
        if self.ws is None or self.ws.closed.is_set() or self.sealer is None:
            raise ConnectionError("tunnel closed")
        reply = asyncio.get_running_loop().create_future()
        self.replies.append(reply)
        self.ws.send(self.sealer.seal(beat[0], CONTROL, beat[1]))
        return await reply

    def _on_message(self, data: bytes) -> None:
        if self.opener is None:  # the greeting: not tagged
            self.greeting.put_nowait(decode(data))
            return
        frame = self.opener.open(data)
        if frame.kind == Kind.HEARTBEAT_REPLY:
            answer = orjson.loads(frame.payload)
            self.replies.popleft().set_result((int(answer["status"]), str(answer.get("body", "")).encode()))
        elif frame.kind == Kind.REQUEST:
            self._probe(frame)

    def _probe(self, frame: Frame) -> None:
        assert self.ws is not None
        meta, _ = split_request(frame.payload)
        challenge = str(meta["path"]).partition("challenge=")[2]
        body = orjson.dumps(
            {
                "status": "ok",
                "node_id": self.identity.node_id,
                "challenge_signature": challenge_answer(self.identity, challenge) if challenge else "",
            }
        )
        assert self.sealer is not None
        self.ws.send(self.sealer.seal(Kind.HEAD, frame.stream, b'{"status":200}'))
        self.ws.send(self.sealer.seal(Kind.END, frame.stream, body))


@dataclass
class Window:
    """The measured part of a run: heartbeats due in [start, end), after every node registered and heartbeated
    for one interval (warm-up)."""

    start: float = math.inf
    end: float = math.inf
    latencies: list[float] = field(default_factory=list)
    lags: list[float] = field(default_factory=list)
    errors: collections.Counter[str] = field(default_factory=collections.Counter)
    """Failed heartbeats by HTTP status, or "timeout" (30 s) / "connection"."""
    first_error: str = ""
    cpu_s: tuple[float, ...] = ()
    """CPU seconds spent in the window by each process `meter` reads."""
    gc: dict[str, Any] = field(default_factory=dict)
    """The gateway's garbage-collector pauses in the window (gc_report)."""
    own_gc_pauses: list[float] = field(default_factory=list)
    """This process's collections in the window, seconds each."""

    def watch_own_gc(self) -> Callable[[], None]:
        """Record this process's collection pauses that start inside the window; returns the undo."""
        started = [0.0]

        def timer(phase: str, _info: dict[str, int]) -> None:
            if phase == "start":
                started[0] = time.perf_counter()
            elif self.holds(time.monotonic()):
                self.own_gc_pauses.append(time.perf_counter() - started[0])

        gc.callbacks.append(timer)
        return lambda: gc.callbacks.remove(timer)

    def holds(self, due: float) -> bool:
        return self.start <= due < self.end


async def simulate(
    window: Window,
    port: int,
    idents: list[Identity],
    health_port: int,
    interval: float,
    duration: float,
    join_rate: float,
    meter: Callable[[], tuple[float, ...]],
    progress: Progress,
    outbound: bool = False,
) -> None:
    """Nodes join at `join_rate` a second, then each heartbeats every `interval` s at its own phase until the
    window ends, as a node agent does from the moment it has joined. (Registering all nodes before any heartbeat
    leaves the early ones silent for the minute 10,000 registrations take: down before their first beat, so the
    run measures a mass recovery, not ingestion. Joining faster than the gateway registers, a registration costs
    it several heartbeats' CPU, has the same effect.) Heartbeats are sent on schedule whatever the previous
    one's fate.
    `meter()` (CPU seconds so far, per process) is read at the window's start and end. With `outbound`, each node
    first opens its tunnel, registers as `tunnel://` and heartbeats over the tunnel."""
    n = len(idents)
    client, joining = LeanClient(port, limit=256), LeanClient(port, limit=32)  # joins do not queue behind beats
    registering = progress.add_task(f"registering {n:,} nodes", total=n)
    gate = asyncio.Semaphore(32)
    origin = time.monotonic()
    pending: set[asyncio.Task[None]] = set()
    joined = 0
    all_joined = asyncio.Event()
    tunnels = [Tunnel(ident) for ident in idents] if outbound else []

    async def beat(i: int, seq: int, due: float) -> None:
        payload = {"node_id": idents[i].node_id, "seq": seq, "telemetry": telemetry(i, seq)}
        framed = tunnels[i].beat(payload) if outbound else (Kind.HEARTBEAT, signed_beat(idents[i], payload))
        sent = time.monotonic()
        measured = window.holds(due)
        try:
            if outbound:
                async with asyncio.timeout(30.0):
                    status, answer = await tunnels[i].heartbeat(framed)
            else:
                status, answer = await client.post("/nodes/heartbeat", framed[1])
            failure = "" if status == 200 else f"{status} {answer[:200].decode(errors='replace')}"
        except TimeoutError:
            failure = "timeout"
        except (OSError, ConnectionError):
            failure = "connection"
        if measured:
            window.lags.append(sent - due)
            if failure:
                window.errors[failure.split(" ")[0]] += 1
                window.first_error = window.first_error or failure
            else:
                window.latencies.append(time.monotonic() - sent)

    async def node(i: int, ident: Identity) -> None:
        nonlocal joined
        await asyncio.sleep(origin + i / join_rate - time.monotonic())
        async with gate:  # signed when sent, not when queued (a slow machine would let it expire meanwhile)
            if outbound:
                await tunnels[i].open(port)
            body = sign_envelope(
                ident, {"capability": capability(ident, i, health_port, outbound)}, purpose="register", now=time.time()
            )
            status, answer = await joining.post("/nodes/register", body)
            if status != 200:
                raise RuntimeError(f"registration refused: {status} {answer.decode(errors='replace')}")
        progress.advance(registering)
        joined += 1
        if joined == n:
            all_joined.set()
        phase = origin + (i / n) * interval
        due = phase + math.ceil((time.monotonic() - phase) / interval) * interval
        seq = 0
        while due < window.end:
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            if due >= window.end:  # the window was set while this node slept
                break
            seq += 1
            task = asyncio.create_task(beat(i, seq, due))
            pending.add(task)
            task.add_done_callback(pending.discard)
            due += interval

    nodes = [asyncio.create_task(node(i, ident)) for i, ident in enumerate(idents)]
    registered = asyncio.gather(*nodes)
    await asyncio.wait([registered, asyncio.ensure_future(all_joined.wait())], return_when=asyncio.FIRST_COMPLETED)
    if registered.done():
        registered.result()  # a refused registration: raise it
    window.start = time.monotonic() + interval
    window.end = window.start + duration
    gc.freeze()  # the identities and node tasks built so far live to the end: out of the collector's way
    await asyncio.sleep(window.start - time.monotonic())
    before, gc_before = meter(), await asyncio.to_thread(gc_pauses, port)
    await asyncio.sleep(window.end - time.monotonic())
    window.cpu_s = tuple(b - a for a, b in zip(before, meter(), strict=True))
    window.gc = gc_report(gc_before, await asyncio.to_thread(gc_pauses, port))
    await registered
    await asyncio.gather(*list(pending))


UNLIMITED_JOINS = ["--registration-rate", "100000", "--registration-burst", "100000"]
UNLIMITED_JOINS += ["--registration-rate-total", "100000"]
"""Every simulated node joins from 127.0.0.1: the per-address limit would hold them to 1 a second."""


async def one_run(
    nodes: int, interval: float, duration: float, join_rate: float, progress: Progress, transport: str = "http"
) -> dict[str, Any]:
    port = free_port_block(2)
    with tempfile.TemporaryDirectory() as tmp:
        grid = LocalGrid(
            data_dir=Path(tmp),
            port=port,
            api_key="k",
            admin_token="a",
            engines=[],
            heartbeat_interval_s=interval,
            extra_gateway_args=UNLIMITED_JOINS,
        )
        grid.start_gateway()
        idents = [Identity.generate() for _ in range(nodes)]
        server = await health_server(port + 1, idents)
        try:
            gateway, me = psutil.Process(grid.procs["gateway"].pid), psutil.Process()
            rss_before = gateway.memory_info().rss

            def meter() -> tuple[float, float]:
                return sum(gateway.cpu_times()[:2]), sum(me.cpu_times()[:2])

            window = Window()
            unwatch = window.watch_own_gc()
            try:
                await simulate(
                    window,
                    port,
                    idents,
                    port + 1,
                    interval,
                    duration,
                    join_rate,
                    meter,
                    progress,
                    transport == "outbound",
                )
                rss_after = gateway.memory_info().rss
            finally:
                unwatch()
                gc.unfreeze()
        finally:
            server.close()
            grid.stop()
    latencies, lags, wall = window.latencies, window.lags, window.end - window.start
    cpu, own = window.cpu_s
    return {
        "nodes": nodes,
        "transport": transport,
        "interval_s": interval,
        "join_rate_per_s": join_rate,
        "nominal_heartbeats_per_s": round(nodes / interval, 1),
        "heartbeats_per_s": round(len(latencies) / wall, 1),
        "ingest_p50_ms": round(statistics.median(latencies) * 1e3, 2) if latencies else None,
        "ingest_p99_ms": round(percentile(latencies, 0.99) * 1e3, 2) if latencies else None,
        "gateway_cpu_cores": round(cpu / wall, 3),
        "loadgen_cpu_cores": round(own / wall, 3),
        "lag_p99_ms": round(percentile(lags, 0.99) * 1e3, 2) if lags else None,
        "loadgen_gc_max_pause_ms": round(max(window.own_gc_pauses, default=0.0) * 1e3, 2),
        "errors": sum(window.errors.values()),
        "errors_by_kind": dict(window.errors),
        "first_error": window.first_error,
        "duration_s": round(wall, 1),
        "gateway_rss_start_mb": round(rss_before / 2**20, 1),
        "gateway_rss_mb": round(rss_after / 2**20, 1),
        "gateway_rss_per_node_kb": round((rss_after - rss_before) / nodes / 1024, 1),
        **window.gc,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nodes", default="1000,10000", help="comma-separated grid sizes")
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between a node's heartbeats")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of heartbeats per grid size")
    parser.add_argument("--join-rate", type=float, default=50.0, help="nodes registering per second")
    parser.add_argument(
        "--transport",
        default="http",
        help="comma-separated: http (heartbeats POSTed, probes over HTTP) and/or outbound (each node holds a tunnel: "
        "heartbeats and probes go over it)",
    )
    args = parser.parse_args()
    gc.set_threshold(*GC_THRESHOLDS)
    runs = []
    with Progress(transient=True, console=Console(stderr=True)) as progress:
        for n in (int(x) for x in args.nodes.split(",")):
            for transport in args.transport.split(","):
                with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:  # the generator's CPU: LeanClient
                    run = one_run(n, args.interval, args.duration, args.join_rate, progress, transport)
                    runs.append(runner.run(run))
    json.dump({"bench": "ingest", "target": "10,000 nodes: p99 < 50 ms", "runs": runs}, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
