"""Admin API for join tokens (gateway/registry/tokens.py): create, list, revoke."""

import asyncio
from typing import Any, Self

import orjson
from fastapi import FastAPI, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from gridserve.gateway.api.errors import APIError, bad_request
from gridserve.gateway.registry.tokens import MAX_USES, JoinTokens, UnknownToken

MAX_EXPIRY_S = 10 * 365 * 86_400.0
"""The furthest ahead a token may expire (ten years; no expiry: leave it out)."""


class TokenRequest(BaseModel):
    """A new join token: every member optional, the body required (`{}`: one node, no expiry)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    label: str = Field(default="", max_length=200, description="what the token is for (shown in listings)")
    uses: int = Field(default=1, ge=1, le=MAX_USES, description="distinct node identities it may admit")
    expires_in_s: float | None = Field(default=None, gt=0, le=MAX_EXPIRY_S, description="seconds from now")
    expires_at: float | None = Field(default=None, gt=0, le=1e11, description="unix seconds")

    @model_validator(mode="after")
    def one_expiry(self) -> Self:
        if self.expires_in_s is not None and self.expires_at is not None:
            raise ValueError("give expires_in_s or expires_at, not both")
        return self


async def _token_request(request: Request) -> TokenRequest:
    try:
        return TokenRequest.model_validate(orjson.loads(await request.body()))
    except (orjson.JSONDecodeError, ValidationError) as exc:
        raise bad_request(f"invalid body (a JSON object; {{}} for the defaults): {exc}") from exc


def add_token_routes(app: FastAPI, tokens: JoinTokens, require_admin: Any) -> None:
    @app.post("/admin/tokens")
    async def create_token(request: Request) -> dict[str, Any]:
        """Create a join token; the answer holds the token itself (`token`), shown this once."""
        require_admin(request)
        body = await _token_request(request)
        try:
            return await asyncio.to_thread(
                tokens.create,
                label=body.label,
                uses=body.uses,
                expires_in_s=body.expires_in_s,
                expires_at=body.expires_at,
            )
        except ValueError as exc:
            raise bad_request(str(exc)) from exc

    @app.get("/admin/tokens")
    async def list_tokens(request: Request) -> dict[str, Any]:
        """Every join token: id, label, expiry, uses left, the node ids it admitted, status (never the token)."""
        require_admin(request)
        return {"tokens": await asyncio.to_thread(tokens.list_tokens)}

    @app.delete("/admin/tokens/{token_id}")
    async def revoke_token(token_id: str, request: Request) -> dict[str, Any]:
        """Revoke a join token: it admits no node from now on (those it admitted stay until they re-register)."""
        require_admin(request)
        try:
            return await asyncio.to_thread(tokens.revoke, token_id)
        except UnknownToken:
            raise APIError(404, f"No join token {token_id[:64]}.", code="not_found") from None


__all__ = ["TokenRequest", "add_token_routes"]
