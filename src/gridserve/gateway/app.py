"""Assemble the gateway: store, membership, scheduler, dispatch and the HTTP routes."""

import asyncio
import contextlib
import hmac
import logging
import math
import random
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import FastAPI, Query, Request, WebSocket
from fastapi.exceptions import RequestValidationError
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp

from gridserve.gateway.api.admin import add_reliability_routes
from gridserve.gateway.api.dashboard import add_dashboard_routes
from gridserve.gateway.api.doctor_api import add_doctor_routes
from gridserve.gateway.api.embeddings_api import EmbeddingService, embed
from gridserve.gateway.api.errors import APIError, bad_request, unauthorized
from gridserve.gateway.api.hotpath import HotPath
from gridserve.gateway.api.keys_api import add_key_routes
from gridserve.gateway.api.middleware import BodyLimit
from gridserve.gateway.api.openai_api import ApiContext, list_models
from gridserve.gateway.api.openapi_doc import install_openapi
from gridserve.gateway.api.responses_api import (
    ResponseStore,
    cancel_response,
    delete_response,
    list_input_items,
    retrieve_response,
)
from gridserve.gateway.api.tokens_api import add_token_routes
from gridserve.gateway.config import GatewayConfig
from gridserve.gateway.dispatch.dispatcher import Dispatcher
from gridserve.gateway.dispatch.prefixes import PrefixAffinity
from gridserve.gateway.dispatch.standby import StandbyKeeper
from gridserve.gateway.integrity.audit import Auditor, Verifier
from gridserve.gateway.integrity.canary import CanaryRunner
from gridserve.gateway.integrity.receipts import ReceiptChecker
from gridserve.gateway.integrity.redundancy import RedundancyChecker
from gridserve.gateway.lifecycle import (
    DecisionLogSubscriber,
    LedgerSubscriber,
    Lifecycle,
    MetricsSubscriber,
    Settlement,
    Subscriber,
)
from gridserve.gateway.lifecycle.tracing import TracingSubscriber, otlp_provider
from gridserve.gateway.ops.decisions import DecisionLog
from gridserve.gateway.ops.gcwatch import GcWatch
from gridserve.gateway.ops.looplag import watch_loop_lag
from gridserve.gateway.ops.metrics import GatewayMetrics
from gridserve.gateway.ops.outcomes import Traces
from gridserve.gateway.pipeline.serving import Pipelines
from gridserve.gateway.registry.admission import Admission
from gridserve.gateway.registry.cluster import ClusterSync
from gridserve.gateway.registry.health import probe_forever
from gridserve.gateway.registry.membership import Membership, UnknownNode
from gridserve.gateway.registry.tokens import JOIN_TOKEN_HEADER, JoinTokens
from gridserve.gateway.tenancy import ApiKey, Tenancy
from gridserve.gateway.tenancy.queue import SlotCount
from gridserve.gateway.tenancy.usage import UsageCollector, UsageSubscriber
from gridserve.gateway.transport import AiohttpTransport
from gridserve.gateway.transport.routing import RoutingTransport
from gridserve.gateway.transport.tunnel import TunnelHub, TunnelTransport
from gridserve.scheduler import Scheduler, default_profile, load_profile
from gridserve.store import Store, StoreWriter
from gridserve.trust import EnvelopeVerifier, FreshnessPolicy, Identity, TrustError, sign_envelope, tls
from gridserve.trust.errors import Malformed, RateLimited
from gridserve.tunnel.wire import PATH as TUNNEL_PATH
from gridserve.types.node import MAX_CAPABILITY_BYTES

log = logging.getLogger("gridserve.gateway")


def _bearer(request: Request) -> str:
    header = request.headers.get("authorization", "")
    return header[7:].strip() if header.lower().startswith("bearer ") else ""


def _check_key(presented: str, allowed: tuple[str, ...]) -> bool:
    return any(hmac.compare_digest(presented.encode(), key.encode()) for key in allowed if key)


