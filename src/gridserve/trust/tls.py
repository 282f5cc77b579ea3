"""TLS between the gateway and its clients (nodes, the CLI, API clients).

The gateway serves HTTPS when given a certificate and its key (`gridserve gateway --tls-cert --tls-key`). Clients
verify it against the system's trust store, or against a CA file for a private grid (`--ca-file`, or the
GRIDSERVE_CA_FILE environment variable): verification is never turned off. A certificate that does not verify is a
configuration error, not a network hiccup: the node stops with one line saying so instead of retrying forever.
"""

import os
import ssl
from pathlib import Path

import httpx

CA_FILE_ENV = "GRIDSERVE_CA_FILE"


class TlsConfigError(ValueError):
    """A certificate, key or CA file that cannot be used (missing, unreadable, not PEM, key not matching)."""


def server_files(cert: Path | None, key: Path | None) -> tuple[Path, Path] | None:
    """The gateway's (certificate, key) pair, checked to load together; None when neither is given."""
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        raise TlsConfigError("--tls-cert and --tls-key go together: give both, or neither for plain HTTP")
    for what, path in (("--tls-cert", cert), ("--tls-key", key)):
        if not path.is_file():
            raise TlsConfigError(f"{what} {path}: no such file")
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as exc:
        raise TlsConfigError(f"--tls-cert {cert} with --tls-key {key}: cannot be used ({_reason(exc)})") from None
    return cert, key


def ca_file(given: Path | None = None) -> Path | None:
    """The CA file clients verify the gateway against: the one given, else $GRIDSERVE_CA_FILE, else None (the
    system's trust store)."""
    if given is not None:
        return given
    env = os.environ.get(CA_FILE_ENV)
    return Path(env) if env else None


def client_verify(given: Path | None = None) -> ssl.SSLContext | bool:
    """httpx's `verify=` for a client of the gateway: a context trusting only the CA file (see `ca_file`), or True
    (httpx's default trust store)."""
    path = ca_file(given)
    if path is None:
        return True
    if not path.is_file():
        raise TlsConfigError(f"CA file {path}: no such file")
    try:
        return ssl.create_default_context(cafile=str(path))
    except (ssl.SSLError, OSError) as exc:
        raise TlsConfigError(f"CA file {path}: not a PEM certificate ({_reason(exc)})") from None


def untrusted(exc: BaseException) -> str | None:
    """If `exc` (an httpx error, or what it wraps) is a TLS verification failure, one readable line saying what to
    do about it; None for any other error."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError):
            what = seen.verify_message or _reason(seen)
            return (
                f"its TLS certificate does not verify ({what}); if it is signed by a private CA, give that CA's "
                f"certificate with --ca-file or {CA_FILE_ENV}"
            )
        if isinstance(seen, ssl.SSLError) and "WRONG_VERSION_NUMBER" in str(seen):
            return "it does not speak TLS on that port (is the URL https:// for a plain-HTTP gateway?)"
        seen = seen.__cause__ or seen.__context__
    return None


def describe(exc: httpx.HTTPError) -> str:
    """One line for a failed call to the gateway: the TLS reason where there is one, else httpx's message."""
    return untrusted(exc) or str(exc) or type(exc).__name__


def _reason(exc: BaseException) -> str:
    return getattr(exc, "reason", None) or getattr(exc, "strerror", None) or str(exc)
