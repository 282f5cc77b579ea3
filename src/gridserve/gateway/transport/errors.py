"""The one error tree of the node transport. Whatever library carries the bytes, the gateway sees only these:

    TransportError                 anything that went wrong between the gateway and a node
     ├── Unreachable               no reply: the connection could not be opened, or broke before the node answered
     ├── Refused(status, message)  the node answered with an error status (400: the request itself was refused)
     ├── Timeout                   no reply within the deadline the caller gave (probes, loads, stage steps)
     ├── BrokenStream              a reply under way broke off (reset, disconnect, truncated body)
     └── Malformed                 the node sent something that is not a JSON object per line

Every error keeps the name of the foreign exception it replaced in `cause` (empty when there was none), for
messages and logs: "unreachable (ClientConnectorError)". `map_errors` is the boundary that translates, as
httpx's `map_httpcore_exceptions` does; a transport wraps every call into its library in it.
"""

import contextlib
from collections.abc import Iterator
from typing import Literal

import aiohttp
import orjson

Phase = Literal["open", "read"]
"""`open`: before the node's reply began (a broken connection means it was never reached); `read`: while it
is being read (a broken connection breaks the stream)."""


class TransportError(Exception):
    """Something went wrong between the gateway and a node; `cause` names the foreign exception replaced."""

    def __init__(self, detail: str, *, cause: str = "") -> None:
        super().__init__(detail)
        self.detail = detail
        self.cause = cause

    @property
    def why(self) -> str:
        """The shortest useful name for logs and failure details: the foreign exception, else the detail."""
        return self.cause or self.detail


class Unreachable(TransportError):
    """No reply: the node could not be connected to, or the connection broke before it answered."""


class Refused(TransportError):
    """The node answered with an error status; `message` is its own explanation (or the start of its body)."""

    def __init__(self, status: int, message: str, *, body: str = "") -> None:
        super().__init__(f"answered {status}: {message}")
        self.status = status
        self.message = message
        self.body = body
        """The start of the reply body, as sent (for logs)."""


class Timeout(TransportError):
    """No reply within the deadline the caller gave."""


class BrokenStream(TransportError):
    """A reply under way broke off: the connection was reset or closed, or the body was cut short."""


class Malformed(TransportError):
    """The node sent something that is not one JSON object per line."""


REFUSAL_CHARS = 300
"""How much of an error reply is kept for messages."""


def refusal(status: int, text: str) -> Refused:
    """A node's error reply as Refused: its own `error.message` when the body is the node's JSON error."""
    body = text[:REFUSAL_CHARS]
    try:
        reply = orjson.loads(text)
    except orjson.JSONDecodeError:
        return Refused(status, body, body=body)
    error = reply.get("error") if isinstance(reply, dict) else None
    message = error.get("message") if isinstance(error, dict) else None
    return Refused(status, str(message) if message is not None else body, body=body)


def translate(exc: BaseException, phase: Phase) -> TransportError | None:
    """The tree's error for a foreign exception raised in `phase`; None for what is not a transport failure
    (a bug, a cancellation), which the caller lets through unchanged."""
    if isinstance(exc, TransportError) or not isinstance(exc, Exception):
        return None
    name = type(exc).__name__
    if isinstance(exc, TimeoutError):  # before OSError: aiohttp's timeouts are both
        return Timeout(str(exc) or "timed out", cause=name)
    if isinstance(exc, aiohttp.ClientResponseError):
        return Refused(exc.status, exc.message)
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):  # a configuration error: say what to do
        error = exc.certificate_error
        reason = getattr(error, "verify_message", "") or str(error)
        return Unreachable(
            f"the node's TLS certificate does not verify ({reason}); a private CA's certificate goes to the "
            "gateway's --node-ca-file",
            cause="TLS certificate does not verify",
        )
    if isinstance(exc, (aiohttp.ClientError, OSError)):
        kind = Unreachable if phase == "open" else BrokenStream
        return kind(str(exc) or name, cause=name)
    if isinstance(exc, ValueError) and phase == "read":
        # a line that is not JSON (orjson.JSONDecodeError), or longer than the reader takes ("Chunk too big")
        return Malformed(str(exc), cause=name)
    return None


@contextlib.contextmanager
def map_errors(phase: Phase) -> Iterator[None]:
    """The boundary around calls into the HTTP library: foreign exceptions leave it translated."""
    try:
        yield
    except Exception as exc:
        mapped = translate(exc, phase)
        if mapped is None:
            raise
        raise mapped from exc


__all__ = [
    "REFUSAL_CHARS",
    "BrokenStream",
    "Malformed",
    "Phase",
    "Refused",
    "Timeout",
    "TransportError",
    "Unreachable",
    "map_errors",
    "refusal",
    "translate",
]
