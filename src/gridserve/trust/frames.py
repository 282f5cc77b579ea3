"""Signed binary frames: how token ids, hidden states and logits travel between the gateway and stage nodes.

    b"GSF1" | u32 header length | header (canonical JSON) | payload (raw tensor bytes) | Ed25519 signature (64)

The header names the tensor (`dtype`, `shape`), the session and step, the sender's key, the recipient, the
creation time and a sequence number; the signature covers the header and the SHA-256 of the payload, so a
frame cannot be altered, sent to another node, or replayed (the receiver wants each connection's sequence
numbers to rise, and `created` within the clock skew). Tensors are sent as they are (float32 for bitwise-exact
pipelines) or, if asked, as bfloat16 (half the bytes; the numbers are rounded).
"""

import hashlib
import struct
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson
from nacl.exceptions import BadSignatureError, CryptoError

from gridserve.trust.errors import BadSignature, Expired, FromTheFuture, Malformed, Replayed, WrongSigner
from gridserve.trust.identity import Identity, verify_key

MAGIC = b"GSF1"
SIG_BYTES = 64
DTYPES: dict[str, Any] = {"int64": np.int64, "float32": np.float32, "bfloat16": np.uint16}
"""Wire dtypes and the numpy type that holds their bytes (bfloat16: the upper half of a float32)."""
MAX_HEADER = 64 * 1024


@dataclass(frozen=True)
class Frame:
    kind: str
    """open, step, replay, close (gateway to stage); out, ack, error (stage to gateway); hello."""
    session: str = ""
    step: int = 0
    meta: dict[str, Any] = field(default_factory=dict)
    array: npt.NDArray[Any] | None = None
    """int64 token ids or float32 activations (bfloat16 on the wire is widened back to float32)."""


def to_bfloat16_bits(array: npt.NDArray[np.float32]) -> npt.NDArray[np.uint16]:
    """Round float32 to bfloat16 (round to nearest even), as its 16 raw bits."""
    bits = np.ascontiguousarray(array, dtype=np.float32).view(np.uint32)
    rounded = bits + (0x7FFF + ((bits >> 16) & 1))
    return (rounded >> 16).astype(np.uint16)


def from_bfloat16_bits(bits: npt.NDArray[np.uint16]) -> npt.NDArray[np.float32]:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def encode(identity: Identity, frame: Frame, *, to: str, seq: int, wire_dtype: str | None = None) -> bytes:
    """Sign and serialise `frame` for the node (or gateway) whose id is `to`."""
    payload = b""
    header: dict[str, Any] = {
        "kind": frame.kind,
        "session": frame.session,
        "step": frame.step,
        "meta": frame.meta,
        "from": identity.public_key,
        "to": to,
        "seq": seq,
        "created": round(time.time(), 3),
    }
    if frame.array is not None:
        array = frame.array
        dtype = wire_dtype or str(array.dtype)
        if dtype == "bfloat16":
            data: npt.NDArray[Any] = to_bfloat16_bits(array)
        elif dtype in DTYPES:
            data = np.ascontiguousarray(array, dtype=DTYPES[dtype])
        else:
            raise ValueError(f"cannot send a {dtype} tensor; wire dtypes: {', '.join(DTYPES)}")
        payload = data.tobytes()
        header.update(dtype=dtype, shape=list(array.shape), bytes=len(payload))
    head = orjson.dumps(header, option=orjson.OPT_SORT_KEYS)
    signature = identity.signing_key.sign(head + hashlib.sha256(payload).digest()).signature
    return b"".join((MAGIC, struct.pack("<I", len(head)), head, payload, signature))


@dataclass
class FrameReader:
    """Checks the frames arriving on one connection: signed by `sender`, addressed to `me`, fresh, in order."""

    me: str
    sender: str | None
    """The public key that must have signed (None: learnt from the first frame, e.g. a hello)."""
    max_skew_s: float = 30.0
    last_seq: int = -1

    def decode(self, data: bytes) -> tuple[Frame, int]:
        """The frame and its payload size in bytes; TrustError subclasses on any failed check."""
        header, payload = self._verified(data)
        if header.get("to") != self.me:
            raise WrongSigner("frame addressed to another node")
        seq = header.get("seq")
        if not isinstance(seq, int) or seq <= self.last_seq:
            raise Replayed(f"frame sequence {seq} after {self.last_seq}")
        created = header.get("created")
        if not isinstance(created, int | float):
            raise Malformed("frame has no creation time")
        now = time.time()
        if created > now + self.max_skew_s:
            raise FromTheFuture("frame created ahead of this clock")
        if created < now - self.max_skew_s:
            raise Expired("frame too old")
        self.last_seq = seq
        array = _array(header, payload)
        meta = header.get("meta") or {}
        frame = Frame(str(header["kind"]), str(header.get("session", "")), int(header.get("step", 0)), meta, array)
        return frame, len(payload)

    def _verified(self, data: bytes) -> tuple[dict[str, Any], bytes]:
        if len(data) < 8 + SIG_BYTES or data[:4] != MAGIC:
            raise Malformed("not a gridserve frame")
        (length,) = struct.unpack("<I", data[4:8])
        if length > MAX_HEADER or 8 + length + SIG_BYTES > len(data):
            raise Malformed("frame header length out of bounds")
        head = data[8 : 8 + length]
        payload = data[8 + length : len(data) - SIG_BYTES]
        try:
            header = orjson.loads(head)
        except orjson.JSONDecodeError as exc:
            raise Malformed(f"frame header is not JSON: {exc}") from exc
        if not isinstance(header, dict) or "from" not in header:
            raise Malformed("frame header names no sender")
        sender = str(header["from"])
        if self.sender is not None and sender != self.sender:
            raise WrongSigner("frame signed by a key that may not send on this connection")
        try:
            verify_key(sender).verify(head + hashlib.sha256(payload).digest(), data[len(data) - SIG_BYTES :])
        except (BadSignatureError, CryptoError, ValueError, TypeError) as exc:
            raise BadSignature("frame signature does not verify") from exc
        self.sender = sender
        return header, payload


def _array(header: dict[str, Any], payload: bytes) -> npt.NDArray[Any] | None:
    dtype = header.get("dtype")
    if dtype is None:
        return None
    if dtype not in DTYPES:
        raise Malformed(f"unknown tensor dtype {dtype!r}")
    shape = header.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise Malformed("frame tensor shape is not a list of sizes")
    raw = np.frombuffer(payload, dtype=DTYPES[dtype])
    if raw.size != int(np.prod(shape)):
        raise Malformed(f"payload holds {raw.size} values, shape {shape} needs {int(np.prod(shape))}")
    array = raw.reshape(shape)
    return from_bfloat16_bits(array) if dtype == "bfloat16" else array
