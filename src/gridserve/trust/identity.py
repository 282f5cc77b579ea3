"""Ed25519 identities. A node id is derived from its public key, so it cannot be chosen freely."""

import functools
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from nacl.encoding import Base64Encoder
from nacl.signing import SigningKey, VerifyKey

KEY_CACHE_SIZE = 1 << 16
"""Keys remembered by `node_id_for` and `verify_key` (LRU): above a 10,000-node grid's, so a heartbeat finds its
node's key decoded already. Both results are pure functions of the key; a flood of unknown keys only evicts."""


@functools.lru_cache(maxsize=KEY_CACHE_SIZE)
def node_id_for(public_key_b64: str) -> str:
    """The id of the key: 'n' + first 20 bytes of sha256(raw public key), hex."""
    raw = Base64Encoder.decode(public_key_b64.encode())
    return "n" + hashlib.sha256(raw).hexdigest()[:40]


@dataclass(frozen=True)
class Identity:
    signing_key: SigningKey

    @property
    def public_key(self) -> str:
        return self.signing_key.verify_key.encode(Base64Encoder).decode()

    @property
    def node_id(self) -> str:
        return node_id_for(self.public_key)

    def sign(self, data: bytes) -> str:
        return Base64Encoder.encode(self.signing_key.sign(data).signature).decode()

    @classmethod
    def generate(cls) -> "Identity":
        return cls(SigningKey.generate())


@functools.lru_cache(maxsize=KEY_CACHE_SIZE)
def verify_key(public_key_b64: str) -> VerifyKey:
    """The key (immutable, so cached); raises for anything but base64 of 32 bytes (errors are not cached)."""
    return VerifyKey(public_key_b64.encode(), encoder=Base64Encoder)


def load_or_create_identity(path: Path) -> Identity:
    """Load the key at `path`, or create one there with mode 0600."""
    if path.exists():
        seed = Base64Encoder.decode(path.read_bytes().strip())
        return Identity(SigningKey(seed))
    path.parent.mkdir(parents=True, exist_ok=True)
    identity = Identity.generate()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(Base64Encoder.encode(bytes(identity.signing_key)) + b"\n")
    return identity
