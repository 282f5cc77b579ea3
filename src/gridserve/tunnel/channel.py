"""Every frame after the handshake is bound to it: the hello and the welcome each carry an ephemeral X25519 public
key, signed with the rest of the greeting, so the two ends share a secret no one else has (an on-path attacker
cannot swap the keys without breaking a signature). From it each direction gets its own key, and each frame a
16-byte BLAKE2b tag over its position in the stream (a counter), its kind, stream and payload:

    kind (u8) | stream (u32 big-endian) | tag (16 bytes) | payload

A frame forged, altered, replayed, dropped or reordered fails its tag, and the receiver closes the tunnel. This
holds over plain `ws://` too; over `wss://` TLS also keeps the contents private.
"""

import base64
import hashlib
import hmac
import struct

from nacl.bindings import crypto_scalarmult
from nacl.public import PrivateKey

from gridserve.tunnel.wire import HEADER, BadFrame, Frame, Kind

TAG_BYTES = 16


class Ephemeral:
    """One side's X25519 key for one tunnel."""

    def __init__(self) -> None:
        self._key = PrivateKey.generate()

    @property
    def public(self) -> str:
        return base64.b64encode(bytes(self._key.public_key)).decode()

    def shared(self, peer_public: str) -> bytes:
        try:
            peer = base64.b64decode(peer_public, validate=True)
        except ValueError:
            raise BadFrame("the greeting's exchange key is not base64") from None
        if len(peer) != 32:
            raise BadFrame("the greeting's exchange key is not 32 bytes")
        try:
            return crypto_scalarmult(bytes(self._key), peer)
        except RuntimeError:  # nacl's: a low-order point, which would make an all-zero secret anyone knows
            raise BadFrame("the greeting's exchange key makes no shared secret") from None


def _key(shared: bytes, transcript: bytes, direction: bytes) -> bytes:
    return hashlib.blake2b(shared + transcript, digest_size=32, person=b"gridserve-tun" + direction).digest()


class Sealer:
    """Tags the frames one side sends."""

    __slots__ = ("_key", "_seq")

    def __init__(self, key: bytes) -> None:
        self._key, self._seq = key, 0

    def seal(self, kind: Kind, stream: int, payload: bytes = b"") -> bytes:
        self._seq += 1
        head = HEADER.pack(kind, stream)
        return head + _tag(self._key, self._seq, head, payload) + payload


class Opener:
    """Checks the frames one side receives, in order."""

    __slots__ = ("_key", "_seq")

    def __init__(self, key: bytes) -> None:
        self._key, self._seq = key, 0

    def open(self, data: bytes) -> Frame:
        start = HEADER.size + TAG_BYTES
        if len(data) < start:
            raise BadFrame(f"a frame of {len(data)} bytes is shorter than its header and tag")
        head, tag, payload = data[: HEADER.size], data[HEADER.size : start], data[start:]
        self._seq += 1
        if not hmac.compare_digest(tag, _tag(self._key, self._seq, head, payload)):
            raise BadFrame("a frame failed its tag (forged, altered, replayed or out of order)")
        kind, stream = HEADER.unpack(head)
        try:
            return Frame(Kind(kind), stream, payload)
        except ValueError:
            raise BadFrame(f"unknown frame kind {kind}") from None


def _tag(key: bytes, seq: int, head: bytes, payload: bytes) -> bytes:
    mac = hashlib.blake2b(key=key, digest_size=TAG_BYTES)
    mac.update(struct.pack(">Q", seq))
    mac.update(head)
    mac.update(payload)
    return mac.digest()


def node_side(shared: bytes, transcript: bytes) -> tuple[Sealer, Opener]:
    """The node's (sealer, opener) for the secret and the greeting's transcript (challenge and nonce)."""
    return Sealer(_key(shared, transcript, b"n2g")), Opener(_key(shared, transcript, b"g2n"))


def gateway_side(shared: bytes, transcript: bytes) -> tuple[Sealer, Opener]:
    return Sealer(_key(shared, transcript, b"g2n")), Opener(_key(shared, transcript, b"n2g"))