class Gateway:
    def _lifecycle(self) -> Lifecycle:
        """Every request's consequences, one subscriber each (gateway/lifecycle/)."""
        subscribers: list[Subscriber] = [
            self.prefixes,
            DecisionLogSubscriber(self.decisions),
            MetricsSubscriber(self.metrics),
            LedgerSubscriber(self.membership, self.traces),
        ]
        subscribers.append(UsageSubscriber(self.tenancy.usage))
        if self.tracing is not None:
            subscribers.append(TracingSubscriber(self.tracing.get_tracer("gridserve.gateway")))
        return Lifecycle(Settlement(self.receipts, self.auditor), self.receipts, subscribers)

    def __init__(self, config: GatewayConfig, store: Store, identity: Identity, *, event_cursor: int = 0) -> None:
        self.config = config
        self.store = store
        self.identity = identity
        self.metrics = GatewayMetrics()
        self.writer = StoreWriter(store)
        policy = FreshnessPolicy(max_skew_s=config.max_skew_s, max_lifetime_s=config.max_message_lifetime_s)
        self.verifier = EnvelopeVerifier(policy, time.time)
        self.membership = Membership(config, self.verifier, self.writer, self.metrics)
        slots = SlotCount(lambda: self.membership.nodes.values(), shared=store.dialect == "postgresql")
        """(On PostgreSQL, other gateways may send to the same nodes: ClusterSync below.)"""
        self.tenancy = Tenancy(
            store,
            config.api_keys,
            gateway_id=config.name,
            sync_interval_s=config.key_sync_interval_s,
            capacity=slots,
            elsewhere=slots.elsewhere,
            queue_shares=config.queue_shares,
            queue_deadlines_s=config.queue_deadlines_s,
        )
        """API keys, their limits and usage (gateway/tenancy/)."""
        self.tenancy.sync.load()
        self.metrics.registry.register(UsageCollector(self.tenancy.usage))
        self.join_tokens = JoinTokens(store, EnvelopeVerifier(policy, time.time))
        """Checked at registration with `--join-tokens` (config.join_tokens_required); managed by the admin API."""
        self.admission = Admission(
            registration_rate=config.registration_rate,
            registration_burst=config.registration_burst,
            registration_rate_total=config.registration_rate_total,
        )
        self.tunnels = TunnelHub(identity, self.verifier, self.membership)
        """Outbound-only nodes' open tunnels (WS /nodes/tunnel)."""
        direct = AiohttpTransport(
            identity,
            connect_timeout_s=config.connect_timeout_s,
            verify=tls.client_verify(config.node_ca_file) if config.node_ca_file is not None else True,
        )
        transport = RoutingTransport(direct, TunnelTransport(identity, self.tunnels))
        self.dispatcher = Dispatcher(config, self.membership, identity, self.metrics, transport)
        self.decisions = DecisionLog(self.writer, config.decision_cache)
        profile = load_profile(config.profile_path) if config.profile_path else default_profile()
        self.traces = Traces()
        self.tracing: TracerProvider | None = otlp_provider(config.otlp_endpoint) if config.otlp_endpoint else None
        """Request traces to an OTLP collector (None: off)."""
        self.receipts = ReceiptChecker(self.membership, self.writer)
        redundancy = RedundancyChecker(config, self.dispatcher, self.metrics) if config.redundancy else None
        self.auditor = Auditor(config, self.membership, self.metrics, Verifier(isolated=True), redundancy)
        self.canaries = CanaryRunner(self.dispatcher, self.auditor, self.receipts)
        self.standby = StandbyKeeper(config, self.membership, self.dispatcher, profile)
        self.prefixes = PrefixAffinity(enabled=config.prefix_routing)
        self.membership.on_registered.append(self.prefixes.registered)
        self.membership.on_down.append(self.prefixes.lost)
        self.api = ApiContext(
            self.membership,
            self.dispatcher,
            self.decisions,
            self.metrics,
            Scheduler(profile, kernel=config.scheduler_kernel),
            random.Random(),
            self.traces,
            self.receipts,
            self.auditor,
            self._lifecycle(),
            on_request=self.standby.note_request,
            pipelines=Pipelines(self.membership, self.dispatcher),
            prefixes=self.prefixes,
            responses=ResponseStore(store),
            tenancy=self.tenancy,
        )
        self.embeddings = EmbeddingService.of(self.api)
        """`POST /v1/embeddings` (gateway/api/embeddings_api.py)."""
        self.cluster = (
            ClusterSync(
                self.membership,
                store,
                gateway_id=config.name,
                interval_s=config.cluster_sync_interval_s,
                event_cursor=event_cursor,
            )
            if store.dialect == "postgresql"
            else None
        )
        """Several gateways on one PostgreSQL database keep each other's nodes and ledger (None on SQLite)."""

    def require_api_key(self, request: Request) -> ApiKey:
        """An API key as OpenAI's clients send it (`Authorization: Bearer`) or Anthropic's (`x-api-key`), as the
        hot path takes it."""
        key = self.tenancy.authenticate(_bearer(request)) or self.tenancy.authenticate(
            request.headers.get("x-api-key", "").strip()
        )
        if key is None:
            raise unauthorized()
        return key

    def require_admin(self, request: Request) -> None:
        if not _check_key(_bearer(request), (self.config.admin_token,)):
            raise unauthorized("Missing or invalid admin token.")

    async def sweep_forever(self) -> None:
        interval = self.config.heartbeat_interval_s / 8
        while True:
            await asyncio.sleep(interval)
            self.membership.sweep()
            self.tunnels.close_silent()
            self.tenancy.queue.poke()
            self.decisions.flush()
            self.membership.flush_events()


