"""The tunnel's frames: one WebSocket binary message each, `kind (1 byte) | stream (4 bytes, big-endian) | payload`
for the greeting (`encode`, `decode`); every later frame also carries a tag after the stream number, which binds it
to the greeting (channel.py).

Many exchanges share one connection, each on its own stream number, chosen by the gateway (which opens them all).
An HTTP exchange is one REQUEST (JSON head, a newline, the body), then the node's HEAD, BODY... and END (END
carries the last chunk, often the whole body); the gateway's CANCEL is the HTTP client going away. A WebSocket
exchange (a pipeline stage link) is WS_OPEN, then WS_ACCEPT or WS_CLOSE, then WS_DATA both ways until either side's
WS_CLOSE. Stream 0 carries the handshake and the node's heartbeats (BEAT, or the signed HEARTBEAT of a node that
predates it or a gateway that does not take BEAT; either is answered by HEARTBEAT_REPLY with the status the HTTP
endpoint would have given).

Every message inside is what the node and the gateway already sign when they speak HTTP: generate and load
requests signed by the gateway, health answers signing the probe's challenge, stage frames and receipts signed by
the node. Heartbeats are the exception: a BEAT is authenticated by the channel alone (its tag proves the node's
handshake key, its counter its freshness), which saves the gateway an Ed25519 check per heartbeat, the largest part
of its work at 10,000 tunnels. The tunnel adds the handshake (handshake.py), which proves both keys at the start,
and the tags that bind every later frame to it (channel.py).
"""

import enum
import struct
from dataclasses import dataclass
from typing import Any

import orjson

HEADER = struct.Struct(">BI")
CONTROL = 0
"""The stream of the handshake and heartbeats."""
MAX_FRAME = 64 * 1024 * 1024 + 4096
"""Largest frame either end accepts: a pipeline frame (a long prompt's hidden states) with its header."""
PATH = "/nodes/tunnel"
"""Where on the gateway a node opens its tunnel (ws:// or wss://)."""
ENDPOINT_SCHEME = "tunnel://"
"""An outbound-only node's endpoint: `tunnel://<node id>`; the gateway reaches it over its tunnel only."""


class Kind(enum.IntEnum):
    # gateway -> node
    CHALLENGE = 1
    WELCOME = 2
    REQUEST = 3
    CANCEL = 4
    WS_OPEN = 5
    HEARTBEAT_REPLY = 6
    # node -> gateway
    HELLO = 20
    HEAD = 21
    BODY = 22
    END = 23
    WS_ACCEPT = 24
    HEARTBEAT = 25
    BEAT = 26
    """A heartbeat bound to the channel: the bare `HeartbeatPayload` JSON, no envelope (sent once the welcome says
    the gateway takes them: handshake.CHANNEL_BEATS)."""
    # both ways
    WS_DATA = 40
    WS_CLOSE = 41


@dataclass(frozen=True, slots=True)
class Frame:
    kind: Kind
    stream: int
    payload: bytes


class BadFrame(ValueError):
    """Bytes that are not a tunnel frame."""


def encode(kind: Kind, stream: int, payload: bytes = b"") -> bytes:
    return HEADER.pack(kind, stream) + payload


def decode(data: bytes) -> Frame:
    if len(data) < HEADER.size:
        raise BadFrame(f"a frame of {len(data)} bytes is shorter than its header")
    kind, stream = HEADER.unpack_from(data)
    try:
        return Frame(Kind(kind), stream, data[HEADER.size :])
    except ValueError:
        raise BadFrame(f"unknown frame kind {kind}") from None


def request_payload(method: str, path: str, headers: dict[str, str], body: bytes = b"") -> bytes:
    """A REQUEST's payload: the head as JSON, a newline, the body."""
    return orjson.dumps({"method": method, "path": path, "headers": headers}) + b"\n" + body


def split_request(payload: bytes) -> tuple[dict[str, Any], bytes]:
    head, sep, body = payload.partition(b"\n")
    if not sep:
        raise BadFrame("a request without its head")
    meta = orjson.loads(head)
    if not isinstance(meta, dict) or not isinstance(meta.get("method"), str) or not isinstance(meta.get("path"), str):
        raise BadFrame("a request head needs a method and a path")
    return meta, body


def json_payload(value: Any) -> bytes:
    return orjson.dumps(value)


def endpoint_for(node_id: str) -> str:
    return ENDPOINT_SCHEME + node_id


def is_tunnel(endpoint: str) -> bool:
    return endpoint.startswith(ENDPOINT_SCHEME)


def websocket_url(gateway_url: str) -> str:
    """The tunnel's URL at a gateway: ws:// for http://, wss:// for https://."""
    return gateway_url.replace("http://", "ws://", 1).replace("https://", "wss://", 1).rstrip("/") + PATH
