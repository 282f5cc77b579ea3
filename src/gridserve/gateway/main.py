"""Run a gateway process."""

import gc
import logging
import secrets
import time
from pathlib import Path

import uvicorn

from gridserve.gateway.api.head_with_body import HttpProtocol
from gridserve.gateway.app import Gateway, build_gateway_app
from gridserve.gateway.config import GatewayConfig
from gridserve.gateway.registry.ledger_replay import replay, restore_marks
from gridserve.gateway.transport.tunnel_socket import DirectSocket
from gridserve.observability import LogFormat, setup_logging
from gridserve.store import Store, default_sqlite_url
from gridserve.trust import load_or_create_identity


def read_or_create_secret(path: Path, prefix: str) -> str:
    """A secret kept in the data dir (mode 0600), created on first use."""
    if path.exists():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    value = prefix + secrets.token_urlsafe(24)
    path.touch(mode=0o600)
    path.write_text(value + "\n")
    return value


def build_gateway(config: GatewayConfig) -> Gateway:
    store = Store(config.db_url or default_sqlite_url(config.data_dir), origin=config.name)
    store.migrate()
    identity = load_or_create_identity(config.key_file or config.data_dir / "gateway.key")
    cursor = store.last_event_id()  # before the replay: an event committed meanwhile is applied by the sync
    gateway = Gateway(config, store, identity, event_cursor=cursor)
    applied = replay(store, gateway.membership.book)
    marked = restore_marks(store, gateway.membership.book, gateway.membership.marks, time.time())
    logging.getLogger("gridserve.gateway").info(
        "reliability ledger: %d stored events replayed, %d quarantined identities' whitewash marks restored",
        applied,
        marked,
    )
    return gateway


GC_THRESHOLDS = (5_000, 50, 10)
"""The cyclic collector's thresholds (Python's default: 700, 10, 10). A heartbeat leaves a few objects that live
until the node's next one (its telemetry), so at 10,000 nodes the default thresholds ran a full collection every
3 s, each walking the whole grid's state: ~240 ms pauses, the heartbeat p99. Almost everything here is freed by
reference counting; the collector is for the rare cycle: young collections stay small (~10 ms) and the older
generations are collected far less often (pauses by generation: gridserve_gc_pause_seconds; bench/ingest.py)."""


KEEP_ALIVE_S = 75
"""How long an idle client connection stays open (uvicorn's default: 5 s). Longer than clients keep idle connections
for reuse: httpx and the OpenAI SDK 5 s, aiohttp 15 s, a proxy or load balancer in front 60 s. With both at 5 s, a
client reused a connection the gateway was closing that very moment: the request went out on a closed socket and
came back as a reset (httpx.ReadError), which a client does not retry for a POST. The side that closes first must
be the client: it knows when it reuses the connection. (Nginx's default is 75 s, for the same reason.)"""


def run_gateway(config: GatewayConfig, log_level: str = "warning", log_format: LogFormat = "text") -> None:
    setup_logging(log_level, log_format)
    gateway = build_gateway(config)
    app = build_gateway_app(gateway)
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=config.host,
            port=config.port,
            log_level=log_level,
            log_config=None,  # uvicorn's records go through our handler (JSON when asked)
            access_log=False,
            timeout_graceful_shutdown=config.drain_s,
            timeout_keep_alive=KEEP_ALIVE_S,
            backlog=4096,
            proxy_headers=False,
            loop="auto",  # uvloop and httptools where installed (uvicorn[standard])
            http=HttpProtocol,  # uvicorn's httptools protocol; a stream's head goes out with its first chunk
            ws=DirectSocket,  # uvicorn's wsproto protocol, tunnels read by callback (transport/tunnel_socket.py)
            ssl_certfile=config.tls_cert,
            ssl_keyfile=config.tls_key,
        )
    )
    gc.collect()
    gc.freeze()  # what startup built (modules, app, replayed ledger) lives on: full collections skip it
    gc.set_threshold(*GC_THRESHOLDS)
    try:
        server.run()  # not asyncio.run(server.serve()): that ignores `loop` and runs on asyncio's default loop
    finally:
        gateway.store.close()
