"""`gridserve keys create | list | revoke`, and `gridserve keys usage`: API keys with limits (gateway/tenancy/)."""

import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from gridserve.cli.admin import AdminCommands, DataDirOpt, GatewayOpt, TokenOpt, item_path

PRIORITY_HELP = "class when requests queue: interactive, standard or batch"


def _limit(value: Any, unit: str = "") -> str:
    return "-" if value is None else f"{value}{unit}"


def key_table(keys: list[dict[str, Any]]) -> Table:
    table = Table(title="API keys")
    for column in ("id", "name", "status", "created", "rpm", "tpm", "concurrency", "budget", "models", "priority"):
        table.add_column(column)
    for k in keys:
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(k["created_at"]))
        models = ", ".join(k["models"]) if k["models"] is not None else "any"
        budget = "-" if k["budget_usd"] is None else f"{k['budget_usd']} USD"
        cells = (
            k["id"],
            k["name"],
            k["status"],
            created,
            _limit(k["rpm"]),
            _limit(k["tpm"]),
            _limit(k["max_concurrency"]),
            budget,
            models,
            k["priority"],
        )
        table.add_row(*(escape(str(c)) for c in cells))
    return table


def register(app: typer.Typer, console: Console, fail: Any) -> None:
    keys = typer.Typer(help="API keys: who may call the grid, with which limits, budget and priority.")
    app.add_typer(keys, name="keys")

    admin = AdminCommands(console, fail)

    @keys.command()
    def create(
        name: Annotated[str, typer.Argument(help="who or what the key is for")],
        rpm: Annotated[int | None, typer.Option(min=1, help="requests per minute")] = None,
        tpm: Annotated[int | None, typer.Option(min=1, help="tokens per minute (prompt + output)")] = None,
        max_concurrency: Annotated[int | None, typer.Option(min=1, help="requests in flight at once")] = None,
        budget_usd: Annotated[float | None, typer.Option(min=0.000001, help="spend limit in US dollars")] = None,
        model: Annotated[list[str] | None, typer.Option(help="a model it may call (repeatable; default any)")] = None,
        tier: Annotated[list[str] | None, typer.Option(help="a tier it may ask for (repeatable; default any)")] = None,
        priority: Annotated[str, typer.Option(help=PRIORITY_HELP)] = "standard",
        gateway: GatewayOpt = "http://127.0.0.1:8000",
        admin_token: TokenOpt = None,
        data_dir: DataDirOpt = Path(".gridserve"),
        as_json: Annotated[bool, typer.Option("--json", help="print the answer as JSON")] = False,
    ) -> None:
        """Create an API key; it is shown once (the gateway keeps only its digest)."""
        body: dict[str, Any] = {"name": name, "priority": priority}
        optional = {
            "rpm": rpm,
            "tpm": tpm,
            "max_concurrency": max_concurrency,
            "budget_usd": budget_usd,
            "models": model,
            "tiers": tier,
        }
        body.update({k: v for k, v in optional.items() if v is not None})
        made = admin.call(gateway, admin_token, data_dir, "POST", "/admin/keys", body)
        if as_json:
            print(json.dumps(made, indent=2))
            return
        console.print(
            f"API key {made['id']} ({escape(made['name'])}); shown this once, keep it secret:", highlight=False
        )
        print(made["key"])

    @keys.command("list")
    def list_keys(
        gateway: GatewayOpt = "http://127.0.0.1:8000",
        admin_token: TokenOpt = None,
        data_dir: DataDirOpt = Path(".gridserve"),
        as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of a table")] = False,
    ) -> None:
        """List API keys: limits, budget, models, priority and status (never the keys)."""
        admin.show_list(gateway, admin_token, data_dir, "/admin/keys", "keys", key_table, as_json=as_json)

    @keys.command()
    def revoke(
        key_id: Annotated[str, typer.Argument(help="the key's id (from `keys list`)")],
        gateway: GatewayOpt = "http://127.0.0.1:8000",
        admin_token: TokenOpt = None,
        data_dir: DataDirOpt = Path(".gridserve"),
    ) -> None:
        """Revoke an API key: every gateway of the grid refuses it within a second."""
        gone = admin.revoke(gateway, admin_token, data_dir, "/admin/keys", key_id)
        console.print(f"API key {gone['id']} ({escape(gone['name'])}) revoked", highlight=False)

    @keys.command()
    def rotate(
        key_id: Annotated[str, typer.Argument(help="the key's id (from `keys list`)")],
        gateway: GatewayOpt = "http://127.0.0.1:8000",
        admin_token: TokenOpt = None,
        data_dir: DataDirOpt = Path(".gridserve"),
    ) -> None:
        """A new secret for a key (same id, limits and usage); the old secret stops working within a second."""
        made = admin.call(gateway, admin_token, data_dir, "POST", item_path("/admin/keys", key_id) + "/rotate")
        console.print(f"API key {made['id']} ({escape(made['name'])}) rotated; the new key, shown this once:")
        print(made["key"])

    @keys.command()
    def usage(
        gateway: GatewayOpt = "http://127.0.0.1:8000",
        admin_token: TokenOpt = None,
        data_dir: DataDirOpt = Path(".gridserve"),
    ) -> None:
        """Usage per key (JSON): what this gateway served, and each key's counts across the grid."""
        print(json.dumps(admin.call(gateway, admin_token, data_dir, "GET", "/admin/usage"), indent=2))
