"""Admin API for reliability: list incidents, report one, quarantine and release nodes (reason recorded)."""

import time
from dataclasses import asdict
from typing import Annotated, Any

import orjson
from fastapi import FastAPI, Query, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gridserve.gateway.api.errors import APIError, bad_request
from gridserve.gateway.registry.membership import Membership
from gridserve.reliability import CannotRelease, EventKind, NodeEvent, Severity, Transition
from gridserve.types import NodeId

MAX_LIMIT = 10_000
"""Most incidents (and transitions) one answer lists."""


class ReasonBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reason: str = Field(min_length=1, max_length=2000)


class IncidentBody(ReasonBody):
    severity: Severity = Severity.MINOR


async def _body(request: Request, model: type[ReasonBody]) -> Any:
    try:
        return model.model_validate(orjson.loads(await request.body() or b"{}"))
    except (orjson.JSONDecodeError, ValidationError) as exc:
        raise bad_request(f"invalid body: {exc}") from exc


def _transitions(items: list[Transition]) -> list[dict[str, Any]]:
    return [{**asdict(t), "old": t.old.value, "new": t.new.value} for t in items]


def _event(e: NodeEvent) -> dict[str, Any]:
    return {**asdict(e), "kind": e.kind.value, "severity": e.severity.value}


def add_reliability_routes(app: FastAPI, membership: Membership, require_admin: Any) -> None:
    def known(node_id: str) -> NodeId:
        if node_id not in membership.nodes:
            raise APIError(404, f"No node {node_id}.", code="not_found")
        return NodeId(node_id)

    @app.get("/admin/incidents")
    async def incidents(
        request: Request, node_id: str | None = None, limit: Annotated[int, Query(ge=0, le=MAX_LIMIT)] = 100
    ) -> dict[str, Any]:
        require_admin(request)
        await membership.durable()  # what is shown is committed: it survives a crash of the gateway
        book = membership.book
        return {
            "incidents": [_event(e) for e in book.incidents(node_id, limit=limit)],
            "transitions": _transitions(book.transitions(node_id, limit=limit)),
        }

    @app.post("/admin/nodes/{node_id}/incident")
    async def incident(node_id: str, request: Request) -> dict[str, Any]:
        require_admin(request)
        body = await _body(request, IncidentBody)
        event = NodeEvent(
            node_id=known(node_id),
            kind=EventKind.INCIDENT,
            at=time.time(),
            severity=body.severity,
            detail=f"reported by admin: {body.reason}",
        )
        changes = membership.note(event)
        await membership.durable()
        return {"transitions": _transitions(changes), "state": membership.book.state(node_id, time.time()).value}

    @app.post("/admin/nodes/{node_id}/quarantine")
    async def quarantine(node_id: str, request: Request) -> dict[str, Any]:
        require_admin(request)
        body = await _body(request, ReasonBody)
        changes = membership.quarantine(known(node_id), body.reason)  # through the registry, as replay does
        await membership.durable()
        return {"transitions": _transitions(changes), "state": membership.book.state(node_id, time.time()).value}

    @app.post("/admin/nodes/{node_id}/release")
    async def release(node_id: str, request: Request) -> dict[str, Any]:
        require_admin(request)
        body = await _body(request, ReasonBody)
        try:
            changes = membership.release(known(node_id), body.reason)
        except CannotRelease as exc:
            raise APIError(409, str(exc), code="banned") from exc
        await membership.durable()
        return {"transitions": _transitions(changes), "state": membership.book.state(node_id, time.time()).value}
