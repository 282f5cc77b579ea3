"""A network namespace with no way in, for outbound-only nodes (tests/grid/test_outbound.py).

`Isolated` makes a namespace with nothing but its own loopback: no interface joins it to this machine's network, so
nothing outside can reach anything inside. Its only way out is `Egress`, a relay that listens on the namespace's
loopback and connects out to one address on this machine's loopback, as a NAT router lets a home machine dial out
(and nothing dial in). Needs root (CAP_SYS_ADMIN); `available()` says whether this machine allows it.
"""

import contextlib
import ctypes
import os
import secrets
import selectors
import socket
import subprocess
import threading
from collections.abc import Iterator

CLONE_NEWNET = 0x40000000
CHUNK = 65536


def available() -> bool:
    if os.geteuid() != 0:
        return False
    name = "gs-probe-" + secrets.token_hex(3)
    made = subprocess.run(["ip", "netns", "add", name], capture_output=True, check=False).returncode == 0
    if made:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
    return made


@contextlib.contextmanager
def isolated() -> Iterator[str]:
    """A fresh namespace (its loopback up), deleted afterwards."""
    name = "gs-" + secrets.token_hex(4)
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def interfaces(name: str) -> list[str]:
    out = subprocess.run(["ip", "-n", name, "-o", "link"], capture_output=True, text=True, check=True).stdout
    return [line.split(":")[1].strip().split("@")[0] for line in out.splitlines() if line.strip()]


def _listen_inside(name: str) -> socket.socket:
    """A listening socket on the namespace's loopback, made from a thread that enters the namespace for it
    (setns moves only the calling thread; the socket stays in the namespace it was made in)."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    made: list[socket.socket | BaseException] = []

    def enter_and_listen() -> None:
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        target = os.open(f"/run/netns/{name}", os.O_RDONLY)
        try:
            if libc.setns(target, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns into the namespace failed")
            try:
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sock.bind(("127.0.0.1", 0))
                sock.listen(256)
                made.append(sock)
            finally:
                if libc.setns(home, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns back failed")
        except BaseException as exc:
            made.append(exc)
        finally:
            os.close(home)
            os.close(target)

    thread = threading.Thread(target=enter_and_listen)
    thread.start()
    thread.join()
    if isinstance(made[0], BaseException):
        raise made[0]
    return made[0]


class Egress:
    """Relays connections made inside the namespace to `127.0.0.1:port` (`inside_port` there) out to
    `127.0.0.1:target_port` here. At most `max_connections` at a time; stops with `close()`."""

    def __init__(self, name: str, target_port: int, max_connections: int = 64) -> None:
        self.listener = _listen_inside(name)
        self.inside_port = int(self.listener.getsockname()[1])
        self.target_port = target_port
        self.max_connections = max_connections
        self.relayed = 0
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        selector = selectors.DefaultSelector()
        self.listener.setblocking(False)
        selector.register(self.listener, selectors.EVENT_READ, None)
        while not self._stop.is_set():
            for key, _ in selector.select(timeout=0.2):
                if key.data is None:
                    self._accept(selector)
                else:
                    self._pump(selector, key.fileobj, key.data)  # type: ignore[arg-type]
        selector.close()

    def _accept(self, selector: selectors.BaseSelector) -> None:
        inner, _ = self.listener.accept()
        if len(self._pairs) >= self.max_connections:
            inner.close()
            return
        outer = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
        for sock in (inner, outer):
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        selector.register(inner, selectors.EVENT_READ, outer)
        selector.register(outer, selectors.EVENT_READ, inner)
        self._pairs.append((inner, outer))
        self.relayed += 1

    def _pump(self, selector: selectors.BaseSelector, source: socket.socket, sink: socket.socket) -> None:
        try:
            data = source.recv(CHUNK)
            if data:
                sink.setblocking(True)
                sink.sendall(data)
                sink.setblocking(False)
                return
        except OSError:
            pass
        for sock in (source, sink):  # one side ended: end both, as a NAT's connection ends
            with contextlib.suppress(KeyError, ValueError):
                selector.unregister(sock)
            sock.close()
        self._pairs = [p for p in self._pairs if source not in p]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for inner, outer in self._pairs:
            inner.close()
            outer.close()
        self.listener.close()
