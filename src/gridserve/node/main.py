"""Run a node agent: engine + HTTP server + registration/heartbeats."""

import asyncio
import signal

import uvicorn
from fastapi import FastAPI

from gridserve.engines.registry import EngineOptions, create_engine
from gridserve.node.agent import NodeAgent
from gridserve.node.app import build_node_app
from gridserve.node.config import NodeConfig
from gridserve.node.dishonest import Dishonesty
from gridserve.node.faults import Faults
from gridserve.node.tunnel import NodeTunnel
from gridserve.observability import LogFormat, setup_logging
from gridserve.trust import load_or_create_identity, tls

KEEP_ALIVE_S = 75
"""How long an idle connection from the gateway stays open (uvicorn's default: 5 s). The gateway's pool keeps idle
connections to a node 30 s; a node closing at 5 s raced the gateway reusing one (ServerDisconnectedError before
the first token, a retry on another node for nothing). The client must be the side that closes first."""


def run_node(
    config: NodeConfig,
    options: EngineOptions,
    *,
    faults: Faults | None = None,
    lies: Dishonesty | None = None,
    log_level: str = "warning",
    log_format: LogFormat = "text",
) -> None:
    setup_logging(log_level, log_format)
    identity = load_or_create_identity(config.key_file)
    engine = create_engine(config.engine, options)
    agent = NodeAgent(config, identity, engine)
    app = build_node_app(agent, engine, faults, lies)
    if config.outbound_only:
        asyncio.run(_serve_outbound(app, agent))
        if agent.refused is not None:
            raise agent.refused
        return
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=config.host,
            port=config.port,
            log_level=log_level,
            log_config=None,  # uvicorn's records go through our handler (JSON when asked)
            access_log=False,
            timeout_graceful_shutdown=3,
            timeout_keep_alive=KEEP_ALIVE_S,  # longer than the gateway keeps idle connections to nodes (30 s)
            ws_max_size=64 * 1024 * 1024,  # pipeline frames: a long prompt's hidden states in one step
            ssl_certfile=config.tls_cert,
            ssl_keyfile=config.tls_key,
        )
    )
    asyncio.run(_serve(server, agent))
    if agent.refused is not None:
        raise agent.refused


async def _serve_outbound(app: FastAPI, agent: NodeAgent) -> None:
    """An outbound-only node: no server, no listening socket; one tunnel to each gateway, and the app's lifespan
    (engine, registration, heartbeats) around them. Stops on SIGINT or SIGTERM, or when this node cannot join."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    verify = tls.client_verify(agent.config.ca_file)

    def learned(key: str) -> None:
        agent.gateway_key = agent.gateway_key or key

    for url in agent.gateways:
        agent.tunnels[url] = NodeTunnel(
            agent.identity, app, url, verify=verify, gateway_key=lambda: agent.gateway_key, learned_key=learned
        )
    runners = [asyncio.create_task(t.run(), name=f"tunnel {url}") for url, t in agent.tunnels.items()]
    try:
        async with app.router.lifespan_context(app):
            ended = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(agent.stopped.wait())]
            await asyncio.wait(ended, return_when=asyncio.FIRST_COMPLETED)
            for waiter in ended:
                waiter.cancel()
    finally:
        for runner in runners:
            runner.cancel()
        await asyncio.gather(*runners, return_exceptions=True)


async def _serve(server: uvicorn.Server, agent: NodeAgent) -> None:
    """Serve until stopped, or until the gateway refuses this node's join token."""

    async def stop_when_refused() -> None:
        await agent.stopped.wait()
        server.should_exit = True

    watch = asyncio.create_task(stop_when_refused())
    try:
        await server.serve()
    finally:
        watch.cancel()
