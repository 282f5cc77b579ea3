"""Admin API for API keys (gateway/tenancy/): create, list, revoke; and usage per key."""

import asyncio
from typing import Any

import orjson
from fastapi import FastAPI, Request
from pydantic import ConfigDict, Field, ValidationError

from gridserve.gateway.api.errors import APIError, bad_request
from gridserve.gateway.tenancy import KeyPolicy, Tenancy, UnknownKey
from gridserve.gateway.tenancy.keys import view


class KeyRequest(KeyPolicy):
    """A new key: a name, and the policy's members (each optional)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)
    name: str = Field(min_length=1, max_length=200, description="who or what the key is for")


async def _key_request(request: Request) -> KeyRequest:
    try:
        return KeyRequest.model_validate(orjson.loads(await request.body()))
    except orjson.JSONDecodeError as exc:
        raise bad_request(f"invalid body: a JSON object with at least `name` ({exc})") from exc
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        raise bad_request(f"Invalid key: {param}: {first['msg']}", param=param) from exc


def add_key_routes(app: FastAPI, tenancy: Tenancy, require_admin: Any) -> None:
    @app.post("/admin/keys")
    async def create_key(request: Request) -> dict[str, Any]:
        """Create an API key; the answer holds the key itself (`key`), shown this once (the store keeps a digest)."""
        require_admin(request)
        body = await _key_request(request)
        policy = KeyPolicy.model_validate(body.model_dump(exclude={"name"}))
        try:
            return await tenancy.create(body.name, policy)
        except ValueError as exc:
            raise bad_request(str(exc), param="name") from exc

    @app.get("/admin/keys")
    async def list_keys(request: Request) -> dict[str, Any]:
        """Every issued key: id, name, limits, status (never the key or its digest)."""
        require_admin(request)
        return {"keys": await asyncio.to_thread(tenancy.list_keys)}

    @app.delete("/admin/keys/{key_id}")
    async def revoke_key(key_id: str, request: Request) -> dict[str, Any]:
        """Revoke a key: refused on every gateway of the database within a second (one key sync)."""
        require_admin(request)
        try:
            return await tenancy.revoke(key_id)
        except UnknownKey:
            raise APIError(404, f"No API key {key_id[:64]}.", code="not_found") from None

    @app.post("/admin/keys/{key_id}/rotate")
    async def rotate_key(key_id: str, request: Request) -> dict[str, Any]:
        """A new secret for an active key (`key`, shown this once); the old one is refused within a second on every
        gateway. The key's id, limits, usage and stored responses stay."""
        require_admin(request)
        try:
            return await tenancy.rotate(key_id)
        except UnknownKey:
            raise APIError(404, f"No active API key {key_id[:64]}.", code="not_found") from None

    @app.get("/admin/usage")
    async def usage(request: Request) -> dict[str, Any]:
        """Per key: what this gateway served (requests, tokens, spend, errors, refusals, TTFT percentiles), and
        the key's counts across every gateway (this minute's requests and tokens, spend, requests in flight)."""
        require_admin(request)
        served = tenancy.usage.view()
        out: list[dict[str, Any]] = []
        for key_id, counts in tenancy.limiter.keys.items():
            key = tenancy.book.get(key_id)
            own, others = counts.own, counts.others
            cluster = {
                "requests_this_minute": own.requests + others.requests,
                "tokens_this_minute": own.tokens + others.tokens,
                "spent_usd": round(own.spent_usd + others.spent_usd, 9),
                "inflight": own.inflight + others.inflight,
            }
            entry = {"id": key_id, **(view(key) if key else {}), "cluster": cluster}
            entry["served_here"] = served.pop(key_id, None)
            out.append(entry)
        for key_id, stats in served.items():
            key = tenancy.book.get(key_id)
            out.append({"id": key_id, **(view(key) if key else {}), "served_here": stats})
        return {"keys": out}


__all__ = ["KeyRequest", "add_key_routes"]