def _remote(request: Request) -> str:
    return request.client.host if request.client else "?"


def build_gateway_app(gw: Gateway) -> ASGIApp:
    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await gw.dispatcher.start()
        gw.api.scheduler.warm(background=True)  # the column path decides until the kernel is loaded
        gc_watch = GcWatch(gw.metrics.gc_pause)
        gc_watch.install()
        sweeper = asyncio.create_task(gw.sweep_forever())
        keeper = asyncio.create_task(gw.standby.run_forever())
        canary = (
            asyncio.create_task(gw.canaries.run_forever(gw.config.canary_interval_s))
            if gw.config.canary_interval_s > 0
            else asyncio.create_task(asyncio.sleep(0))
        )
        prober = asyncio.create_task(probe_forever(gw.membership, gw.dispatcher, gw.config))
        lag = asyncio.create_task(watch_loop_lag(gw.metrics.loop_lag))
        sync = asyncio.create_task(gw.cluster.run_forever() if gw.cluster else asyncio.sleep(0))
        keys = asyncio.create_task(gw.tenancy.sync.run_forever())
        ttl = gw.config.responses_ttl_s
        responses = gw.api.responses
        prune = asyncio.create_task(responses.prune_forever(ttl) if responses and ttl > 0 else asyncio.sleep(0))
        try:
            yield
        finally:
            for task in (sweeper, prober, keeper, canary, sync, keys, prune, lag):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            if responses is not None:  # background responses under way get the drain time, then are stored failed
                await responses.stop(gw.config.drain_s)
            with contextlib.suppress(Exception):  # budget this gateway leased and did not spend goes back
                await gw.tenancy.leases.give_back()
            if gw.api.pipelines is not None:
                await gw.api.pipelines.aclose()
            await gw.dispatcher.aclose()
            gw.decisions.flush()
            gw.membership.flush_events()
            gw.writer.close()
            gw.auditor.verifier.close()
            gc_watch.remove()
            if gw.tracing is not None:  # spans still batched go out before the gateway stops
                await asyncio.to_thread(gw.tracing.shutdown)

    app = FastAPI(title="gridserve gateway", lifespan=lifespan, docs_url=None, redoc_url=None)
    _errors(app)
    _node_routes(app, gw)
    _openai_routes(app, gw)
    _admin_routes(app, gw)
    add_reliability_routes(app, gw.membership, gw.require_admin)
    add_token_routes(app, gw.join_tokens, gw.require_admin)
    add_key_routes(app, gw.tenancy, gw.require_admin)
    pipelines = gw.api.pipelines
    add_doctor_routes(app, gw.membership, gw.traces, gw.require_admin, lambda: pipelines.recent if pipelines else [])
    add_dashboard_routes(app, gw)
    install_openapi(app)
    app.add_middleware(BodyLimit, max_bytes=gw.config.max_body_bytes)
    return HotPath(app, gw.api, gw.tenancy, gw.config.max_body_bytes, gw.membership)


