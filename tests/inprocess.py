"""An in-process gateway over SQLite for unit tests: its app driven through httpx's ASGI transport (no sockets)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx

from gridserve.gateway.app import Gateway, build_gateway_app
from gridserve.gateway.config import GatewayConfig
from gridserve.store import Store
from gridserve.trust import Identity

Check = Callable[[Gateway, httpx.AsyncClient], Awaitable[None]]


def with_gateway(tmp: Path, check: Check, config: GatewayConfig) -> None:
    """Run `check` against an in-process gateway with `config` (its store SQLite in `tmp`)."""
    store = Store(f"sqlite:///{tmp / 'gateway.db'}")
    store.migrate()
    gw = Gateway(config, store, Identity.generate())

    async def go() -> None:
        transport = httpx.ASGITransport(app=build_gateway_app(gw))
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
            await check(gw, client)

    try:
        asyncio.run(go())
    finally:
        gw.writer.close()
        store.close()
