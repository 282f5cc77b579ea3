"""`gridserve doctor`: the latency doctor's verdict per node, with evidence and the next check."""

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from gridserve.cli.admin import AdminError, DataDirOpt, GatewayOpt, TokenOpt, admin_call

COLOURS = {"healthy": "green", "network": "yellow", "node_failure": "red"}


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1e3:.1f}"


def overview(report: dict[str, Any]) -> Table:
    table = Table(title=f"latency doctor (last {report['window_s']:.0f} s)")
    columns = ("node", "state", "RTT ms", "util", "mem %", "temp C", "reqs", "TTFT ms", "ITL ms")
    for column in (*columns, "net ms", "queue ms", "prefill ms", "decode ms", "verdict"):
        table.add_column(column)
    for n in report["nodes"]:
        lat, tel, cause = n["latency"], n["telemetry"], n["diagnosis"]["cause"]
        table.add_row(
            n["node_id"][:12],
            n["state"],
            "-" if n["rtt_ms"] is None else f"{n['rtt_ms']:.1f}",
            "-" if tel["utilization"] is None else f"{tel['utilization']:.0%}",
            "-" if tel["memory_pct"] is None else f"{tel['memory_pct']:.0f}",
            "-" if tel["temperature_c"] is None else f"{tel['temperature_c']:.0f}",
            str(lat["requests"]),
            *(_ms(lat[f"{k}_p50_s"]) for k in ("ttft", "itl", "network", "queue", "prefill", "decode")),
            f"[{COLOURS.get(cause, 'magenta')}]{cause}[/]",
        )
    return table


def register(app: typer.Typer, console: Console, fail: Any) -> None:
    @app.command()
    def doctor(
        gateway: GatewayOpt = "http://127.0.0.1:8000",
        node: Annotated[str | None, typer.Option(help="one node only")] = None,
        window: Annotated[float, typer.Option(help="seconds of history to judge on")] = 120.0,
        as_json: Annotated[bool, typer.Option("--json", help="print the report as JSON")] = False,
        admin_token: TokenOpt = None,
        data_dir: DataDirOpt = Path(".gridserve"),
    ) -> None:
        """Why is it slow? Per node: RTT, health, telemetry, errors, the time split, and a verdict with evidence."""
        query = f"?window_s={window}" + (f"&node_id={node}" if node else "")
        try:
            report = admin_call(gateway, admin_token, data_dir, "GET", f"/admin/doctor{query}")
        except AdminError as exc:
            raise fail(str(exc)) from None
        if as_json:
            print(json.dumps(report, indent=2))
            return
        console.print(overview(report))
        for n in report["nodes"]:
            d = n["diagnosis"]
            colour = COLOURS.get(d["cause"], "magenta")
            console.print(f"\n[bold]{n['node_id'][:12]}[/] ({n['endpoint']}): [{colour}]{d['summary']}[/]")
            for line in d["evidence"]:
                console.print(f"  - {line}", highlight=False)
            console.print(f"  next: {d['next_check']}", highlight=False)
        for run in report.get("pipelines", []):
            d = run["diagnosis"]
            colour = COLOURS.get(d["cause"], "magenta")
            chain = " -> ".join(f"{c['node_id'][:8]}[{c['layers'][0]}:{c['layers'][1]})" for c in run["chain"])
            console.print(f"\n[bold]pipeline {run['session']}[/] {chain}: [{colour}]{d['summary']}[/]")
            for line in d["evidence"]:
                console.print(f"  - {line}", highlight=False)
            if d["next_check"]:
                console.print(f"  next: {d['next_check']}", highlight=False)