def _errors(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError) -> Response:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> Response:
        return bad_request(f"Invalid request: {exc.errors()[0].get('msg', 'invalid')}").response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> Response:
        code = "not_found" if exc.status_code == 404 else None
        return APIError(exc.status_code, str(exc.detail), code=code).response()

    @app.exception_handler(Exception)
    async def internal(_: Request, exc: Exception) -> Response:
        log.exception("internal error")
        return APIError(500, f"Internal error: {type(exc).__name__}", type_="api_error", code="internal").response()


def _node_routes(app: FastAPI, gw: Gateway) -> None:
    def refused(exc: TrustError, request: Request, status: int = 401) -> Response:
        gw.membership.reject(exc, path=request.url.path, remote=_remote(request))
        headers = {"retry-after": str(math.ceil(exc.retry_after_s))} if isinstance(exc, RateLimited) else None
        return JSONResponse({"error": {"type": exc.kind, "message": exc.detail}}, status_code=status, headers=headers)

    @app.post("/nodes/register")
    async def register(request: Request) -> Response:
        wait = gw.admission.registration(_remote(request), time.monotonic())
        if wait:
            limit = RateLimited(f"too many registrations right now; retry in {wait:.1f} s", retry_after_s=wait)
            return refused(limit, request, status=429)
        body = await request.body()
        if len(body) > MAX_CAPABILITY_BYTES:
            too_large = Malformed(f"registration of {len(body)} bytes exceeds {MAX_CAPABILITY_BYTES}")
            return refused(too_large, request, status=413)
        try:
            if gw.config.join_tokens_required:  # refused before the node is accepted (gateway/registry/tokens.py)
                await gw.join_tokens.admit(request.headers.get(JOIN_TOKEN_HEADER), body)
            capability, unknown = gw.membership.register(body, _remote(request))
        except TrustError as exc:
            return refused(exc, request)
        reply: dict[str, Any] = {
            "gateway_public_key": gw.identity.public_key,
            "heartbeat_interval_s": gw.config.heartbeat_interval_s,
        }
        if unknown:  # only a node that sent fields this version does not know: one newer than this gateway
            reply["unread"] = list(unknown)
        body = sign_envelope(gw.identity, reply, purpose="register-reply", now=time.time())
        log.debug("registered %s", capability.node_id)
        return Response(body, media_type="application/json")

    @app.post("/nodes/heartbeat")
    async def heartbeat(request: Request) -> Response:
        try:
            gw.membership.heartbeat(await request.body())
        except UnknownNode as exc:
            return refused(exc, request, status=404)
        except TrustError as exc:
            return refused(exc, request)
        return JSONResponse({"ok": True})

    @app.websocket(TUNNEL_PATH)
    async def tunnel(ws: WebSocket) -> None:
        """An outbound-only node's tunnel (gateway/transport/tunnel.py)."""
        await gw.tunnels.serve(ws)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        live = sum(1 for r in gw.membership.nodes.values() if r.state.value in ("up", "suspect", "probation"))
        return {
            "status": "ok",
            "nodes_live": live,
            "gateway_public_key": gw.identity.public_key,
            "gateway_id": gw.config.name,
        }


