"""The gateway's OpenAPI document (`GET /openapi.json`), complete and truthful.

FastAPI documents the routes it serves, but it cannot see everything the gateway answers:

- the raw-ASGI `HotPath` (gateway/api/hotpath.py) serves `POST /v1/chat/completions` and `POST /v1/completions`
  before FastAPI: their operations are added here, for documentation only (nothing here handles a request);
- routes that read their body themselves (`/nodes/*`: signed envelopes; the admin node actions);
- the bearer schemes: an API key for the OpenAI routes, the admin token for the admin routes;
- the error answers: OpenAI's format (gateway/api/errors.py, the 413 of gateway/api/middleware.py) with the statuses
  each operation can give, and the node protocol's refusals (`{"error": {"type", "message"}}`);
- request validation answers 400 (app.py's handler), not FastAPI's 422;
- the shapes of the `dict` answers, and the media types of `/metrics` and of streamed completions.

`install_openapi(app)` makes `app.openapi()` build FastAPI's document and complete it from the tables here.
An operation missing from the tables (a route added later) still gets its security and error answers from
its path: `/admin/...` needs the admin token.
"""

import copy
import json
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Literal

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import models_json_schema

import gridserve
from gridserve.gateway.api.anthropic_api import CountTokensRequest, MessagesRequest
from gridserve.gateway.api.embeddings_api import EmbeddingRequest
from gridserve.gateway.api.keys_api import KeyRequest
from gridserve.gateway.api.responses_api import ResponsesRequest
from gridserve.gateway.api.schemas import ChatCompletionRequest, CompletionRequest
from gridserve.gateway.api.tokens_api import TokenRequest
from gridserve.reliability import ReliabilityState
from gridserve.types import HeartbeatPayload, NodeState, RegisterPayload, RegisterReply

REF = "#/components/schemas/{model}"
DESCRIPTION = (
    "OpenAI-compatible inference over a grid of GPU nodes (API key), the admin API (admin token), and the node"
    " protocol (Ed25519-signed envelopes)."
)


class Auth(StrEnum):
    NONE = "none"
    API_KEY = "apiKey"
    ADMIN = "adminToken"


# -- documentation models (never validate anything: they describe what the gateway sends) -------------------


class Doc(BaseModel):
    model_config = ConfigDict(extra="allow")


class ErrorDetail(Doc):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(Doc):
    """OpenAI's error format."""

    error: ErrorDetail


class RefusalDetail(Doc):
    type: str = Field(
        description="why: malformed, unsigned, bad_signature, wrong_signer, expired, ... (trust/errors.py)"
    )
    message: str


class Refusal(Doc):
    """A refused node message."""

    error: RefusalDetail


class SignatureParams(BaseModel):
    """Covers the canonical JSON of the payload and every parameter but `signature` (trust/envelope.py)."""

    keyid: str = Field(description="the signer's Ed25519 public key, base64")
    alg: Literal["ed25519"]
    purpose: str
    created: float = Field(description="unix seconds")
    expires: float = Field(description="unix seconds; at most the verifier's max lifetime after `created`")
    nonce: str
    signature: str = Field(description="base64")


class RegisterEnvelope(BaseModel):
    """A registration, signed by the node's key (purpose `register`)."""

    payload: RegisterPayload
    sig: SignatureParams


class HeartbeatEnvelope(BaseModel):
    """A heartbeat, signed by the node's key (purpose `heartbeat`)."""

    payload: HeartbeatPayload
    sig: SignatureParams


class RegisterReplyEnvelope(Doc):
    """The gateway's reply, signed by the gateway's key (purpose `register-reply`)."""

    payload: RegisterReply
    sig: SignatureParams


class HeartbeatAck(Doc):
    ok: Literal[True]


class Health(Doc):
    status: Literal["ok"]
    nodes_live: int
    gateway_public_key: str


class ModelCard(Doc):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    nodes: int
    emulated: bool
    tasks: list[Literal["embed", "generate"]]
    """What live nodes serve the model for: `generate` (chat and text completions, Responses, Messages), `embed`
    (`POST /v1/embeddings`)."""
    pipeline: bool = False


