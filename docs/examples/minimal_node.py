"""A minimal gridserve node written from docs/protocol.md alone: it does not import gridserve.

It registers with a gateway, heartbeats, answers the gateway's `/health` probes, and serves one toy model,
`minimal-echo` (it echoes the last message back, one character per token, token id = the character's code
point), over `POST /internal/generate` with a signed receipt. It is the conformance check of the protocol
document: if the document were wrong, the gateway would refuse these messages or record a severe incident.

    python docs/examples/minimal_node.py --gateway http://127.0.0.1:8000 --port 9100 --seconds 60

Needs only PyNaCl (`pip install pynacl`) and the standard library. Not for production: one thread per request,
no engine, no TLS.
"""

import argparse
import base64
import hashlib
import json
import os
import platform
import secrets
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

MODEL = "minimal-echo"
DIGEST = "minimal:echo-v1"
MAX_SKEW_S = 30.0
MAX_LIFETIME_S = 120.0


# -- canonical JSON (protocol.md, "Canonical JSON") -------------------------------------------------------------
def _float(x: float) -> str:
    """Shortest round-trip digits; plain notation for 1e-5 <= |x| < 1e16, else exponent form ("1e+16", "1e-7")."""
    if x != x or x in (float("inf"), float("-inf")):
        raise ValueError("NaN and infinities have no JSON form")
    text = repr(x)  # Python's repr is the shortest round-trip form too; only its small-number layout differs
    if "e" not in text:
        return text
    mantissa, exp_text = text.split("e")
    exp = int(exp_text)
    if exp > 0:
        return f"{mantissa}e+{exp}"
    if exp == -5:  # 1.2345e-05 -> 0.000012345
        sign, digits = ("-", mantissa[1:]) if mantissa.startswith("-") else ("", mantissa)
        return f"{sign}0.0000{digits.replace('.', '')}"
    return f"{mantissa}e-{-exp}"  # no zero padding of the exponent


def canonical(value: Any) -> str:
    """Keys sorted by code point, no whitespace, UTF-8 as is, integers and floats kept apart."""
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return _float(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list | tuple):
        return "[" + ",".join(canonical(v) for v in value) + "]"
    if isinstance(value, dict):
        items = sorted(value.items())
        return "{" + ",".join(f"{json.dumps(k, ensure_ascii=False)}:{canonical(v)}" for k, v in items) + "}"
    raise TypeError(f"no JSON form for {type(value).__name__}")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def token_commitment(ids: list[int]) -> str:
    return hashlib.sha256(b"".join(int(i).to_bytes(4, "little", signed=True) for i in ids)).hexdigest()


# -- identity and envelopes (protocol.md, "Identity" and "Signed envelopes") ----------------------------------
def load_or_create_key(path: Path) -> SigningKey:
    """The key file holds the 32-byte Ed25519 seed, standard base64, and a newline; mode 0600."""
    if path.exists():
        return SigningKey(base64.b64decode(path.read_bytes().strip()))
    key = SigningKey.generate()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(base64.b64encode(bytes(key)) + b"\n")
    return key


def node_id_for(public_key_b64: str) -> str:
    return "n" + hashlib.sha256(base64.b64decode(public_key_b64)).hexdigest()[:40]


def sign_envelope(key: SigningKey, payload: Any, purpose: str, lifetime_s: float = 30.0) -> bytes:
    now = time.time()
    params = {
        "keyid": b64(bytes(key.verify_key)),
        "alg": "ed25519",
        "purpose": purpose,
        "created": round(now, 3),
        "expires": round(now + lifetime_s, 3),
        "nonce": secrets.token_urlsafe(16),
    }
    signed = canonical({"payload": payload, "params": params}).encode()
    signature = b64(key.sign(signed).signature)
    return canonical({"payload": payload, "sig": {**params, "signature": signature}}).encode()


class Refused(Exception):
    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind, self.detail = kind, detail


