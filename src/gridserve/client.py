"""Clients that keep working when a gateway dies: httpx clients over several gateway URLs of one grid.

Give one to the official OpenAI SDK::

    from openai import OpenAI
    from gridserve.client import failover_client

    urls = ["http://gw-a:8000", "http://gw-b:8000"]
    client = OpenAI(base_url=urls[0] + "/v1", api_key=KEY, http_client=failover_client(urls))

Requests go to one gateway (the first that works) and stay there while it answers. When a request cannot reach it
(connection refused, reset, or closed before an answer came), that gateway is set aside for `cooldown_s` and the
request is sent again to the next one, so the caller sees no error. A completion whose gateway dies after its
answer began streaming is not re-sent (the caller already holds part of it); the SDK's error tells the caller.
Re-sending a completion whose first gateway died while generating runs it twice on the grid (it is paid once: the
dead gateway could not settle an answer it never delivered). A load balancer with health checks on `/health` does
the same job in front of clients that cannot take a custom HTTP client.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence

import httpx

FAILOVER_ERRORS: tuple[type[Exception], ...] = (
    httpx.ConnectError,
    httpx.ConnectTimeout,
    httpx.RemoteProtocolError,
    httpx.ReadError,
    httpx.WriteError,
)
"""Errors that say the gateway, not the request, failed (a refused, reset or dropped connection)."""


class NoGateway(httpx.TransportError):
    """Every gateway of the list failed this request."""


class Rotation:
    """Which gateway to use: the current one while it works; one that failed sits out `cooldown_s`."""

    def __init__(self, urls: Sequence[str], *, cooldown_s: float = 5.0, clock: Callable[[], float] = time.monotonic):
        if not urls:
            raise ValueError("no gateway URL given")
        self.origins = [httpx.URL(u.rstrip("/")) for u in urls]
        self.cooldown_s = cooldown_s
        self.clock = clock
        self.current = 0
        self._down_until = [0.0] * len(self.origins)
        self._lock = threading.Lock()

    def order(self) -> list[int]:
        """Indices to try: from the current one on, those not cooling down first, then the rest."""
        now = self.clock()
        with self._lock:
            ring = [(self.current + k) % len(self.origins) for k in range(len(self.origins))]
            return [i for i in ring if self._down_until[i] <= now] + [i for i in ring if self._down_until[i] > now]

    def failed(self, index: int) -> None:
        with self._lock:
            self._down_until[index] = self.clock() + self.cooldown_s
            if index == self.current:
                self.current = (index + 1) % len(self.origins)

    def worked(self, index: int) -> None:
        with self._lock:
            self._down_until[index] = 0.0
            self.current = index

    def retarget(self, request: httpx.Request, index: int) -> httpx.Request:
        """The same request sent to gateway `index` (scheme, host and port replaced; path kept)."""
        origin = self.origins[index]
        url = request.url.copy_with(scheme=origin.scheme, host=origin.host, port=origin.port)
        headers = request.headers.copy()
        headers["host"] = url.netloc.decode("ascii")
        return httpx.Request(
            request.method, url, headers=headers, content=request.content, extensions=request.extensions
        )


class FailoverTransport(httpx.BaseTransport):
    def __init__(self, urls: Sequence[str], *, cooldown_s: float = 5.0, inner: httpx.BaseTransport | None = None):
        self.rotation = Rotation(urls, cooldown_s=cooldown_s)
        self.inner = inner or httpx.HTTPTransport()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        request.read()
        errors: list[str] = []
        for index in self.rotation.order():
            try:
                response = self.inner.handle_request(self.rotation.retarget(request, index))
            except FAILOVER_ERRORS as exc:
                self.rotation.failed(index)
                errors.append(f"{self.rotation.origins[index]}: {type(exc).__name__}")
                continue
            self.rotation.worked(index)
            return response
        raise NoGateway("no gateway answered: " + "; ".join(errors), request=request)

    def close(self) -> None:
        self.inner.close()


class AsyncFailoverTransport(httpx.AsyncBaseTransport):
    def __init__(
        self, urls: Sequence[str], *, cooldown_s: float = 5.0, inner: httpx.AsyncBaseTransport | None = None
    ) -> None:
        self.rotation = Rotation(urls, cooldown_s=cooldown_s)
        self.inner = inner or httpx.AsyncHTTPTransport()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        await request.aread()
        errors: list[str] = []
        for index in self.rotation.order():
            try:
                response = await self.inner.handle_async_request(self.rotation.retarget(request, index))
            except FAILOVER_ERRORS as exc:
                self.rotation.failed(index)
                errors.append(f"{self.rotation.origins[index]}: {type(exc).__name__}")
                continue
            self.rotation.worked(index)
            return response
        raise NoGateway("no gateway answered: " + "; ".join(errors), request=request)

    async def aclose(self) -> None:
        await self.inner.aclose()


def failover_client(urls: Sequence[str], *, cooldown_s: float = 5.0, timeout_s: float = 600.0) -> httpx.Client:
    """An httpx client (for `OpenAI(http_client=...)`) that moves to the next gateway when one fails."""
    return httpx.Client(transport=FailoverTransport(urls, cooldown_s=cooldown_s), timeout=timeout_s)


def async_failover_client(
    urls: Sequence[str], *, cooldown_s: float = 5.0, timeout_s: float = 600.0
) -> httpx.AsyncClient:
    """The same for `AsyncOpenAI(http_client=...)`."""
    return httpx.AsyncClient(transport=AsyncFailoverTransport(urls, cooldown_s=cooldown_s), timeout=timeout_s)


__all__ = [
    "AsyncFailoverTransport",
    "FailoverTransport",
    "NoGateway",
    "Rotation",
    "async_failover_client",
    "failover_client",
]
