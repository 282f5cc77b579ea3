"""`gridserve`: up, demo, gateway, node, nodes."""

import dataclasses
import json
import os
import signal
import sys
import time
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Annotated

import httpx
import typer
from rich.console import Console
from rich.live import Live
from rich.markup import escape

app = typer.Typer(
    help="gridserve: LLM inference from a grid of heterogeneous nodes behind one OpenAI endpoint.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console() if sys.stdout.isatty() else Console(width=220)  # piped: do not squeeze tables
err = Console(stderr=True)

if TYPE_CHECKING:
    from gridserve.node.faults import Faults
    from gridserve.observability import LogFormat
    from gridserve.types import DeviceFigures

DataDir = Annotated[Path, typer.Option(help="where keys, secrets, logs and the SQLite store live")]


def fail(message: str) -> typer.Exit:
    # one line, however long; the message's own brackets are text ("pip install 'gridserve[gemma]'"), not markup
    err.print(f"[red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    return typer.Exit(code=2)


def _secrets(data_dir: Path, api_key: str | None, admin_token: str | None) -> tuple[str, str]:
    from gridserve.gateway.main import read_or_create_secret

    key = api_key or os.environ.get("GRIDSERVE_API_KEY") or read_or_create_secret(data_dir / "api.key", "gs-")
    admin = (
        admin_token
        or os.environ.get("GRIDSERVE_ADMIN_TOKEN")
        or read_or_create_secret(data_dir / "admin.token", "gsa-")
    )
    return key, admin


LogFormatOption = Annotated[str, typer.Option(help="text or json (one JSON object per line)")]


def _log_format(value: str) -> "LogFormat":
    if value not in ("text", "json"):
        raise fail(f"--log-format must be text or json, not {value!r}")
    return "json" if value == "json" else "text"


def _faults(allowed: bool, items: list[str]) -> "Faults":
    from pydantic import ValidationError

    from gridserve.node.faults import Faults, parse_fault_options

    if items and not allowed:
        raise fail("--fault needs --allow-faults (fault injection is off by default)")
    try:
        return Faults(allowed=allowed, initial=parse_fault_options(items) if items else None)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise fail(f"--fault {'.'.join(str(p) for p in first['loc'])}: {first['msg']}") from None
    except ValueError as exc:
        raise fail(str(exc)) from None


@app.callback()
def _everywhere(
    ca_file: Annotated[
        Path | None,
        typer.Option(
            envvar="GRIDSERVE_CA_FILE",
            help="verify https:// gateways against this CA certificate (a private grid's CA), in every command",
        ),
    ] = None,
) -> None:
    """gridserve: LLM inference from a grid of heterogeneous nodes behind one OpenAI endpoint."""
    if ca_file is None:
        return
    from gridserve.trust import tls

    try:
        tls.client_verify(ca_file)
    except tls.TlsConfigError as exc:
        raise fail(str(exc)) from None
    # every HTTP client this command makes (httpx, and the OpenAI SDK over it) verifies against it
    os.environ["SSL_CERT_FILE"] = str(ca_file)
    os.environ[tls.CA_FILE_ENV] = str(ca_file)


ModelConfigOption = Annotated[
    list[Path] | None,
    typer.Option(
        "--model-config",
        help="a model from its Hugging Face config.json, named after its directory (repeatable); the gateway and "
        "the nodes serving it each need it",
    ),
]


@app.command()
def gateway(
    port: Annotated[int, typer.Option(help="port to listen on")] = 8000,
    host: Annotated[str, typer.Option(help="address to bind")] = "127.0.0.1",
    db: Annotated[
        str | None,
        typer.Option(help="SQLAlchemy URL (default: SQLite in --data-dir); gateways on one PostgreSQL share state"),
    ] = None,
    key_file: Annotated[
        Path | None,
        typer.Option("--key", help="gateway signing key, shared by a grid's gateways (default: in --data-dir)"),
    ] = None,
    gateway_id: Annotated[str | None, typer.Option(help="this gateway's name on a shared database")] = None,
    api_key: Annotated[list[str] | None, typer.Option(help="API key clients must send (repeatable)")] = None,
    admin_token: Annotated[str | None, typer.Option(help="token for the admin API")] = None,
    data_dir: DataDir = Path(".gridserve"),
    heartbeat_interval: Annotated[float, typer.Option(help="seconds between node heartbeats")] = 2.0,
    max_body_bytes: Annotated[int, typer.Option(help="largest accepted request body")] = 1_000_000,
    profile: Annotated[Path | None, typer.Option(help="scheduling profile (YAML)")] = None,
    hedging: Annotated[bool, typer.Option(help="send late requests to the runner-up too")] = True,
    prefix_routing: Annotated[
        bool, typer.Option(help="prefer nodes that probably hold the prompt's prefix in their KV cache")
    ] = True,
    scheduler_kernel: Annotated[
        bool,
        typer.Option(help="decide in the compiled kernel (numba: ~100 MB more memory, 0.1-0.3 ms less a decision)"),
    ] = True,
    standby: Annotated[int, typer.Option(help="warm spare nodes kept per model in demand")] = 1,
    audit_rate: Annotated[float, typer.Option(help="share of trusted nodes' completions re-executed")] = 0.05,
    redundancy: Annotated[
        bool, typer.Option(help="check audited answers the gateway cannot re-execute against other nodes' answers")
    ] = True,
    redundancy_strikes: Annotated[
        int, typer.Option(min=1, help="consecutive 2-1 splits against a node that quarantine it (redundancy)")
    ] = 8,
    redundancy_logprob_tolerance: Annotated[
        float | None,
        typer.Option(
            min=0.0,
            help="nats two nodes' log-probabilities of the same token may differ by in a redundancy check "
            "(default: gateway/config.py REDUNDANCY_LOGPROB_TOLERANCE, measured on llama.cpp)",
        ),
    ] = None,
    canary_interval: Annotated[float, typer.Option(help="mean seconds between canary requests (0: none)")] = 60.0,
    responses_ttl_days: Annotated[
        float, typer.Option(min=0, help="stored responses (/v1/responses) are deleted after this many days (0: never)")
    ] = 30.0,
    canary_timeout: Annotated[
        float, typer.Option(min=0.5, help="seconds a canary may take before it is a failed canary")
    ] = 20.0,
    allow_emulated: Annotated[
        bool, typer.Option(help="accept emulated nodes (timings, no weights): for tests and demos only")
    ] = False,
    allow_unlisted_models: Annotated[
        bool, typer.Option(help="accept models not in the allowed digests (a private grid of trusted nodes)")
    ] = False,
    model_config: ModelConfigOption = None,
    retire_silent: Annotated[
        float, typer.Option(min=1.0, help="seconds a down node may stay silent before it is no longer probed")
    ] = 120.0,
    vetting_checks: Annotated[
        int, typer.Option(min=0, help="audits or canaries a new identity passes before it is routed like any node")
    ] = 3,
    whitewash_checks: Annotated[
        int, typer.Option(min=0, help="more checks owed by a new identity from where a quarantined one was")
    ] = 6,
    registration_rate: Annotated[
        float, typer.Option(min=0.01, help="registrations a second one address may make, after its burst")
    ] = 1.0,
    registration_burst: Annotated[int, typer.Option(min=1, help="registrations one address may make at once")] = 20,
    registration_rate_total: Annotated[
        float, typer.Option(min=0.01, help="registrations a second from all addresses (bursts of 10x)")
    ] = 20.0,
    allowed_digests: Annotated[
        Path | None, typer.Option(help="JSON {model: [weights digest, ...]} nodes may serve")
    ] = None,
    join_tokens: Annotated[
        bool, typer.Option(help="admit only nodes holding a join token (gridserve tokens create)")
    ] = False,
    otlp_endpoint: Annotated[
        str | None,
        typer.Option(help="send request traces to this OTLP/HTTP collector, e.g. http://127.0.0.1:4318/v1/traces"),
    ] = None,
    tls_cert: Annotated[
        Path | None, typer.Option(help="serve HTTPS with this certificate (PEM; its chain after it)")
    ] = None,
    tls_key: Annotated[Path | None, typer.Option(help="the private key of --tls-cert (PEM)")] = None,
    drain: Annotated[
        int, typer.Option(min=0, max=3600, help="seconds a stopping gateway lets requests under way finish (SIGTERM)")
    ] = 3,
    node_ca_file: Annotated[
        Path | None, typer.Option(help="verify nodes that serve HTTPS against this CA certificate (private grids)")
    ] = None,
    queue_share: Annotated[
        list[str] | None,
        typer.Option(
            metavar="CLASS=SHARE",
            help="the share of a model's batch slots a priority class (interactive, standard, batch) may fill when "
            "requests wait at the gateway (repeatable; default batch=0.75, the others 1)",
        ),
    ] = None,
    queue_deadline: Annotated[
        list[str] | None,
        typer.Option(
            metavar="CLASS=SECONDS",
            help="how long a waiting request of a priority class waits for room before a 503 (repeatable; default "
            "interactive=10, standard=30, batch=120)",
        ),
    ] = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning")] = "info",
    log_format: LogFormatOption = "text",
) -> None:
    """Run the gateway: the OpenAI API, node membership, scheduling and the admin API."""
    from gridserve.gateway.config import GatewayConfig
    from gridserve.gateway.main import run_gateway
    from gridserve.gateway.tenancy.queue import parse_class_values
    from gridserve.trust import tls

    try:
        queue_shares = parse_class_values("--queue-share", queue_share or [], at_most=1.0)
        queue_deadlines_s = parse_class_values("--queue-deadline", queue_deadline or [])
    except ValueError as exc:
        raise fail(str(exc)) from None
    try:
        tls.server_files(tls_cert, tls_key)
        if node_ca_file is not None:
            tls.client_verify(node_ca_file)
    except tls.TlsConfigError as exc:
        raise fail(str(exc)) from None

    for name in _register_model_configs(model_config):
        console.print(f"model {name} from its config")
    key, admin = _secrets(data_dir, api_key[0] if api_key else None, admin_token)
    if profile is not None:
        from gridserve.scheduler import ProfileError, load_profile

        try:
            load_profile(profile)
        except ProfileError as exc:
            raise fail(f"profile {profile}: {exc}") from None
    if allowed_digests is not None:
        from gridserve.trust.attestation import load_digests

        try:
            load_digests(allowed_digests)
        except ValueError as exc:
            raise fail(str(exc)) from None
    keys = tuple(api_key) if api_key else (key,)
    config = GatewayConfig(
        port=port,
        host=host,
        data_dir=data_dir,
        db_url=db,
        key_file=key_file,
        gateway_id=gateway_id or "",
        api_keys=keys,
        admin_token=admin,
        heartbeat_interval_s=heartbeat_interval,
        max_body_bytes=max_body_bytes,
        profile_path=profile,
        hedging=hedging,
        prefix_routing=prefix_routing,
        scheduler_kernel=scheduler_kernel,
        standby_per_model=standby,
        audit_rate=audit_rate,
        redundancy=redundancy,
        redundancy_strikes=redundancy_strikes,
        canary_interval_s=canary_interval,
        responses_ttl_s=responses_ttl_days * 86_400.0,
        canary_timeout_s=canary_timeout,
        allow_emulated=allow_emulated,
        allow_unlisted_models=allow_unlisted_models,
        retire_silent_s=retire_silent,
        vetting_checks=vetting_checks,
        whitewash_checks=whitewash_checks,
        registration_rate=registration_rate,
        registration_burst=registration_burst,
        registration_rate_total=registration_rate_total,
        allowed_digests_path=allowed_digests,
        join_tokens_required=join_tokens,
        otlp_endpoint=otlp_endpoint,
        tls_cert=tls_cert,
        tls_key=tls_key,
        drain_s=drain,
        node_ca_file=node_ca_file,
        queue_shares=queue_shares,
        queue_deadlines_s=queue_deadlines_s,
    )
    if redundancy_logprob_tolerance is not None:
        config = dataclasses.replace(config, redundancy_logprob_tolerance=redundancy_logprob_tolerance)
    console.print(f"gateway on {config.scheme}://{host}:{port}  (api key in {data_dir / 'api.key'} unless given)")
    try:
        run_gateway(config, log_level=log_level, log_format=_log_format(log_format))
    except Exception as exc:  # one readable line, not a traceback
        raise fail(f"gateway failed: {exc}") from None


def _register_model_configs(paths: list[Path] | None) -> list[str]:
    """Add the models of these config.json files to this process's catalogue (one readable line if one is bad)."""
    from gridserve.catalog.models import register_config

    names = []
    for path in paths or ():
        try:
            names.append(register_config(path).name)
        except (OSError, ValueError) as exc:
            raise fail(f"--model-config {path}: {exc}") from None
    return names


def _device_figures(path: Path | None) -> "DeviceFigures | None":
    """A card as its driver would describe it, read from a JSON file (one readable line if it is not one)."""
    if path is None:
        return None
    from pydantic import ValidationError

    from gridserve.types import DeviceFigures

    try:
        return DeviceFigures.model_validate_json(path.read_bytes())
    except OSError as exc:
        raise fail(f"--device-figures {path}: {exc.strerror or exc}") from None
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "the file"
        raise fail(f"--device-figures {path}: {where}: {first['msg']}") from None


def _layers(text: str | None) -> tuple[int, int] | None:
    if text is None or text == "auto":
        return None
    start, sep, end = text.partition(":")
    if not sep or not start.strip().isdigit() or not end.strip().isdigit() or int(end) <= int(start):
        raise fail(f"--layers {text!r}: expected START:END with START < END (e.g. 0:9), or auto")
    return int(start), int(end)


@app.command()
def node(
    gateway: Annotated[
        str,
        typer.Option(help="gateway URL, e.g. http://127.0.0.1:8000; several, comma-separated: the next on failure"),
    ],
    engine: Annotated[str, typer.Option(help="tiny | gemma-270m | emulated:<hardware> | openai-upstream")],
    port: Annotated[int | None, typer.Option(help="port for this node's API (not with --outbound-only)")] = None,
    outbound_only: Annotated[
        bool,
        typer.Option(
            help="open no port: dial the gateway and take its calls over that connection (behind NAT or a firewall)"
        ),
    ] = False,
    key: Annotated[Path, typer.Option(help="Ed25519 key file (created with mode 0600 if missing)")] = Path("node.key"),
    host: Annotated[str, typer.Option(help="address to bind")] = "127.0.0.1",
    advertise_url: Annotated[str | None, typer.Option(help="URL the gateway should call")] = None,
    model: Annotated[list[str] | None, typer.Option(help="emulated: catalogue model(s); upstream: served name")] = None,
    upstream_url: Annotated[str | None, typer.Option(help="openai-upstream: base URL of the server")] = None,
    upstream_model: Annotated[str | None, typer.Option(help="openai-upstream: model id upstream")] = None,
    max_context: Annotated[int, typer.Option(help="openai-upstream: context of the upstream model")] = 4096,
    tasks: Annotated[
        str | None,
        typer.Option(
            help="what to offer the model for, comma-separated: generate (chat, completions), embed (/v1/embeddings); "
            "default: tiny/gemma both, the others generate (an upstream server started to embed: embed)"
        ),
    ] = None,
    threads: Annotated[int, typer.Option(help="torch threads for local engines")] = 2,
    prefix_cache_mb: Annotated[
        int, typer.Option(help="tiny/gemma: MiB for the KV cache of recent prompts, reused by prompts that start alike")
    ] = 512,  # engines/base.py DEFAULT_PREFIX_CACHE_MB (not imported here: the CLI starts without the engines)
    price: Annotated[float, typer.Option(help="USD per million generated tokens")] = 0.0,
    memory_gib: Annotated[
        float | None, typer.Option(help="memory the engine may use for weights + KV cache (default: detected)")
    ] = None,
    max_running: Annotated[
        int | None,
        typer.Option(
            help="upstream: the most requests the server runs at once (vLLM --max-num-seqs, llama.cpp --parallel; "
            "0: no limit); the gateway queues beyond it (default: the card's batch slots in the catalogue)"
        ),
    ] = None,
    fixed_ttft_ms: Annotated[float | None, typer.Option(help="emulated: fixed time to first token")] = None,
    fixed_itl_ms: Annotated[float | None, typer.Option(help="emulated: fixed inter-token latency")] = None,
    gateway_key: Annotated[str | None, typer.Option(help="pin the gateway's public key (base64)")] = None,
    join_token: Annotated[
        str | None,
        typer.Option(envvar="GRIDSERVE_JOIN_TOKEN", help="join token from the grid's admin (gridserve tokens create)"),
    ] = None,
    ca_file: Annotated[
        Path | None,
        typer.Option(
            envvar="GRIDSERVE_CA_FILE", help="verify an https:// gateway against this CA certificate (private grids)"
        ),
    ] = None,
    tls_cert: Annotated[
        Path | None, typer.Option(help="serve this node's port over HTTPS with this certificate (PEM; chain after it)")
    ] = None,
    tls_key: Annotated[Path | None, typer.Option(help="the private key of --tls-cert (PEM)")] = None,
    slowdown: Annotated[float, typer.Option(help="emulated: run N times slower than spec, silently")] = 1.0,
    model_config: ModelConfigOption = None,
    device_figures: Annotated[
        Path | None,
        typer.Option(help="emulated: a card in no table, as its driver describes it (JSON; see examples/cards/)"),
    ] = None,
    lazy: Annotated[bool, typer.Option(help="tiny/gemma: load the weights only when asked (pre-warming)")] = False,
    loadable: Annotated[list[str] | None, typer.Option(help="emulated: a model on disk, loaded when asked")] = None,
    load_gbps: Annotated[float, typer.Option(help="emulated: disk-to-device GB/s when loading")] = 2.0,
    fifo_slots: Annotated[
        bool, typer.Option(help="emulated: at most the card's batch slots run; the rest wait in order")
    ] = False,
    layers: Annotated[
        str | None,
        typer.Option(
            help="tiny/gemma: run layers START:END only, as a pipeline stage (e.g. 0:9); auto: the gateway's "
            "planner assigns the range"
        ),
    ] = None,
    allow_dishonest: Annotated[bool, typer.Option(help="allow --dishonest modes (tests and demos only)")] = False,
    dishonest: Annotated[
        list[str] | None, typer.Option(help="cheat on purpose, for tests (modes: see node/dishonest.py)")
    ] = None,
    allow_faults: Annotated[bool, typer.Option(help="accept fault injection (tests and demos only)")] = False,
    fault: Annotated[list[str] | None, typer.Option(help="inject a fault at start: key=value (repeatable)")] = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning")] = "info",
    log_format: LogFormatOption = "text",
) -> None:
    """Run a node agent: an engine behind a signed identity, registered with a gateway."""
    if engine in ("tiny", "gemma-270m"):
        # OpenMP threads that spin after each parallel region steal the cores from the next process's work when
        # several nodes share a machine (pipeline stages on one host: 25% slower tokens/s measured on 2 cores).
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from gridserve.catalog.hardware import UnknownHardware
    from gridserve.catalog.models import UnknownModel
    from gridserve.engines import EngineError
    from gridserve.engines.registry import EngineOptions
    from gridserve.node.agent import CannotJoin
    from gridserve.node.config import NodeConfig
    from gridserve.node.main import run_node
    from gridserve.trust import tls

    try:
        tls.client_verify(ca_file)
    except tls.TlsConfigError as exc:
        raise fail(str(exc)) from None
    if outbound_only and (port is not None or advertise_url is not None or tls_cert is not None):
        raise fail("--outbound-only opens no port: leave out --port, --advertise-url and --tls-cert")
    try:
        tls.server_files(tls_cert, tls_key)
    except tls.TlsConfigError as exc:
        raise fail(str(exc)) from None
    if tls_cert is not None and advertise_url is not None and not advertise_url.startswith("https://"):
        raise fail("--tls-cert serves HTTPS: --advertise-url must be an https:// URL")
    if not outbound_only and port is None:
        raise fail("give --port for this node's API, or --outbound-only to open none (behind NAT)")

    config = NodeConfig(
        gateway_url=gateway,
        engine=engine,
        port=port or 0,
        outbound_only=outbound_only,
        host=host,
        advertise_url=advertise_url,
        key_file=key,
        gateway_key=gateway_key,
        join_token=join_token,
        ca_file=ca_file,
        tls_cert=tls_cert,
        tls_key=tls_key,
        price_per_mtok=price,
        memory_bytes=int(memory_gib * 2**30) if memory_gib is not None else None,
        max_running=max_running,
    )
    if memory_gib is not None and memory_gib <= 0:
        raise fail(f"--memory-gib must be positive (got {memory_gib})")
    if max_running is not None and max_running < 0:
        raise fail(f"--max-running must be 0 (no limit) or more (got {max_running})")
    if prefix_cache_mb < 0:
        raise fail(f"--prefix-cache-mb must be 0 (no prefix cache) or more (got {prefix_cache_mb})")
    options = EngineOptions(
        threads=threads,
        models=tuple(model or ()),
        upstream_url=upstream_url,
        upstream_model=upstream_model,
        max_context=max_context,
        fixed_ttft_ms=fixed_ttft_ms,
        fixed_itl_ms=fixed_itl_ms,
        slowdown=slowdown,
        lazy=lazy,
        loadable=tuple(loadable or ()),
        load_gbps=load_gbps,
        fifo_slots=fifo_slots,
        layers=_layers(layers),
        stage_auto=layers == "auto",
        prefix_cache_mb=prefix_cache_mb,
        tasks=tuple(tasks.split(",")) if tasks is not None else (),
        device_figures=_device_figures(device_figures),
    )
    _register_model_configs(model_config)
    faults = _faults(allow_faults, fault or [])
    from gridserve.node.dishonest import ENGINE_MODES, Dishonesty, DishonestyRefused

    try:
        lies = Dishonesty.of(dishonest or [], allowed=allow_dishonest)
    except (ValueError, DishonestyRefused) as exc:
        raise fail(str(exc)) from None
    options = dataclasses.replace(options, cheat=tuple(sorted(lies.modes & ENGINE_MODES)))
    try:
        run_node(config, options, faults=faults, lies=lies, log_level=log_level, log_format=_log_format(log_format))
    except (EngineError, UnknownHardware, UnknownModel, OSError, CannotJoin) as exc:
        raise fail(str(exc)) from None


@app.command()
def nodes(
    gateway: Annotated[str, typer.Option(help="gateway URL")] = "http://127.0.0.1:8000",
    admin_token: Annotated[str | None, typer.Option(help="admin token (default: from --data-dir)")] = None,
    data_dir: DataDir = Path(".gridserve"),
    json_out: Annotated[bool, typer.Option("--json", help="print JSON instead of a table")] = False,
) -> None:
    """Print the node table of a running gateway."""
    from gridserve.cli.table import node_table

    token = admin_token or os.environ.get("GRIDSERVE_ADMIN_TOKEN")
    if token is None and (data_dir / "admin.token").exists():
        token = (data_dir / "admin.token").read_text().strip()
    try:
        resp = httpx.get(f"{gateway.rstrip('/')}/admin/nodes", headers={"Authorization": f"Bearer {token}"}, timeout=5)
    except httpx.HTTPError as exc:
        from gridserve.trust.tls import describe

        raise fail(f"cannot reach {gateway}: {describe(exc)}") from None
    if resp.status_code != 200:
        raise fail(f"{gateway} answered {resp.status_code}: {resp.text[:200]}")
    if json_out:
        print(json.dumps(resp.json()["nodes"], indent=2))
        return
    console.print(node_table(resp.json()["nodes"]))


def _install_sigterm() -> None:
    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


def _prepare(engines: list[str]) -> None:
    if "gemma-270m" in engines:
        from gridserve.engines.gemma import ensure_cache

        ensure_cache()


@app.command()
def up(
    nodes: Annotated[int, typer.Option(help="number of node agents")] = 4,
    engine: Annotated[list[str] | None, typer.Option(help="engine(s) to cycle through (default: a mix)")] = None,
    port: Annotated[int, typer.Option(help="gateway port; nodes take the following ports")] = 8000,
    api_key: Annotated[str | None, typer.Option(help="API key (default: generated, kept in --data-dir)")] = None,
    admin_token: Annotated[str | None, typer.Option(help="admin token")] = None,
    data_dir: DataDir = Path(".gridserve"),
    heartbeat_interval: Annotated[float, typer.Option(help="seconds between heartbeats")] = 2.0,
) -> None:
    """Start a gateway and N node agents here; show the live node table; Ctrl-C stops everything."""
    from gridserve.cli.grid import GridError, LocalGrid, engine_mix
    from gridserve.cli.table import node_table

    key, admin = _secrets(data_dir, api_key, admin_token)
    engines = engine_mix(nodes, engine or [])
    _install_sigterm()
    grid = LocalGrid(
        data_dir=data_dir,
        port=port,
        api_key=key,
        admin_token=admin,
        engines=engines,
        heartbeat_interval_s=heartbeat_interval,
    )
    try:
        _prepare(engines)
        with console.status(f"starting gateway and {nodes} node(s): {', '.join(engines)}"):
            grid.start()
        console.print(
            f"[bold green]grid up[/]  endpoint: [bold]{grid.url}/v1[/]  api key: [bold]{key}[/]  admin token: {admin}"
        )
        console.print(f"try: curl {grid.url}/v1/models -H 'Authorization: Bearer {key}'   (Ctrl-C stops)")
        with Live(node_table(grid.nodes()), console=console, refresh_per_second=1) as live:
            while True:
                time.sleep(1.0)
                live.update(node_table(grid.nodes()))
    except KeyboardInterrupt:
        console.print("stopping grid ...")
    except GridError as exc:
        grid.stop()
        raise fail(str(exc)) from None
    finally:
        grid.stop()
    console.print("grid stopped")


@app.command()
def demo(
    nodes: Annotated[int, typer.Option(help="number of node agents")] = 4,
    engine: Annotated[list[str] | None, typer.Option(help="engine(s) to cycle through (default: a mix)")] = None,
    port: Annotated[int, typer.Option(help="gateway port")] = 8000,
    data_dir: DataDir = Path(".gridserve"),
) -> None:
    """Start a local grid, stream a few chat answers with the node that served each, then stop."""
    from gridserve.cli.demo import run_demo
    from gridserve.cli.grid import GridError, LocalGrid, engine_mix

    key, admin = _secrets(data_dir, None, None)
    engines = engine_mix(nodes, engine or [])
    _install_sigterm()
    grid = LocalGrid(data_dir=data_dir, port=port, api_key=key, admin_token=admin, engines=engines)
    try:
        _prepare(engines)
        with console.status(f"starting gateway and {nodes} node(s): {', '.join(engines)}"):
            grid.start()
        console.print(f"[bold green]grid up[/] at {grid.url}/v1 with {nodes} node(s)")
        failures = run_demo(grid, console)
    except GridError as exc:
        raise fail(str(exc)) from None
    except KeyboardInterrupt:
        failures = 1
    finally:
        grid.stop()
    console.print("grid stopped" + (f"; {failures} request(s) failed" if failures else ""))
    sys.exit(1 if failures else 0)


def _register_admin() -> None:
    from gridserve.cli import admin, doctor, keys, plan, settle, simulate, tokens

    admin.register(app, console, fail)
    doctor.register(app, console, fail)
    keys.register(app, console, fail)
    plan.register(app, console, fail)
    settle.register(app, console, fail)
    simulate.register(app, console, fail)
    tokens.register(app, console, fail)


_register_admin()
