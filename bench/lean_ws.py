"""A bare WebSocket client (RFC 6455) on an asyncio protocol, for load generators that hold thousands of
connections in one process beside the gateway they measure: the handshake, masked binary frames out, unmasked
frames in, pings answered. aiohttp's client costs several times the CPU per frame (bench/ingest.py, LeanClient).
"""

import asyncio
import base64
import os
import struct
from collections.abc import Callable
from typing import cast

OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x2, 0x8, 0x9, 0xA


def _frame(opcode: int, payload: bytes) -> bytes:
    mask = os.urandom(4)
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
    elif n < 1 << 16:
        head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
    key = (mask * (n // 4 + 1))[:n]
    masked = (int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")).to_bytes(n, "big") if n else b""
    return head + mask + masked


class LeanWebSocket(asyncio.Protocol):
    """One client connection; `on_message(bytes)` gets each binary message; `closed` is set when it ends."""

    def __init__(self, on_message: Callable[[bytes], None]) -> None:
        self.on_message = on_message
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.upgraded = asyncio.get_running_loop().create_future()
        self.closed = asyncio.Event()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed.set()
        if not self.upgraded.done():
            self.upgraded.set_exception(ConnectionError("closed before the upgrade"))

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if not self.upgraded.done():
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head, self.buffer = self.buffer[:end], self.buffer[end + 4 :]
            if not head.startswith(b"HTTP/1.1 101"):
                self.upgraded.set_exception(ConnectionError(head.split(b"\r\n")[0].decode(errors="replace")))
                return
            self.upgraded.set_result(None)
        self._frames()

    def _frames(self) -> None:
        while len(self.buffer) >= 2:
            b0, b1 = self.buffer[0], self.buffer[1]
            n, at = b1 & 0x7F, 2
            if n == 126:
                if len(self.buffer) < 4:
                    return
                n, at = struct.unpack_from("!H", self.buffer, 2)[0], 4
            elif n == 127:
                if len(self.buffer) < 10:
                    return
                n, at = struct.unpack_from("!Q", self.buffer, 2)[0], 10
            if len(self.buffer) < at + n:
                return
            payload, self.buffer = self.buffer[at : at + n], self.buffer[at + n :]
            opcode = b0 & 0x0F
            if opcode == OP_BINARY:
                self.on_message(payload)
            elif opcode == OP_PING:
                self.send(payload, OP_PONG)
            elif opcode == OP_CLOSE and self.transport is not None:
                self.transport.close()

    def send(self, payload: bytes, opcode: int = OP_BINARY) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(_frame(opcode, payload))


async def connect(port: int, path: str, on_message: Callable[[bytes], None]) -> LeanWebSocket:
    loop = asyncio.get_running_loop()
    _, ws = await loop.create_connection(lambda: LeanWebSocket(on_message), "127.0.0.1", port)
    key = base64.b64encode(os.urandom(16)).decode()
    assert ws.transport is not None
    ws.transport.write(
        (
            f"GET {path} HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\nupgrade: websocket\r\nconnection: Upgrade\r\n"
            f"sec-websocket-key: {key}\r\nsec-websocket-version: 13\r\n\r\n"
        ).encode()
    )
    await ws.upgraded
    return ws
