"""Registration and heartbeats: the node's half of membership."""

import asyncio
import contextlib
import logging
import platform
import random
import time
from typing import TYPE_CHECKING, Any, NoReturn

import httpx
import orjson

import gridserve
from gridserve.engines import Engine, EngineError
from gridserve.node import microbench
from gridserve.node.config import NodeConfig
from gridserve.node.faults import Faults
from gridserve.node.hardware import Amdsmi, Nvml, detect_hardware
from gridserve.node.heap import settle_heap
from gridserve.trust import EnvelopeVerifier, FreshnessPolicy, Identity, TrustError, sign_envelope, tls
from gridserve.tunnel.wire import endpoint_for
from gridserve.types import Capability, HeartbeatPayload, NodeId, RegisterReply, RuntimeInfo, Telemetry
from gridserve.types.base import lenient
from gridserve.types.node import JOIN_TOKEN_HEADER, MeasuredFigures

if TYPE_CHECKING:
    from gridserve.node.tunnel import NodeTunnel

log = logging.getLogger("gridserve.node")


def runtime_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found: dict[str, str] = {}
    for name in ("torch", "transformers", "llama-cpp-python"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            continue
    return found


TUNNEL_WAIT_S = 6.0
"""How long an outbound-only node waits for its tunnel to open before a registration or heartbeat counts as failed
(the tunnel dials again within 5 s)."""


class RegistrationLimited(RuntimeError):
    """The gateway refused the registration for now (429): too many from this address or in all."""

    def __init__(self, wait_s: float) -> None:
        super().__init__(f"too many registrations right now (429); retrying in {wait_s:.0f} s")
        self.wait_s = wait_s


def _retry_after(value: str | None) -> float:
    """Seconds from a Retry-After header (1 when missing or not a number; at most 60)."""
    try:
        return min(60.0, max(0.0, float(value or "1")))
    except ValueError:
        return 1.0


class CannotJoin(Exception):
    """The node cannot join this grid as it is configured: retrying will not help, so it stops with this line."""


class GatewayUntrusted(CannotJoin):
    """The gateway's TLS certificate does not verify (or it does not speak TLS where https:// was given)."""


class JoinTokenRefused(CannotJoin):
    """The gateway admits only nodes holding a join token, and refused this node's (none, unknown, expired,
    revoked, or used up by other nodes): retrying cannot help, the node stops."""


def _refusal(resp: httpx.Response) -> tuple[str, str]:
    """(type, message) of a refused node message's answer (`{"error": {"type", "message"}}`); ("", text) if not."""
    try:
        error = resp.json()["error"]
        return str(error["type"]), str(error["message"])
    except (ValueError, KeyError, TypeError):
        return "", resp.text[:300]


class GatewayUnavailable(RuntimeError):
    """The gateway answered with a server error: another gateway of the grid may do better."""


class TunnelNotOpen(GatewayUnavailable):
    """An outbound-only node has no tunnel open to this gateway: it cannot be reached, so it does not say it can."""


def gateway_urls(value: str) -> list[str]:
    """`--gateway` as a comma-separated list of the grid's gateway URLs."""
    urls = [u.strip().rstrip("/") for u in value.split(",") if u.strip()]
    if not urls:
        raise ValueError("no gateway URL given")
    return urls


class NodeAgent:
    def __init__(self, config: NodeConfig, identity: Identity, engine: Engine) -> None:
        self.config = config
        self.identity = identity
        self.engine = engine
        self.nvml = Nvml.open()
        self.amd = Amdsmi() if self.nvml.handles else Amdsmi.open()
        self.measured: MeasuredFigures | None = None
        """The join micro-benchmark's figures (node/microbench.py), sent with every registration."""
        self._benchmarked = False
        self.gateway_key: str | None = config.gateway_key
        self.heartbeat_interval_s = config.heartbeat_interval_s or 2.0
        self.registered = asyncio.Event()
        self.refused: CannotJoin | None = None
        """Why this node cannot join (its join token, the gateway's certificate): the node stops (node/main.py)."""
        self.stopped = asyncio.Event()
        self.faults = Faults(allowed=False)
        self.verifier = EnvelopeVerifier(FreshnessPolicy(max_skew_s=config.max_skew_s), time.time)
        self._seq = 0
        self.gateways = gateway_urls(config.gateway_url)
        """The grid's gateways (they share one database and one key); heartbeats go to one, the next on failure."""
        self._current = 0
        self._client = httpx.AsyncClient(timeout=10.0, verify=tls.client_verify(config.ca_file))
        self.tunnels: dict[str, NodeTunnel] = {}
        """An outbound-only node's tunnel to each gateway (node/tunnel.py); empty for a node with a port."""

    @property
    def gateway_url(self) -> str:
        return self.gateways[self._current]

    def next_gateway(self, why: str) -> None:
        """Move to the next gateway of the list (registering there comes next)."""
        if len(self.gateways) > 1:
            old = self.gateway_url
            self._current = (self._current + 1) % len(self.gateways)
            log.warning("gateway %s unusable (%s); moving to %s", old, why, self.gateway_url)

    def capability(self) -> Capability:
        hardware = self.engine.advertised_hardware() or detect_hardware(self.nvml, self.amd, self.measured)
        if self.config.memory_bytes is not None:  # the operator's share of the card for this node
            hardware = hardware.model_copy(update={"memory_bytes": self.config.memory_bytes})
        return Capability(
            node_id=NodeId(self.identity.node_id),
            public_key=self.identity.public_key,
            endpoint=endpoint_for(self.identity.node_id) if self.config.outbound_only else self.config.endpoint,
            engine=self.engine.kind,
            models=self.engine.offers(),
            loadable_models=self.engine.loadable(),
            stage_models=tuple(getattr(self.engine, "stage_models", tuple)()),  # StageEngine with --layers auto
            prefix_cache_tokens=getattr(self.engine, "prefix_cache_tokens", lambda: None)(),  # TorchEngine
            prefix_block_tokens=getattr(self.engine, "prefix_block_tokens", lambda: None)(),
            interleaved=bool(getattr(self.engine, "interleaved", False)),  # TorchEngine
            max_running=self._max_running(),
            hardware=hardware,
            runtime=RuntimeInfo(
                gridserve=gridserve.__version__,
                python=platform.python_version(),
                engine=self.engine.kind,
                versions=runtime_versions(),
            ),
            price_per_mtok=self.config.price_per_mtok,
        )

    def _max_running(self) -> int | None:
        """The operator's `--max-running` (an upstream server's batch limit), else what the engine says."""
        if self.config.max_running is not None:
            return self.config.max_running
        said: int | None = getattr(self.engine, "max_running", lambda: None)()  # EmulatedEngine
        return said

    def telemetry(self) -> Telemetry:
        stats = self.engine.stats
        gpu = self.nvml.sample()
        import psutil

        if gpu is None:
            memory = psutil.virtual_memory()
            gpu_fields: dict[str, Any] = {
                "utilization": psutil.cpu_percent(interval=None) / 100.0,
                "memory_used_bytes": int(memory.used),
                "memory_total_bytes": int(memory.total),
            }
        else:
            gpu_fields = {
                "utilization": gpu["utilization"],
                "memory_used_bytes": int(gpu["memory_used"]),
                "memory_total_bytes": int(gpu["memory_total"]),
                "temperature_c": gpu["temperature"],
                "clock_ratio": gpu["clock_ratio"],
                "clock_reasons": gpu["clock_reasons"],
            }
        override = getattr(self.engine, "telemetry_override", None)
        if override is not None:
            gpu_fields.update(override())
        return Telemetry(
            **self.faults.telemetry(gpu_fields),
            faults=self.faults.spec.active(),
            queue_depth=max(0, stats.queued),
            active_requests=max(0, stats.active),
            tokens_per_s=stats.tokens_per_s(time.monotonic()),
            errors=tuple(stats.errors[-10:]),
        )

    def _signed(self, payload: Any, purpose: str) -> bytes:
        return sign_envelope(
            self.identity, payload, purpose=purpose, now=time.time(), lifetime_s=self.config.message_lifetime_s
        )

    async def _benchmark_once(self) -> None:
        """Measure the card before the first registration (node/microbench.py), once: a GPU node's engine that is
        not emulated (an emulated engine advertises hardware it does not have)."""
        if self._benchmarked:
            return
        self._benchmarked = True
        if self.engine.advertised_hardware() is None:
            has_gpu = bool(self.nvml.handles or self.amd.handles)
            self.measured = await microbench.at_join(has_gpu)

    async def register(self) -> None:
        await self._benchmark_once()
        await self._tunnel_open()
        body = self._signed({"capability": self.capability().model_dump(mode="json")}, "register")
        headers = {"content-type": "application/json"}
        if self.config.join_token:
            headers[JOIN_TOKEN_HEADER] = self.config.join_token
        try:
            resp = await self._client.post(self.gateway_url + "/nodes/register", content=body, headers=headers)
        except httpx.ConnectError as exc:
            why = tls.untrusted(exc)
            if why is None:
                raise
            self._cannot_join(GatewayUntrusted(f"gateway {self.gateway_url}: {why}"))
        if resp.status_code == 429:
            raise RegistrationLimited(_retry_after(resp.headers.get("retry-after")))
        kind, message = _refusal(resp) if resp.status_code == 401 else ("", "")
        if kind == "join_token":
            self._cannot_join(JoinTokenRefused(f"gateway {self.gateway_url} refused this node: {message}"))
        if resp.status_code != 200:
            raise RuntimeError(f"registration refused ({resp.status_code}): {resp.text[:300]}")
        envelope = self.verifier.verify(resp.content, purpose="register-reply", expected_keyid=self.gateway_key)
        reply, newer = lenient(RegisterReply, envelope.payload)
        if newer:
            log.info("the gateway (a newer version) also said %s; this node does not read them", ", ".join(newer))
        if reply.unread:
            log.warning(
                "the gateway (an older version) does not read these fields of this node's capability: %s; it routes "
                "to this node by the rest",
                ", ".join(reply.unread),
            )
        if reply.gateway_public_key != envelope.keyid:
            raise TrustError("registration reply names a gateway key other than the one that signed it")
        self.gateway_key = envelope.keyid
        if self.config.heartbeat_interval_s is None:
            self.heartbeat_interval_s = reply.heartbeat_interval_s
        self.registered.set()
        log.info("registered as %s with gateway %s", self.identity.node_id, self.gateway_url)

    async def load(self, model: str) -> None:
        """Load a model the gateway asked for (pre-warming), then register again with the new capability."""
        try:
            await self.engine.load(model)
        except EngineError as exc:
            self.engine.stats.note_error(f"load {model} failed: {exc}")
            log.warning("could not load %s: %s", model, exc)
            return
        log.info("loaded %s; announcing it", model)
        settle_heap(f"loading {model}")
        await self.register()

    async def assign_layers(self, start: int, end: int) -> None:
        """Load the layer range the gateway's plan gives this stage node, then register again with it."""
        assign = getattr(self.engine, "assign", None)
        if assign is None:
            return
        try:
            await assign(start, end)
        except EngineError as exc:
            self.engine.stats.note_error(f"assigning layers [{start}, {end}) failed: {exc}")
            log.warning("could not load layers [%d, %d): %s", start, end, exc)
            return
        log.info("running layers [%d, %d) as assigned; announcing it", start, end)
        settle_heap(f"loading layers [{start}, {end})")
        await self.register()

    async def heartbeat(self) -> None:
        self._seq += 1
        payload = HeartbeatPayload(node_id=NodeId(self.identity.node_id), seq=self._seq, telemetry=self.telemetry())
        status, text = await self._send_heartbeat(payload.model_dump(mode="json"))
        if status == 404:
            log.warning("gateway does not know this node (restarted?); registering again")
            self.registered.clear()
            await self.register()
        elif status >= 500 and len(self.gateways) > 1:
            raise GatewayUnavailable(f"heartbeat answered {status}")
        elif status != 200:
            log.warning("heartbeat refused (%s): %s", status, text[:200])

    async def _tunnel_open(self) -> None:
        """An outbound-only node is reachable only through its tunnel: it registers and heartbeats only while the
        tunnel to the gateway is open (a heartbeat says the node can be given work). Waits a moment for it."""
        tunnel = self.tunnels.get(self.gateway_url)
        if tunnel is None or tunnel.connected.is_set():
            return
        try:
            await asyncio.wait_for(tunnel.connected.wait(), TUNNEL_WAIT_S)
        except TimeoutError:
            raise TunnelNotOpen(f"no tunnel open to {self.gateway_url} yet") from None

    async def _send_heartbeat(self, payload: dict[str, Any]) -> tuple[int, str]:
        """Over the tunnel to the current gateway (an outbound-only node), else over HTTP (signed either way; over
        the tunnel the bare payload goes too, which the channel authenticates where the gateway takes it)."""
        body = self._signed(payload, "heartbeat")
        tunnel = self.tunnels.get(self.gateway_url)
        if tunnel is not None:
            await self._tunnel_open()
            reply = await tunnel.heartbeat(body, orjson.dumps(payload))
            if reply is None:
                raise TunnelNotOpen(f"the tunnel to {self.gateway_url} closed")
            return reply[0], reply[1].decode(errors="replace")
        resp = await self._client.post(
            self.gateway_url + "/nodes/heartbeat", content=body, headers={"content-type": "application/json"}
        )
        return resp.status_code, resp.text

    def _cannot_join(self, why: CannotJoin) -> NoReturn:
        self.refused = why
        self.stopped.set()
        raise why

    async def run(self) -> None:
        """Register (retrying until the gateway answers), then heartbeat forever; or stop when this node cannot
        join as configured (`refused`: its join token, the gateway's certificate)."""
        with contextlib.suppress(CannotJoin):
            await self._run()

    async def _run(self) -> None:
        await self._register_somewhere()
        while True:  # the first heartbeat right away: the gateway has telemetry from the start
            try:
                await self.heartbeat()
            except (httpx.TransportError, GatewayUnavailable) as exc:
                log.warning("heartbeat to %s failed: %s", self.gateway_url, exc)
                if len(self.gateways) > 1:  # the gateway is gone: join another one at once
                    self.next_gateway(str(exc) or type(exc).__name__)
                    self.registered.clear()
                    await self._register_somewhere()
                    continue
            except (httpx.HTTPError, RuntimeError, TrustError) as exc:
                log.warning("heartbeat failed: %s", exc)
            await asyncio.sleep(self.heartbeat_interval_s)

    async def _register_somewhere(self) -> None:
        """Register with the current gateway, moving along the list on failure, until one accepts."""
        delay = 0.2
        while not self.registered.is_set():
            try:
                await self.register()
            except RegistrationLimited as exc:  # the gateway is there, admitting joins at its rate: wait our turn
                log.warning("registration with %s: %s", self.gateway_url, exc)
                await asyncio.sleep(exc.wait_s + random.uniform(0.0, 1.0))
            except (httpx.HTTPError, RuntimeError, TrustError) as exc:
                log.warning("registration with %s failed: %s; retrying in %.1f s", self.gateway_url, exc, delay)
                self.next_gateway(str(exc) or type(exc).__name__)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def aclose(self) -> None:
        await self._client.aclose()