class Verifier:
    """The receiving side of an envelope: signer, signature, freshness, replay."""

    def __init__(self) -> None:
        self.seen: dict[tuple[str, str], float] = {}
        self.lock = threading.Lock()

    def verify(self, body: bytes, purpose: str, keyid: str | None) -> dict[str, Any]:
        try:
            doc = json.loads(body)
        except ValueError as exc:
            raise Refused("malformed", f"body is not JSON: {exc}") from exc
        if not isinstance(doc, dict) or "payload" not in doc:
            raise Refused("malformed", "not an envelope")
        sig = doc.get("sig")
        if not isinstance(sig, dict) or "signature" not in sig:
            raise Refused("unsigned", "no signature")
        if set(doc) - {"payload", "sig"}:
            raise Refused("malformed", "unknown envelope fields")
        params = {k: v for k, v in sig.items() if k != "signature"}
        if any(k not in params for k in ("keyid", "alg", "purpose", "created", "expires", "nonce")):
            raise Refused("malformed", "signature parameters missing")
        if params["alg"] != "ed25519":
            raise Refused("malformed", "unsupported alg")
        if not all(isinstance(params[k], str) for k in ("purpose", "nonce", "keyid")):
            raise Refused("malformed", "purpose, nonce and keyid must be strings")
        if any(isinstance(params[k], bool) or not isinstance(params[k], int | float) for k in ("created", "expires")):
            raise Refused("malformed", "created and expires must be numbers")
        if params["purpose"] != purpose:
            raise Refused("wrong_signer", f"signed for {params['purpose']!r}")
        if keyid is not None and params["keyid"] != keyid:
            raise Refused("wrong_signer", "not signed by the expected key")
        signed = canonical({"payload": doc["payload"], "params": params}).encode()
        try:
            VerifyKey(base64.b64decode(str(params["keyid"]))).verify(signed, base64.b64decode(str(sig["signature"])))
        except (BadSignatureError, ValueError) as exc:
            raise Refused("bad_signature", "signature does not verify") from exc
        now, created, expires = time.time(), float(params["created"]), float(params["expires"])
        if created > now + MAX_SKEW_S:
            raise Refused("from_the_future", "created ahead of this clock")
        if expires < now - MAX_SKEW_S or expires - created > MAX_LIFETIME_S or expires < created:
            raise Refused("expired", "too old or too long-lived")
        with self.lock:
            self.seen = {k: t for k, t in self.seen.items() if t >= now}
            nonce = (str(params["keyid"]), str(params["nonce"]))
            if nonce in self.seen:
                raise Refused("replayed", "nonce seen before")
            self.seen[nonce] = expires + MAX_SKEW_S
        payload: dict[str, Any] = doc["payload"]
        return payload


