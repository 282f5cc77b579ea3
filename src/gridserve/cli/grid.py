"""A local grid: one gateway and N node agents as child processes on this machine."""

import os
import random
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

from gridserve.cli import launch
from gridserve.trust import tls

DEFAULT_MIX = (
    "gemma-270m",
    "emulated:rtx4090",
    "emulated:h100-sxm",
    "emulated:t4",
    "gemma-270m",
    "emulated:a100-80g",
    "emulated:rtx3090",
    "emulated:l40s",
)


class GridError(RuntimeError):
    pass


@dataclass
class LocalGrid:
    data_dir: Path
    port: int
    api_key: str
    admin_token: str
    engines: list[str]
    heartbeat_interval_s: float = 2.0
    threads: int = 2
    extra_node_args: list[str] = field(default_factory=list)
    extra_gateway_args: list[str] = field(default_factory=list)
    node_gateways: str | None = None
    """What nodes get as --gateway (default: this grid's gateway); several gateways comma-separated."""
    allow_emulated: bool = True
    """Start the gateway with --allow-emulated: a local grid is for tests and demos, and emulated cards are its
    usual nodes (False: a gateway that refuses them, as a production one does)."""
    tls_cert: Path | None = None
    tls_key: Path | None = None
    """The gateway serves HTTPS with this certificate and key (it must name 127.0.0.1)."""
    ca_file: Path | None = None
    """The CA nodes and this grid's own calls verify the gateway against (with tls_cert)."""
    node_module: str = "gridserve"
    """Nodes run as `python -m MODULE node ...`: tests run them as a light install would (tests/light_node.py)."""
    outbound_only: bool = False
    """Nodes open no port: each dials the gateway and is called over that connection (`--outbound-only`)."""
    node_wrapper: list[str] = field(default_factory=list)
    """A command nodes run under (e.g. `ip netns exec NS`: a test's network namespace)."""
    forked: bool = False
    """Start the gateway and nodes forked from a server that imported gridserve, torch and transformers once
    (cli/launch.py: 0.05 s a node instead of 4 s of imports); nodes under `node_wrapper` or another `node_module`
    start as new processes all the same."""
    procs: dict[str, launch.Proc] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"{'https' if self.tls_cert else 'http'}://127.0.0.1:{self.port}"

    def _spawn(self, name: str, args: list[str], module: str = "gridserve", wrapper: list[str] | None = None) -> None:
        logs = self.data_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        log = logs / f"{name}.log"
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if self.forked and module == "gridserve" and not wrapper:
            self.procs[name] = launch.fork(args, log, env)
        else:
            self.procs[name] = launch.popen(args, log, env, module, wrapper or [])

    def start_gateway(self) -> None:
        args = ["gateway", "--port", str(self.port), "--data-dir", str(self.data_dir)]
        args += ["--api-key", self.api_key, "--admin-token", self.admin_token]
        args += ["--heartbeat-interval", str(self.heartbeat_interval_s), *self.extra_gateway_args]
        args += ["--allow-emulated"] if self.allow_emulated else []
        if self.tls_cert is not None and self.tls_key is not None:
            args += ["--tls-cert", str(self.tls_cert), "--tls-key", str(self.tls_key)]
        self._spawn("gateway", args)

        def up() -> bool:
            self._check_alive()  # a gateway that exited says why at once, not after the wait
            return self._get("/health") is not None

        self._wait(up, 60, "gateway did not start")

    def node_port(self, index: int) -> int:
        return self.port + 1 + index

    def start_node(self, index: int, engine: str, extra: list[str] | None = None) -> str:
        name = f"node-{index}"
        gateway = self.node_gateways or self.url
        args = ["node", "--gateway", gateway, "--engine", engine]
        args += ["--outbound-only"] if self.outbound_only else ["--port", str(self.node_port(index))]
        args += ["--key", str(self.data_dir / "keys" / f"{name}.key"), "--threads", str(self.threads)]
        args += ["--ca-file", str(self.ca_file)] if self.ca_file is not None else []
        self._spawn(name, [*args, *self.extra_node_args, *(extra or [])], self.node_module, self.node_wrapper)
        return name

    def start(self, timeout_s: float = 600.0) -> None:
        self.start_gateway()
        for i, engine in enumerate(self.engines):
            self.start_node(i, engine)
        self.wait_nodes(len(self.engines), timeout_s)

    def wait_nodes(self, count: int, timeout_s: float) -> None:
        def ready() -> bool:
            self._check_alive()
            health = self._get("/health")
            return bool(health and health["nodes_live"] >= count)

        self._wait(ready, timeout_s, f"{count} node(s) did not register in time")

    def _check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                log = self.data_dir / "logs" / f"{name}.log"
                tail = log.read_text(errors="replace").strip().splitlines()[-1:] if log.exists() else []
                raise GridError(f"{name} exited with code {proc.returncode}: {' '.join(tail)} (log: {log})")

    def _get(self, path: str, admin: bool = False) -> Any:
        headers = {"Authorization": f"Bearer {self.admin_token}"} if admin else {}
        try:
            resp = httpx.get(self.url + path, headers=headers, timeout=2.0, verify=tls.client_verify(self.ca_file))
        except httpx.HTTPError:
            return None
        return resp.json() if resp.status_code == 200 else None

    def nodes(self) -> list[dict[str, Any]]:
        found = self._get("/admin/nodes", admin=True)
        return list(found["nodes"]) if found else []

    def _wait(self, check: Any, timeout_s: float, message: str) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if check():
                return
            time.sleep(0.2)
        raise GridError(message)

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 8
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def __enter__(self) -> "LocalGrid":
        return self

    def __exit__(self, *exc: tuple[type[BaseException] | None, BaseException | None, TracebackType | None]) -> None:
        self.stop()


def engine_mix(count: int, engines: list[str]) -> list[str]:
    pool = engines or list(DEFAULT_MIX)
    return [pool[i % len(pool)] for i in range(count)]


def _ephemeral_floor() -> int:
    """The lowest port the kernel hands out to outgoing connections (Linux; else the IANA range's start)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 49152


PORT_SHARE_ENV = "GRIDSERVE_PORT_SHARE"
"""`K/N`: use only the K-th of N equal slices of the range (parallel test workers never pick the same ports)."""


def _port_range(size: int) -> tuple[int, int]:
    low, top = 10000, max(12000, _ephemeral_floor()) - size
    share = os.environ.get(PORT_SHARE_ENV, "")
    index, _, count = share.partition("/")
    if index.isdigit() and count.isdigit() and 0 <= int(index) < int(count):
        width = (top - low) // int(count)
        low += int(index) * width
        top = low + width - size
    return low, max(low, top)


def free_port_block(size: int) -> int:
    """A base port with `size` consecutive free ports on 127.0.0.1, below the ephemeral range (so an outgoing
    connection cannot take one of them between this check and the server's bind)."""
    low, top = _port_range(size)
    for _ in range(200):
        base = random.randint(low, top)
        socks = []
        try:
            for port in range(base, base + size):
                sock = socket.socket()
                sock.bind(("127.0.0.1", port))
                socks.append(sock)
            return base
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
    raise RuntimeError("no free port block")
