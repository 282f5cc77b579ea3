"""`gridserve tokens create | list | revoke`: join tokens of a permissioned grid (gateway --join-tokens)."""

import json
import re
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from gridserve.cli.admin import AdminCommands, DataDirOpt, GatewayOpt, TokenOpt

DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
UNIT_S = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 604_800}


def parse_duration(text: str) -> float:
    """Seconds in `3600`, `90s`, `30m`, `12h`, `7d` or `2w`; raises ValueError."""
    found = DURATION.match(text.lower())
    if found is None or float(found.group(1)) <= 0:
        raise ValueError(f"--expires-in {text!r}: expected a positive duration such as 3600, 30m, 12h or 7d")
    return float(found.group(1)) * UNIT_S[found.group(2)]


def _when(at: float | None) -> str:
    return "never" if at is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at))


def token_table(tokens: list[dict[str, Any]]) -> Table:
    table = Table(title="join tokens")
    for column in ("id", "label", "status", "created", "expires", "uses left", "nodes"):
        table.add_column(column)
    for t in tokens:
        uses = f"{t['uses_left']} of {t['uses']}"
        nodes = ", ".join(t["node_ids"]) or "-"
        cells = (t["id"], t["label"], t["status"], _when(t["created_at"]), _when(t["expires_at"]), uses, nodes)
        table.add_row(*(escape(str(c)) for c in cells))
    return table


def register(app: typer.Typer, console: Console, fail: Any) -> None:
    tokens = typer.Typer(help="Join tokens: who may register a node with a gateway started with --join-tokens.")
    app.add_typer(tokens, name="tokens")

    admin = AdminCommands(console, fail)

    @tokens.command()
    def create(
        label: Annotated[str, typer.Option(help="what the token is for (shown by `tokens list`)")] = "",
        expires_in: Annotated[
            str | None, typer.Option(help="the token admits no new node after this: 3600, 30m, 12h, 7d (default never)")
        ] = None,
        uses: Annotated[int, typer.Option(min=1, help="distinct node identities (keys) it may admit")] = 1,
        gateway: GatewayOpt = "http://127.0.0.1:8000",
        admin_token: TokenOpt = None,
        data_dir: DataDirOpt = Path(".gridserve"),
        as_json: Annotated[bool, typer.Option("--json", help="print the answer as JSON")] = False,
    ) -> None:
        """Create a join token; it is shown once (the gateway keeps only its digest)."""
        body: dict[str, Any] = {"label": label, "uses": uses}
        if expires_in is not None:
            try:
                body["expires_in_s"] = parse_duration(expires_in)
            except ValueError as exc:
                raise fail(str(exc)) from None
        made = admin.call(gateway, admin_token, data_dir, "POST", "/admin/tokens", body)
        if as_json:
            print(json.dumps(made, indent=2))
            return
        what = f"{made['uses']} node identit{'y' if made['uses'] == 1 else 'ies'}, expires {_when(made['expires_at'])}"
        console.print(f"join token {made['id']} ({escape(what)}); shown this once, keep it secret:", highlight=False)
        print(made["token"])
        console.print(
            f"start a node with it: GRIDSERVE_JOIN_TOKEN={made['token']} gridserve node --gateway {gateway} ..."
            " (or --join-token)",
            highlight=False,
            soft_wrap=True,
        )

    @tokens.command("list")
    def list_tokens(
        gateway: GatewayOpt = "http://127.0.0.1:8000",
        admin_token: TokenOpt = None,
        data_dir: DataDirOpt = Path(".gridserve"),
        as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of a table")] = False,
    ) -> None:
        """List join tokens: status, expiry, uses left and the nodes each admitted (never the tokens)."""
        admin.show_list(gateway, admin_token, data_dir, "/admin/tokens", "tokens", token_table, as_json=as_json)

    @tokens.command()
    def revoke(
        token_id: Annotated[str, typer.Argument(help="the token's id (from `tokens list`)")],
        gateway: GatewayOpt = "http://127.0.0.1:8000",
        admin_token: TokenOpt = None,
        data_dir: DataDirOpt = Path(".gridserve"),
    ) -> None:
        """Revoke a join token: no node registers with it again (nodes on the grid stay until they re-register)."""
        gone = admin.revoke(gateway, admin_token, data_dir, "/admin/tokens", token_id)
        console.print(f"join token {gone['id']} revoked", highlight=False)