class ModelList(Doc):
    object: Literal["list"]
    data: list[ModelCard]


class PromptTokensDetails(Doc):
    cached_tokens: int
    """Prompt tokens the node reused from its prefix cache (KV cache of an earlier prompt) instead of computing."""


class Usage(Doc):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class Explanation(Doc):
    """Request option `gridserve.explain`: why this node (`n` > 1: the first choice's, and each choice's in
    `choices`)."""

    decision_id: str
    served_by: str
    explanation: str
    choices: list[dict[str, Any]] | None = None


class FunctionCall(Doc):
    name: str
    arguments: str
    """The arguments as a JSON object's text, valid under the tool's parameters."""


class ToolCallDoc(Doc):
    id: str
    type: Literal["function"]
    function: FunctionCall


class AssistantMessage(Doc):
    role: Literal["assistant"]
    content: str | None
    """None when the answer is tool calls."""
    tool_calls: list[ToolCallDoc] | None = None


class TopLogprob(Doc):
    token: str
    logprob: float
    """The model's own log-probability (-9999 for a token it cannot produce)."""
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(Doc):
    content: list[TokenLogprob] | None


class TextLogprobs(Doc):
    """The text completions' shape (request `logprobs`: how many alternatives)."""

    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class ChatChoice(Doc):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None
    """With request `logprobs`: each token's."""
    finish_reason: str


class ChatCompletion(Doc):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    gridserve: Explanation | None = None


class TextChoice(Doc):
    index: int
    text: str
    logprobs: TextLogprobs | None
    finish_reason: str


class TextCompletion(Doc):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[TextChoice]
    usage: Usage
    gridserve: Explanation | None = None


class ResponseUsage(Doc):
    input_tokens: int
    input_tokens_details: dict[str, int]
    output_tokens: int
    output_tokens_details: dict[str, int]
    total_tokens: int


class ResponseObject(Doc):
    """OpenAI's Response (the Responses API): `output` holds a `message` item (its `output_text` parts) or
    `function_call` items."""

    id: str
    object: Literal["response"]
    created_at: int
    status: Literal["completed", "incomplete", "failed", "in_progress"]
    error: dict[str, Any] | None
    incomplete_details: dict[str, Any] | None
    model: str
    output: list[dict[str, Any]]
    previous_response_id: str | None
    store: bool
    metadata: dict[str, str]
    usage: ResponseUsage | None
    gridserve: Explanation | None = None


class InputItemList(Doc):
    """A stored response's input items: `message` items (`input_text` parts; an assistant turn's `output_text`),
    `function_call` and `function_call_output` items; newest first unless `order=asc`."""

    object: Literal["list"]
    data: list[dict[str, Any]]
    first_id: str | None
    last_id: str | None
    has_more: bool


class ResponseDeleted(Doc):
    id: str
    object: Literal["response"]
    deleted: Literal[True]


class AnthropicUsage(Doc):
    input_tokens: int = Field(description="prompt tokens not read from the node's prefix cache")
    output_tokens: int
    cache_read_input_tokens: int = Field(description="prompt tokens the node reused from its prefix cache")
    cache_creation_input_tokens: int


class AnthropicMessage(Doc):
    """Anthropic's Message (`POST /v1/messages`): `content` holds a `text` block and/or `tool_use` blocks
    (`{type, id, name, input}`). `stop_sequence` is the request's stop sequence that ended the answer where the node
    named it (`stop_reason` `stop_sequence`), else null."""

    id: str
    type: Literal["message"]
    role: Literal["assistant"]
    model: str
    content: list[dict[str, Any]]
    stop_reason: Literal["end_turn", "max_tokens", "stop_sequence", "tool_use"]
    stop_sequence: str | None
    usage: AnthropicUsage
    gridserve: Explanation | None = None


class AnthropicTokenCount(Doc):
    """Anthropic's token count (`POST /v1/messages/count_tokens`)."""

    input_tokens: int = Field(
        description="the prompt's tokens as a node serving the model counts them (its chat template, the tools "
        "described): what a Messages request with this input would be given as input tokens, cached or not"
    )


