"""Errors in OpenAI's format: `{"error": {"message", "type", "param", "code"}}`."""

from typing import Any

import orjson
from starlette.responses import Response


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        type_: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.code = code
        self.param = param
        self.headers: list[tuple[bytes, bytes]] = []
        """Sent with the error (a rate limit's Retry-After and x-ratelimit-*)."""

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> Response:
        headers = {k.decode(): v.decode() for k, v in self.headers}
        return Response(orjson.dumps(self.body()), self.status, headers, media_type="application/json")


def unauthorized(message: str = "Missing or invalid API key. Send 'Authorization: Bearer <key>'.") -> APIError:
    return APIError(401, message, code="invalid_api_key")


def model_not_found(model: str) -> APIError:
    return APIError(
        404, f"The model '{model}' does not exist or no live node serves it.", code="model_not_found", param="model"
    )


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param, code="invalid_request")


def unsupported_parameter(param: str, what: str, *, by_no_node: bool = False) -> APIError:
    """`by_no_node`: gridserve offers it, but no live node serving the model honours it."""
    who = "no live node serving it honours" if by_no_node else "gridserve does not offer yet"
    return APIError(
        400,
        f"Unsupported parameter: '{param}' asks for {what}, which {who}. Send the request without it (or with "
        f"its default).",
        param=param,
        code="unsupported_parameter",
    )


def no_capacity(message: str) -> APIError:
    return APIError(503, message, type_="service_unavailable", code="no_eligible_node")


def upstream_failed(message: str) -> APIError:
    return APIError(502, message, type_="api_error", code="node_failed")


def json_object(body: bytes) -> dict[str, Any]:
    """A request body as the JSON object every API route takes, or a 400 saying what it is instead."""
    try:
        raw = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise bad_request(f"Request body is not valid JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise bad_request("Request body must be a JSON object.")
    return raw
