"""TLS settings checked before anything starts (trust/tls.py): a certificate and key that do not load, a CA file that
is not one, and the one line a verification failure becomes. No sockets (tests/grid/test_tls.py runs HTTPS)."""

import ssl
from pathlib import Path

import httpx
import pytest
import trustme

from gridserve.trust import tls


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = Path(tmp_path_factory.mktemp("tls-files"))
    ca, other = trustme.CA(), trustme.CA()
    issued, foreign = ca.issue_cert("127.0.0.1"), other.issue_cert("127.0.0.1")
    out = {name: tmp / f"{name}.pem" for name in ("cert", "key", "ca", "foreign_key", "junk")}
    issued.cert_chain_pems[0].write_to_path(str(out["cert"]))
    issued.private_key_pem.write_to_path(str(out["key"]))
    foreign.private_key_pem.write_to_path(str(out["foreign_key"]))
    ca.cert_pem.write_to_path(str(out["ca"]))
    out["junk"].write_text("not a certificate\n")
    return out


def test_a_certificate_and_its_key_load_together(files: dict[str, Path]) -> None:
    assert tls.server_files(files["cert"], files["key"]) == (files["cert"], files["key"])
    assert tls.server_files(None, None) is None


@pytest.mark.parametrize(
    ("cert", "key", "says"),
    [
        ("cert", None, "go together"),
        (None, "key", "go together"),
        ("missing", "key", "no such file"),
        ("cert", "foreign_key", "cannot be used"),
        ("junk", "key", "cannot be used"),
    ],
)
def test_a_pair_that_cannot_serve_is_refused_with_its_reason(
    files: dict[str, Path], tmp_path: Path, cert: str | None, key: str | None, says: str
) -> None:
    paths = {**files, "missing": tmp_path / "missing.pem"}
    with pytest.raises(tls.TlsConfigError, match=says):
        tls.server_files(paths[cert] if cert else None, paths[key] if key else None)


def test_clients_verify_against_the_ca_file_or_the_system_store(
    files: dict[str, Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv(tls.CA_FILE_ENV, raising=False)
    assert tls.client_verify(None) is True  # httpx's own trust store: verification stays on
    context = tls.client_verify(files["ca"])
    assert isinstance(context, ssl.SSLContext) and context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname
    monkeypatch.setenv(tls.CA_FILE_ENV, str(files["ca"]))
    assert tls.ca_file() == files["ca"] and isinstance(tls.client_verify(), ssl.SSLContext)
    with pytest.raises(tls.TlsConfigError, match="no such file"):
        tls.client_verify(tmp_path / "nope.pem")
    with pytest.raises(tls.TlsConfigError, match="not a PEM certificate"):
        tls.client_verify(files["junk"])


def test_a_verification_failure_becomes_one_line_that_says_what_to_do() -> None:
    cause = ssl.SSLCertVerificationError(1, "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed")
    cause.verify_message = "unable to get local issuer certificate"
    wrapped = httpx.ConnectError("connect failed")
    wrapped.__cause__ = cause
    line = tls.describe(wrapped)
    assert line.startswith("its TLS certificate does not verify (unable to get local issuer certificate)")
    assert "--ca-file" in line and "\n" not in line
    plain = ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version number")
    http = httpx.ConnectError("connect failed")
    http.__context__ = plain
    assert "does not speak TLS" in tls.describe(http)
    refused = httpx.ConnectError("[Errno 111] Connection refused")
    assert tls.untrusted(refused) is None and tls.describe(refused) == "[Errno 111] Connection refused"