class AnthropicErrorDetail(Doc):
    type: str = Field(description="invalid_request_error, authentication_error, not_found_error, api_error, ...")
    message: str


class AnthropicError(Doc):
    """Anthropic's error format (`/v1/messages`)."""

    type: Literal["error"]
    error: AnthropicErrorDetail


class EmbeddingItem(Doc):
    object: Literal["embedding"]
    index: int = Field(description="the input's position")
    embedding: list[float] | str = Field(
        description="the vector; `encoding_format: base64`: its float32, little-endian"
    )


class EmbeddingUsage(Doc):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(Doc):
    """OpenAI's embeddings answer: one vector per input, in the inputs' order."""

    object: Literal["list"]
    data: list[EmbeddingItem]
    model: str
    usage: EmbeddingUsage


class NodeView(Doc):
    node_id: str
    state: NodeState
    endpoint: str
    engine: str
    models: list[dict[str, Any]]
    hardware: dict[str, Any]
    telemetry: dict[str, Any] | None


class NodeList(Doc):
    nodes: list[NodeView]


class StoredEvent(Doc):
    id: int
    kind: str
    severity: str
    node_id: str | None
    detail: Any
    at: float


class EventList(Doc):
    events: list[StoredEvent]


class Settlement(Doc):
    totals: list[dict[str, Any]]
    disputed: list[dict[str, Any]]


class AuditSummary(Doc):
    audited: int
    failed: int
    proof_checked: int
    recent: list[dict[str, Any]]


class CanaryVerdict(Doc):
    node_id: str
    request_id: str
    problems: list[str]
    proof_checked: bool
    ok: bool


class StandbyStatus(Doc):
    standby_per_model: int
    node_concurrency: int
    models: list[dict[str, Any]]


class PipelineOverview(Doc):
    models: list[Any]
    runs: list[dict[str, Any]]
    placements: list[Any]


class DecisionRecord(Doc):
    decision_id: str
    request_id: str
    model: str
    status: str
    explanation: str


class IncidentLog(Doc):
    incidents: list[dict[str, Any]]
    transitions: list[dict[str, Any]]


class NodeAction(Doc):
    transitions: list[dict[str, Any]]
    state: ReliabilityState


class DoctorReport(Doc):
    generated_at: float
    window_s: float
    nodes: list[dict[str, Any]]
    pipelines: list[dict[str, Any]]


class SeriesReport(Doc):
    generated_at: float
    window_s: float
    bucket_s: float
    series: list[dict[str, Any]]


class ClusterStatus(Doc):
    gateway_id: str
    backend: str
    shared: bool


class JoinToken(Doc):
    """A join token as listed: never the token itself (the gateway keeps its SHA-256 digest only)."""

    id: str
    label: str
    created_at: float
    expires_at: float | None
    uses: int
    uses_left: int
    node_ids: list[str] = Field(description="the node identities it admitted")
    status: Literal["active", "used", "expired", "revoked"]
    revoked_at: float | None


class NewJoinToken(JoinToken):
    token: str = Field(description="the token (`gsj_<id>.<secret>`), shown this once")


class JoinTokenList(Doc):
    tokens: list[JoinToken]


class ApiKeyView(Doc):
    """An API key as listed: its limits and status, never the key itself (the gateway keeps its SHA-256 digest)."""

    id: str
    name: str
    created_at: float
    revoked_at: float | None
    status: Literal["active", "revoked"]
    rpm: int | None
    tpm: int | None
    max_concurrency: int | None
    budget_usd: float | None
    models: list[str] | None
    tiers: list[str] | None
    priority: Literal["interactive", "standard", "batch"]


class NewApiKey(ApiKeyView):
    key: str = Field(description="the key (`gsk_<id>.<secret>`), shown this once")


class ApiKeyList(Doc):
    keys: list[ApiKeyView]


class UsageReport(Doc):
    """Per key: `served_here` (requests, tokens, spend, errors, refusals by code, TTFT p50/p99 on this gateway) and
    `cluster` (this minute's requests and tokens, spend and requests in flight across the gateways)."""

    keys: list[dict[str, Any]]