# -- the node ----------------------------------------------------------------------------------------------------
class MinimalNode:
    def __init__(self, gateway: str, endpoint: str, key: SigningKey, gateway_key: str | None) -> None:
        self.gateway, self.endpoint, self.key = gateway.rstrip("/"), endpoint, key
        self.public_key = b64(bytes(key.verify_key))
        self.node_id = node_id_for(self.public_key)
        self.gateway_key = gateway_key
        self.interval_s = 2.0
        self.seq = 0
        self.verifier = Verifier()

    def capability(self) -> dict[str, Any]:
        return {
            "node_id": self.node_id,
            "public_key": self.public_key,
            "endpoint": self.endpoint,
            "engine": "minimal-echo",
            "models": [
                {
                    "name": MODEL,
                    "dtype": "float32",
                    "quantization": "none",
                    "max_context": 4096,
                    "weights_digest": DIGEST,
                }
            ],
            "hardware": {"accelerator": "cpu", "cpu_cores": os.cpu_count() or 1, "memory_bytes": 2**30},
            "runtime": {"gridserve": "minimal-0", "python": platform.python_version(), "engine": "minimal-echo"},
            "price_per_mtok": 0.1,
        }

    def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        request = urllib.request.Request(
            self.gateway + path, data=body, headers={"content-type": "application/json"}, method="POST"
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as resp:
                return int(resp.status), bytes(resp.read())
        except urllib.error.HTTPError as exc:
            return int(exc.code), bytes(exc.read())

    def register(self) -> None:
        status, body = self.post(
            "/nodes/register", sign_envelope(self.key, {"capability": self.capability()}, "register")
        )
        if status != 200:
            raise RuntimeError(f"registration refused ({status}): {body.decode()}")
        reply = self.verifier.verify(body, "register-reply", self.gateway_key)
        signer = json.loads(body)["sig"]["keyid"]
        if reply["gateway_public_key"] != signer:
            raise RuntimeError("register reply names another key than its signer")
        self.gateway_key = signer  # pinned from now on (trust on first use unless --gateway-key)
        self.interval_s = float(reply["heartbeat_interval_s"])
        print(f"registered {self.node_id}; gateway key {signer}; heartbeat every {self.interval_s} s", flush=True)

    def heartbeat(self) -> int:
        self.seq += 1  # strictly increasing for the life of this process
        telemetry = {"utilization": 0.0, "queue_depth": 0, "active_requests": 0, "tokens_per_s": 0.0}
        payload = {"node_id": self.node_id, "seq": self.seq, "telemetry": telemetry}
        status, body = self.post("/nodes/heartbeat", sign_envelope(self.key, payload, "heartbeat"))
        print(f"heartbeat #{self.seq}: {status} {body.decode()}", flush=True)
        if status == 404:  # the gateway forgot this node (restarted): register again
            self.register()
        return status

    def generate(self, body: bytes) -> tuple[int, list[bytes]]:
        """Verify the gateway's request, run the toy model, and return the NDJSON lines (last with the receipt)."""
        started = time.monotonic()
        try:
            payload = self.verifier.verify(body, "generate", self.gateway_key)
        except Refused as exc:
            return 401, [json.dumps({"error": {"type": exc.kind, "message": exc.detail}}).encode()]
        request = {k: v for k, v in payload.items() if k != "node_id"}
        if payload.get("node_id") != self.node_id:
            return 401, [b'{"error":{"type":"trust_error","message":"request was signed for another node"}}']
        if request.get("model") != MODEL:
            return 400, [b'{"error":{"type":"invalid_request","message":"model not served here"}}']
        messages = request.get("messages") or []
        text = "echo: " + (str(messages[-1]["content"]) if messages else str(request.get("prompt") or ""))
        prompt_ids = [ord(c) for c in (json.dumps(messages) if messages else str(request.get("prompt") or ""))]
        resumed = len(request.get("resume") or [])
        max_tokens = int(request["sampling"]["max_tokens"])
        answer = [ord(c) for c in text][resumed:max_tokens]
        lines = [canonical({"text": chr(i), "token_ids": [i]}).encode() for i in answer]
        finish = "length" if resumed + len(answer) >= max_tokens else "stop"
        final: dict[str, Any] = {
            "finish_reason": finish,
            "prompt_tokens": len(prompt_ids),
            "completion_tokens": resumed + len(answer),
            "prompt_digest": token_commitment(prompt_ids),
            "prefill_s": round(time.monotonic() - started, 6),
        }
        receipt = {
            "request_id": request["request_id"],
            "node_id": self.node_id,
            "model": request["model"],
            "weights_digest": DIGEST,
            "input_commitment": hashlib.sha256(canonical(request).encode()).hexdigest(),
            "prompt_digest": final["prompt_digest"],
            "output_commitment": token_commitment(answer),
            "resumed": resumed,
            "prompt_tokens": final["prompt_tokens"],
            "completion_tokens": final["completion_tokens"],
            "finish_reason": finish,
            "queue_s": 0.0,
            "prefill_s": final["prefill_s"],
            "decode_s": 0.0,
            "proof": "",
        }
        final["receipt"] = sign_envelope(self.key, receipt, "receipt", lifetime_s=60.0).decode()
        return 200, [*lines, canonical(final).encode()]


def serve(node: MinimalNode, host: str, port: int) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def _send(self, status: int, lines: list[bytes], content_type: str) -> None:
            data = b"".join(line + b"\n" for line in lines)
            self.send_response(status)
            self.send_header("content-type", content_type)
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            path, _, query = self.path.partition("?")
            if path == "/health":  # sign the probe's challenge: the gateway checks it against our registered key
                challenge = urllib.parse.parse_qs(query).get("challenge", [""])[0][:64]
                signed = canonical({"challenge": challenge, "node_id": node.node_id, "purpose": "probe"}).encode()
                signature = base64.b64encode(node.key.sign(signed).signature).decode() if challenge else ""
                health = {
                    "status": "ok",
                    "node_id": node.node_id,
                    "registered": node.gateway_key is not None,
                    "challenge_signature": signature,
                }
                self._send(200, [json.dumps(health).encode()], "application/json")
            else:
                self._send(404, [b'{"error":{"type":"not_found","message":"no such path"}}'], "application/json")

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length") or 0))
            if self.path != "/internal/generate":
                self._send(404, [b'{"error":{"type":"not_found","message":"no such path"}}'], "application/json")
            elif node.gateway_key is None:
                self._send(503, [b'{"error":{"type":"not_registered","message":"not registered"}}'], "application/json")
            else:
                status, lines = node.generate(body)
                self._send(status, lines, "application/x-ndjson" if status == 200 else "application/json")

        def log_message(self, format: str, *args: Any) -> None:
            return

    server = ThreadingHTTPServer((host, port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gateway", required=True, help="gateway URL")
    parser.add_argument("--port", type=int, required=True, help="port for /health and /internal/generate")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind")
    parser.add_argument("--advertise-url", default=None, help="URL the gateway calls (default http://HOST:PORT)")
    parser.add_argument("--key", type=Path, default=Path("minimal-node.key"), help="Ed25519 key file")
    parser.add_argument("--gateway-key", default=None, help="pin the gateway's public key (base64)")
    parser.add_argument("--seconds", type=float, default=0.0, help="stop after this long (0: run until Ctrl-C)")
    args = parser.parse_args()
    endpoint = args.advertise_url or f"http://{args.host}:{args.port}"
    node = MinimalNode(args.gateway, endpoint, load_or_create_key(args.key), args.gateway_key)
    server = serve(node, args.host, args.port)
    node.register()
    deadline = time.monotonic() + args.seconds if args.seconds > 0 else float("inf")
    try:
        while time.monotonic() < deadline:
            node.heartbeat()
            time.sleep(node.interval_s)
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()


if __name__ == "__main__":
    main()
