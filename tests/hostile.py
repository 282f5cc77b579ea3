"""A hostile node operator written from docs/protocol.md alone: PyNaCl, hashlib and JSON, none of gridserve's
own helpers. It signs whatever it is told to, well-formed or not, to attack a gateway from the outside; as a
`RefusingNode` it also serves, and refuses every request in its own words; as an `AlteringNode` it serves every
request with an answer of its own making, in a well-formed stream with a receipt that is true to what it sent."""

import base64
import contextlib
import hashlib
import json
import secrets
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

import httpx
from nacl.signing import SigningKey


def canonical(obj: Any) -> bytes:
    """JSON with sorted keys and no spaces, UTF-8 (the protocol's canonical form)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


class HostileNode:
    def __init__(self) -> None:
        self.key = SigningKey.generate()
        self.public_key = base64.b64encode(bytes(self.key.verify_key)).decode()
        self.node_id = "n" + hashlib.sha256(bytes(self.key.verify_key)).hexdigest()[:40]

    def envelope(self, payload: Any, purpose: str, **overrides: Any) -> bytes:
        now = time.time()
        params = {
            "keyid": self.public_key,
            "alg": "ed25519",
            "purpose": purpose,
            "created": round(now, 3),
            "expires": round(now + 30, 3),
            "nonce": secrets.token_urlsafe(16),
            **overrides,
        }
        signature = self.key.sign(canonical({"payload": payload, "params": params})).signature
        return canonical({"payload": payload, "sig": {**params, "signature": base64.b64encode(signature).decode()}})

    def capability(self, endpoint: str, models: list[str], digest: str = "", **extra: Any) -> dict[str, Any]:
        """`models` offered with `digest` (default: each model's emulated digest, `emulated:<name>`)."""
        return {
            "capability": {
                "node_id": self.node_id,
                "public_key": self.public_key,
                "endpoint": endpoint,
                "engine": "hostile",
                "models": [{"name": m, "weights_digest": digest or f"emulated:{m}"} for m in models],
                "hardware": {"accelerator": "cpu"},
                "runtime": {"gridserve": "0", "python": "3.11", "engine": "hostile"},
                **extra,
            }
        }

    def register(
        self, gateway: str, models: list[str], endpoint: str = "http://127.0.0.1:9", **extra: Any
    ) -> httpx.Response:
        body = self.envelope(self.capability(endpoint, models, **extra), "register")
        return post(gateway, "/nodes/register", body)


def post(gateway: str, path: str, body: bytes) -> httpx.Response:
    return httpx.post(gateway + path, content=body, headers={"content-type": "application/json"}, timeout=30)


TINY_MODEL, TINY_DIGEST = "gridserve-tiny", "seed:20261123"
"""A model and the digest the gateway allows for it (docs/protocol.md's built-in entries), as hostile operators
claim them."""
REFUSAL = "this request cannot run here; see http://evil.example/upgrade"
"""What the refusing operator says instead of answering: a client must never read it."""


class _Handler(BaseHTTPRequestHandler):
    """A hostile operator's node endpoint: `/health` answers the probe's challenge as the protocol asks, so the
    node stays up; a POST is answered by the node's `answer` (the refusing one refuses every request as invalid, in
    its own words)."""

    node: "RefusingNode"

    def do_GET(self) -> None:
        query = parse_qs(urlparse(self.path).query)
        if urlparse(self.path).path != "/health":
            self._json(404, {"error": {"type": "not_found", "message": "no such path"}})
            return
        challenge = (query.get("challenge") or [""])[0]
        self._json(
            200, {"status": "ok", "node_id": self.node.node_id, "challenge_signature": self.node.sign(challenge)}
        )

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        status, content_type, data = self.node.answer(self.path, body)
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _json(self, status: int, body: Any) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        pass


class RefusingNode(HostileNode):
    """An operator who claims a model's published digest without its weights, stays up (signed probes and
    heartbeats, as docs/protocol.md describes them) and answers every request with a refusal in its own words."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        super().__init__()
        handler = type("Refusing", (_Handler,), {"node": self})
        self.server = ThreadingHTTPServer((host, 0), handler)
        self.url = f"http://{host}:{self.server.server_address[1]}"
        self.refused = 0
        self.stop = threading.Event()
        self.threads: list[threading.Thread] = []

    def answer(self, path: str, body: bytes) -> tuple[int, str, bytes]:
        """(status, content type, body) for a POST: a refusal in the operator's own words."""
        self.refused += 1
        return 400, "application/json", json.dumps({"error": {"type": "invalid_request", "message": REFUSAL}}).encode()

    def sign(self, challenge: str) -> str:
        if not challenge:
            return ""
        signed = canonical({"challenge": challenge, "node_id": self.node_id, "purpose": "probe"})
        return base64.b64encode(self.key.sign(signed).signature).decode()

    def join(self, gateway: str, model: str, digest: str) -> None:
        """Serve, register `model` with `digest`, and heartbeat at the interval the gateway's reply gives."""
        self._start(self.server.serve_forever)  # up before the gateway's first probe
        reply = self.register(gateway, [model], endpoint=self.url, digest=digest)
        assert reply.status_code == 200, reply.text
        self._start(self._beat, gateway, float(json.loads(reply.content)["payload"]["heartbeat_interval_s"]))

    def _start(self, target: Any, *args: Any) -> None:
        self.threads.append(threading.Thread(target=target, args=args, daemon=True))
        self.threads[-1].start()

    def _beat(self, gateway: str, interval: float) -> None:
        seq = 0
        while not self.stop.wait(interval if seq else 0.0):
            seq += 1
            payload = {"node_id": self.node_id, "seq": seq, "telemetry": {}}
            with contextlib.suppress(httpx.HTTPError):
                post(gateway, "/nodes/heartbeat", self.envelope(payload, "heartbeat"))

    def close(self) -> None:
        self.stop.set()
        self.server.shutdown()
        self.server.server_close()
        for thread in self.threads:
            thread.join(timeout=5)


ALTERED = "Visit evil.example for cheaper tokens"
"""What the altering operator answers whatever it is asked (printable ASCII: one token per byte in the tiny model)."""


def token_commitment(ids: list[int]) -> str:
    """SHA-256 over the ids as 4-byte little-endian signed integers (docs/protocol.md, "Commitments")."""
    return hashlib.sha256(b"".join(struct.pack("<i", i) for i in ids)).hexdigest()


class AlteringNode(RefusingNode):
    """An operator who claims `gridserve-tiny` with its attested digest, stays up like the refusing one, and answers
    every text completion with text of its own (`ALTERED`, cut to the request's max_tokens): token ids, final event
    and a receipt signed with its key whose commitments are true to what it sent and whose counts and finish reason
    are consistent, so the gateway's receipt checks pass; only a re-execution of the answer can tell. (Chat
    prompts and failover `resume` are not handled: their prompt digest and counts would be wrong.) It keeps the
    sampling members of each request it served."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        super().__init__(host)
        self.served: list[dict[str, Any]] = []
        self.digest = ""

    def join(self, gateway: str, model: str, digest: str) -> None:
        self.digest = digest
        super().join(gateway, model, digest)

    def answer(self, path: str, body: bytes) -> tuple[int, str, bytes]:
        if urlparse(path).path != "/internal/generate":
            return 404, "application/json", b'{"error": {"type": "not_found", "message": "no such path"}}'
        request = dict(json.loads(body)["payload"])  # (a hostile node need not check the gateway's signature)
        del request["node_id"]
        self.served.append(dict(request["sampling"]))
        prompt = [1, *(3 + b for b in (request["prompt"] or "").encode())]  # the tiny model's byte tokens, BOS first
        most = int(request["sampling"]["max_tokens"])
        text = ALTERED[:most]
        ids = [3 + b for b in text.encode()]
        # cut at max_tokens, or ended by an end-of-sequence token, counted but not sent
        ended = {"completion_tokens": len(ids), "finish_reason": "length"} if len(ids) == most else {}
        counts = {
            "prompt_tokens": len(prompt),
            **(ended or {"completion_tokens": len(ids) + 1, "finish_reason": "stop"}),
        }
        timings = {"queue_s": 0.0, "prefill_s": 0.01, "decode_s": 0.01 * len(ids)}
        receipt = {
            "request_id": request["request_id"],
            "node_id": self.node_id,
            "model": request["model"],
            "weights_digest": self.digest,
            "input_commitment": hashlib.sha256(canonical(request)).hexdigest(),
            "prompt_digest": token_commitment(prompt),
            "output_commitment": token_commitment(ids),
            "resumed": 0,
            "proof": "",
            "cached_tokens": 0,
            **counts,
            **timings,
        }
        final = {**counts, **timings, "prompt_digest": token_commitment(prompt)}
        final["receipt"] = self.envelope(receipt, "receipt").decode()
        lines = [canonical({"text": chr(i - 3), "token_ids": [i]}) for i in ids] + [canonical(final)]
        return 200, "application/x-ndjson", b"".join(line + b"\n" for line in lines)
