"""A hostile node operator written from docs/protocol.md alone: PyNaCl, hashlib and JSON, none of gridserve's
own helpers. It signs whatever it is told to, well-formed or not, to attack a gateway from the outside."""

import base64
import hashlib
import json
import secrets
import time
from typing import Any

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