class AdminReason(BaseModel):
    """Why (recorded with the action)."""

    model_config = ConfigDict(extra="forbid")
    reason: str = Field(min_length=1, max_length=2000)


class AdminIncident(AdminReason):
    severity: Literal["minor", "severe"] = "minor"


# -- the operations -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Op:
    """What FastAPI cannot tell about one operation."""

    auth: Auth
    errors: tuple[int, ...]
    answer: type[BaseModel] | None = None
    """The 200 body (application/json)."""
    body: type[BaseModel] | None = None
    """The request body, for routes that read it themselves."""


COMPLETION_ERRORS = (400, 401, 403, 404, 413, 429, 502, 503)
"""403: a model or tier the key may not use; 429: over one of the key's limits (gateway/tenancy/)."""
NODE_ACTION_ERRORS = (400, 401, 404, 413)
OPS: dict[tuple[str, str], Op] = {
    ("post", "/v1/chat/completions"): Op(Auth.API_KEY, COMPLETION_ERRORS, ChatCompletion, ChatCompletionRequest),
    ("post", "/v1/completions"): Op(Auth.API_KEY, COMPLETION_ERRORS, TextCompletion, CompletionRequest),
    ("post", "/v1/responses"): Op(Auth.API_KEY, COMPLETION_ERRORS, ResponseObject, ResponsesRequest),
    ("get", "/v1/responses/{response_id}"): Op(Auth.API_KEY, (400, 401, 404), ResponseObject),
    ("get", "/v1/responses/{response_id}/input_items"): Op(Auth.API_KEY, (400, 401, 404), InputItemList),
    ("post", "/v1/responses/{response_id}/cancel"): Op(Auth.API_KEY, (400, 401, 404), ResponseObject),
    ("delete", "/v1/responses/{response_id}"): Op(Auth.API_KEY, (400, 401, 404), ResponseDeleted),
    ("post", "/v1/messages"): Op(Auth.API_KEY, COMPLETION_ERRORS, AnthropicMessage, MessagesRequest),
    ("post", "/v1/messages/count_tokens"): Op(Auth.API_KEY, COMPLETION_ERRORS, AnthropicTokenCount, CountTokensRequest),
    ("post", "/v1/embeddings"): Op(Auth.API_KEY, COMPLETION_ERRORS, EmbeddingList, EmbeddingRequest),
    ("get", "/v1/models"): Op(Auth.API_KEY, (401,), ModelList),
    ("get", "/health"): Op(Auth.NONE, (), Health),
    ("get", "/metrics"): Op(Auth.NONE, ()),
    ("post", "/nodes/register"): Op(Auth.NONE, (401, 413, 429), RegisterReplyEnvelope, RegisterEnvelope),
    ("post", "/nodes/heartbeat"): Op(Auth.NONE, (401, 404, 413), HeartbeatAck, HeartbeatEnvelope),
    ("get", "/v1/decisions/{decision_id}"): Op(Auth.ADMIN, (401, 404), DecisionRecord),
    ("get", "/admin/nodes"): Op(Auth.ADMIN, (401,), NodeList),
    ("get", "/admin/events"): Op(Auth.ADMIN, (400, 401), EventList),
    ("get", "/admin/settlement"): Op(Auth.ADMIN, (401,), Settlement),
    ("get", "/admin/audits"): Op(Auth.ADMIN, (401,), AuditSummary),
    ("post", "/admin/canary"): Op(Auth.ADMIN, (401, 409, 413), CanaryVerdict),
    ("get", "/admin/standby"): Op(Auth.ADMIN, (401,), StandbyStatus),
    ("get", "/admin/pipelines"): Op(Auth.ADMIN, (401,), PipelineOverview),
    ("get", "/admin/incidents"): Op(Auth.ADMIN, (400, 401), IncidentLog),
    ("get", "/admin/doctor"): Op(Auth.ADMIN, (400, 401, 404), DoctorReport),
    ("get", "/admin/series"): Op(Auth.ADMIN, (400, 401), SeriesReport),
    ("get", "/admin/cluster"): Op(Auth.ADMIN, (401,), ClusterStatus),
    ("post", "/admin/tokens"): Op(Auth.ADMIN, (400, 401, 413), NewJoinToken, TokenRequest),
    ("get", "/admin/tokens"): Op(Auth.ADMIN, (401,), JoinTokenList),
    ("delete", "/admin/tokens/{token_id}"): Op(Auth.ADMIN, (401, 404), JoinToken),
    ("post", "/admin/keys"): Op(Auth.ADMIN, (400, 401, 413), NewApiKey, KeyRequest),
    ("get", "/admin/keys"): Op(Auth.ADMIN, (401,), ApiKeyList),
    ("delete", "/admin/keys/{key_id}"): Op(Auth.ADMIN, (401, 404), ApiKeyView),
    ("get", "/admin/usage"): Op(Auth.ADMIN, (401,), UsageReport),
    ("post", "/admin/keys/{key_id}/rotate"): Op(Auth.ADMIN, (401, 404), NewApiKey),
    ("get", "/dashboard"): Op(Auth.NONE, ()),
    ("get", "/dashboard/{name}"): Op(Auth.NONE, (404,)),
    ("post", "/admin/nodes/{node_id}/incident"): Op(Auth.ADMIN, NODE_ACTION_ERRORS, NodeAction, AdminIncident),
    ("post", "/admin/nodes/{node_id}/quarantine"): Op(Auth.ADMIN, NODE_ACTION_ERRORS, NodeAction, AdminReason),
    ("post", "/admin/nodes/{node_id}/release"): Op(Auth.ADMIN, (*NODE_ACTION_ERRORS, 409), NodeAction, AdminReason),
}
HOT_PATH = {
    ("post", "/v1/chat/completions"): "Chat completion (OpenAI-compatible); `stream: true` answers server-sent events.",
    ("post", "/v1/completions"): "Text completion (OpenAI-compatible); `stream: true` answers server-sent events.",
    ("post", "/v1/responses"): "A model response (OpenAI's Responses API), stored unless `store: false`; "
    "`stream: true` answers its `response.*` server-sent events.",
    ("post", "/v1/messages"): "A message (Anthropic's Messages API; the key as `x-api-key` or a bearer token, "
    "`anthropic-version` accepted); `stream: true` answers Anthropic's server-sent events.",
    ("post", "/v1/messages/count_tokens"): "The input tokens of a Messages request (Anthropic's token count): a node "
    "serving the model counts them as it reads them, by answering the input with one greedy token (charged as "
    "one generated token; its prefix cache then holds the conversation).",
}
UNSTREAMED = frozenset({"/v1/messages/count_tokens"})
"""Hot-path routes that answer JSON only."""
"""Served by gateway/api/hotpath.py, never by a FastAPI route: documented from here."""
ERROR_MODELS: dict[str, type[BaseModel]] = {
    "/v1/messages": AnthropicError,
    "/v1/messages/count_tokens": AnthropicError,
}
"""Routes whose errors are in another API's format than OpenAI's."""
PAGES: dict[str, dict[str, Any]] = {
    "/dashboard": {
        "operationId": "dashboard_page",
        "summary": "The operator dashboard (a static page; it asks for the admin token and calls the admin API).",
        "responses": {"200": {"description": "OK", "content": {"text/html": {"schema": {"type": "string"}}}}},
    },
    "/dashboard/{name}": {
        "operationId": "dashboard_asset",
        "summary": "A dashboard asset (script or style sheet).",
        "parameters": [{"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}],
        "responses": {
            "200": {
                "description": "OK",
                "content": {
                    "text/javascript": {"schema": {"type": "string"}},
                    "text/css": {"schema": {"type": "string"}},
                },
            },
        },
    },
}
"""Pages FastAPI leaves out of its document (`include_in_schema=False`): documented from here when served."""
PARAM_BOUNDS: dict[tuple[str, str], dict[str, Any]] = {
    ("/admin/doctor", "window_s"): {"exclusiveMinimum": 0, "maximum": 86_400},
    ("/admin/series", "window_s"): {"exclusiveMinimum": 0, "maximum": 86_400},
    ("/admin/series", "bucket_s"): {"exclusiveMinimum": 0, "maximum": 86_400},
}
"""Query bounds a route checks itself (400 outside them)."""
ERROR_WORDS = {
    400: "Invalid request (body, parameter or JSON).",
    401: "Missing or invalid credentials, or (node routes) a message that fails a trust check, or a registration"
    " without a valid join token (`X-Gridserve-Join-Token`) on a gateway that requires one (`join_token`).",
    404: "Not found (model, node, decision, join token, stored response), or (heartbeat) a node that has not"
    " registered.",
    409: "Conflict (no canary could be sent: no eligible node; a banned node cannot be released).",
    413: "Request body over the gateway's limit (--max-body-bytes; a registration: 64 KiB).",
    429: "Too many registrations from this address or in all right now; retry after `Retry-After` seconds.",
    502: "The node failed.",
    503: "No node can serve the request now.",
}
SECURITY_SCHEMES = {
    Auth.API_KEY.value: {"type": "http", "scheme": "bearer", "description": "An API key (`--api-key`)."},
    Auth.ADMIN.value: {"type": "http", "scheme": "bearer", "description": "The admin token (`--admin-token`)."},
}
SSE_EVENT = {
    "type": "object",
    "description": "One server-sent event (`stream: true`); OpenAPI 3.1 reads `schema` of an event stream per event.",
    "required": ["data"],
    "properties": {
        "data": {
            "type": "string",
            "description": 'A JSON chunk (`chat.completion.chunk` or `text_completion`), an `{"error": ...}` object '
            "if the generation fails mid-stream, or `[DONE]` last; on /v1/responses one `response.*` event (named "
            "by `event`), `response.completed`, `response.incomplete` or `response.failed` last.",
        },
        "event": {"type": "string"},
    },
}
SSE_EVENTS: dict[str, dict[str, Any]] = {
    "/v1/messages": {
        "type": "object",
        "description": "One of Anthropic's server-sent events: message_start, content_block_start, "
        "content_block_delta (text_delta or input_json_delta), content_block_stop, message_delta, message_stop last; "
        "error if the generation fails mid-stream.",
        "required": ["event", "data"],
        "properties": {"event": {"type": "string"}, "data": {"type": "string", "description": "its JSON"}},
    },
}
"""Hot-path routes whose events are not OpenAI's chunks (SSE_EVENT)."""
DECISION_HEADERS = {
    "x-gridserve-decision": {"required": True, "schema": {"type": "string"}, "description": "GET /v1/decisions/{id}"},
    "x-gridserve-node": {"required": True, "schema": {"type": "string"}, "description": "the node(s) that served"},
}


def _component_schemas() -> dict[str, Any]:
    requests = {op.body for op in OPS.values() if op.body is not None}
    errors: set[type[BaseModel]] = {ErrorResponse, Refusal, *ERROR_MODELS.values()}
    answers = errors | {op.answer for op in OPS.values() if op.answer is not None}
    pairs: list[tuple[type[BaseModel], Literal["validation", "serialization"]]] = []
    pairs += [(model, "validation") for model in sorted(requests, key=lambda m: m.__name__)]
    pairs += [(model, "serialization") for model in sorted(answers, key=lambda m: m.__name__)]
    _, top = models_json_schema(pairs, ref_template=REF)
    return dict(top.get("$defs", {}))


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": REF.format(model=model.__name__)}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _auth_of(method: str, path: str) -> Auth:
    op = OPS.get((method, path))
    if op is not None:
        return op.auth
    return Auth.ADMIN if path.startswith("/admin/") else Auth.NONE


def _errors_of(method: str, path: str, operation: dict[str, Any]) -> tuple[int, ...]:
    op = OPS.get((method, path))
    if op is not None:
        return op.errors
    found = {401} if _auth_of(method, path) is not Auth.NONE else set()
    if operation.get("parameters") or operation.get("requestBody"):
        found.add(400)
    if method in ("post", "put", "patch"):
        found.add(413)
    return tuple(sorted(found))


def _error_response(status: int, path: str) -> dict[str, Any]:
    model = Refusal if path.startswith("/nodes/") and status != 413 else ERROR_MODELS.get(path, ErrorResponse)
    return {"description": ERROR_WORDS.get(status, "Error."), "content": _json(_ref(model))}


def _complete(method: str, path: str, operation: dict[str, Any]) -> None:
    op = OPS.get((method, path))
    responses: dict[str, Any] = operation.setdefault("responses", {})
    responses.pop("422", None)  # app.py answers validation errors with 400 in OpenAI's format
    auth = _auth_of(method, path)
    operation["security"] = [{auth.value: []}] if auth is not Auth.NONE else []
    for status in _errors_of(method, path, operation):
        responses[str(status)] = _error_response(status, path)
    if op is not None and op.body is not None:
        operation["requestBody"] = {"required": True, "content": _json(_ref(op.body))}
    if op is not None and op.answer is not None:  # the JSON answer; other media types (a stream) stay
        ok = responses.setdefault("200", {"description": "OK"})
        ok["content"] = {**ok.get("content", {}), **_json(_ref(op.answer))}
    for param in operation.get("parameters", []):
        param["schema"].update(PARAM_BOUNDS.get((path, param["name"]), {}))


def _hot_path_operation(method: str, path: str, summary: str) -> dict[str, Any]:
    answer = (
        {"text/event-stream": {"schema": SSE_EVENTS.get(path, SSE_EVENT)}} if path not in UNSTREAMED else {}
    )  # the JSON answer: from OPS, as for any route
    return {
        "summary": summary,
        "description": "Served by the gateway's raw-ASGI hot path (gateway/api/hotpath.py); documented here.",
        "operationId": path.strip("/").replace("/", "_") + "_" + method,
        "responses": {"200": {"description": "OK", "headers": DECISION_HEADERS, "content": answer}},
    }


def _drop_unused(components: dict[str, Any], doc: dict[str, Any]) -> None:
    """Remove component schemas nothing refers to (FastAPI's 422 models, once the 422s are gone)."""
    schemas: dict[str, Any] = components.get("schemas", {})
    while True:
        text = json.dumps(doc)
        unused = [name for name in schemas if f'"{REF.format(model=name)}"' not in text]
        if not unused:
            return
        for name in unused:
            del schemas[name]


def complete_document(doc: dict[str, Any], served: frozenset[str] = frozenset()) -> dict[str, Any]:
    """Add the hot-path operations (and the pages in `served` that FastAPI leaves out), security, error answers
    and answer shapes to FastAPI's document."""
    paths: dict[str, dict[str, Any]] = doc.setdefault("paths", {})
    for (method, path), summary in HOT_PATH.items():
        paths.setdefault(path, {})[method] = _hot_path_operation(method, path, summary)
    for path, page in PAGES.items():
        if path in served:
            paths.setdefault(path, {})["get"] = copy.deepcopy(page)
    for path, item in paths.items():
        for method, operation in item.items():
            _complete(method, path, operation)
    paths["/metrics"]["get"]["responses"]["200"]["content"] = {"text/plain": {"schema": {"type": "string"}}}
    components = doc.setdefault("components", {})
    components.setdefault("schemas", {}).update(_component_schemas())
    components["securitySchemes"] = SECURITY_SCHEMES
    _drop_unused(components, doc)
    return doc


def install_openapi(app: FastAPI) -> None:
    """Make `app.openapi()` (served at `/openapi.json`) return the completed document, built once."""
    built: dict[str, Any] = {}

    def openapi() -> dict[str, Any]:
        if not built:
            doc = get_openapi(
                title=app.title, version=gridserve.__version__, routes=app.routes, description=DESCRIPTION
            )
            served = frozenset(str(getattr(route, "path", "")) for route in app.routes)
            built.update(complete_document(doc, served))
        return built

    setter: Callable[[], dict[str, Any]] = openapi
    app.openapi = setter  # type: ignore[method-assign]


__all__ = ["complete_document", "install_openapi"]
