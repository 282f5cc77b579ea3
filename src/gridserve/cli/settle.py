"""`gridserve settle`: tokens served per node and model at the decided prices, and disputed entries."""

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from gridserve.cli.admin import AdminError, DataDirOpt, GatewayOpt, TokenOpt, admin_call


def register(app: typer.Typer, console: Console, fail: Any) -> None:
    @app.command()
    def settle(
        gateway: GatewayOpt = "http://127.0.0.1:8000",
        as_json: Annotated[bool, typer.Option("--json", help="print the report as JSON")] = False,
        admin_token: TokenOpt = None,
        data_dir: DataDirOpt = Path(".gridserve"),
    ) -> None:
        """Settlement: per node and model, requests, tokens and amount owed; receipts that disagree."""
        try:
            report = admin_call(gateway, admin_token, data_dir, "GET", "/admin/settlement")
        except AdminError as exc:
            raise fail(str(exc)) from None
        if as_json:
            print(json.dumps(report, indent=2))
            return
        totals = Table(title="settlement: the gateway's own token counts at the decided prices")
        for column in ("node", "model", "requests", "tokens", "amount USD", "disputed"):
            totals.add_column(column)
        for t in report["totals"]:
            disputed = f"[red]{t['disputed']}[/]" if t["disputed"] else "0"
            row = (t["node_id"][:12], t["model"], str(t["requests"]), str(t["tokens"]), f"{t['amount_usd']:.6f}")
            totals.add_row(*row, disputed)
        console.print(totals)
        if report["disputed"]:
            disputes = Table(title="disputed entries (the node's receipt disagrees)")
            for column in ("node", "request", "counted", "claimed", "why"):
                disputes.add_column(column)
            for d in report["disputed"]:
                claimed = "-" if d["claimed_tokens"] is None else str(d["claimed_tokens"])
                disputes.add_row(d["node_id"][:12], d["request_id"], str(d["tokens"]), claimed, d["detail"])
            console.print(disputes)