def _openai_routes(app: FastAPI, gw: Gateway) -> None:
    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        gw.require_api_key(request)
        return list_models(gw.api)

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> Response:
        """Embeddings (OpenAI-compatible), from nodes that offer the model for embedding."""
        key = gw.require_api_key(request)
        answer = await embed(gw.embeddings, await request.body(), key)
        return Response(answer.body, media_type="application/json", headers=answer.headers)

    @app.get("/v1/responses/{response_id}")
    async def get_response(response_id: str, request: Request) -> dict[str, Any]:
        """A stored response (OpenAI's Responses API; gateway/api/responses_api.py)."""
        key = gw.require_api_key(request)
        return await retrieve_response(gw.api.responses, response_id, request.query_params, key.key_id)

    @app.get("/v1/responses/{response_id}/input_items")
    async def get_input_items(response_id: str, request: Request) -> dict[str, Any]:
        """A stored response's input items, newest first by default (`order`, `limit`, `after`)."""
        key = gw.require_api_key(request)
        return await list_input_items(gw.api.responses, response_id, request.query_params, key.key_id)

    @app.post("/v1/responses/{response_id}/cancel")
    async def cancel_background_response(response_id: str, request: Request) -> dict[str, Any]:
        """Cancel a background response under way (OpenAI's Responses API; gateway/api/responses_api.py)."""
        key = gw.require_api_key(request)
        return await cancel_response(gw.api.responses, response_id, request.query_params, key.key_id)

    @app.delete("/v1/responses/{response_id}")
    async def delete_stored_response(response_id: str, request: Request) -> dict[str, Any]:
        key = gw.require_api_key(request)
        return await delete_response(gw.api.responses, response_id, request.query_params, key.key_id)


def _admin_routes(app: FastAPI, gw: Gateway) -> None:
    @app.get("/admin/pipelines")
    async def pipelines(request: Request) -> dict[str, Any]:
        """Models served over stage chains, and the recent pipeline runs (chain, per-stage timings, re-plans)."""
        gw.require_admin(request)
        assert gw.api.pipelines is not None
        found = gw.api.pipelines
        return {"models": found.models(), "runs": list(found.recent), "placements": list(found.placement.recent)}

    @app.get("/v1/decisions/{decision_id}")
    async def decision(decision_id: str, request: Request) -> dict[str, Any]:
        gw.require_admin(request)
        found = gw.decisions.get(decision_id)
        if found is None:
            raise APIError(404, f"No decision {decision_id}.", code="not_found")
        return found

    @app.get("/admin/nodes")
    async def nodes(request: Request) -> dict[str, Any]:
        gw.require_admin(request)
        return {"nodes": [gw.membership.describe(r) for r in gw.membership.nodes.values()]}

    @app.get("/admin/events")
    async def events(
        request: Request, kind: str | None = None, node_id: str | None = None, limit: Annotated[int, Query(ge=0)] = 100
    ) -> dict[str, Any]:
        gw.require_admin(request)
        gw.membership.flush_events()
        await asyncio.to_thread(gw.writer.flush, 5.0)
        found = await asyncio.to_thread(gw.store.list_events, kind=kind, node_id=node_id, limit=min(limit, 1000))
        return {"events": found}

    @app.get("/admin/settlement")
    async def settlement(request: Request) -> dict[str, Any]:
        gw.require_admin(request)
        await asyncio.to_thread(gw.writer.flush, 5.0)
        return await asyncio.to_thread(gw.store.settlement_report)

    @app.get("/admin/audits")
    async def audits(request: Request) -> dict[str, Any]:
        gw.require_admin(request)
        return gw.auditor.summary()

    @app.post("/admin/canary")
    async def canary(request: Request, node_id: str | None = None) -> dict[str, Any]:
        """Send one canary now (to `node_id`, else a random eligible node) and return its verdict."""
        gw.require_admin(request)
        result = await gw.canaries.once(node_id)
        if result is None:
            raise APIError(409, "no canary could be sent (no eligible node answered)", code="no_canary")
        return {**result.__dict__, "ok": result.ok}

    @app.get("/admin/cluster")
    async def cluster(request: Request) -> dict[str, Any]:
        """This gateway's id and, on a shared PostgreSQL database, how it keeps up with the other gateways."""
        gw.require_admin(request)
        if gw.cluster is None:
            return {"gateway_id": gw.config.name, "backend": gw.store.dialect, "shared": False}
        return {**gw.cluster.status(), "shared": True}

    @app.get("/admin/standby")
    async def standby(request: Request) -> dict[str, Any]:
        gw.require_admin(request)
        return gw.standby.status()

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(gw.metrics.registry), media_type=CONTENT_TYPE_LATEST)


__all__ = ["Gateway", "build_gateway_app"]
