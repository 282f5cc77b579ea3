"""Admin commands: explain a decision, list incidents, quarantine and release nodes; and what the admin command
groups (`keys`, `tokens`) share: `AdminCommands`."""

import json
import os
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from rich.console import Console
from rich.table import Table

from gridserve.trust import tls

GatewayOpt = Annotated[str, typer.Option(help="gateway URL")]
TokenOpt = Annotated[str | None, typer.Option(help="admin token (default: $GRIDSERVE_ADMIN_TOKEN or --data-dir)")]
DataDirOpt = Annotated[Path, typer.Option(help="data dir holding admin.token")]


class AdminError(Exception):
    pass


def admin_call(
    gateway: str, token: str | None, data_dir: Path, method: str, path: str, body: dict[str, Any] | None = None
) -> Any:
    token = token or os.environ.get("GRIDSERVE_ADMIN_TOKEN")
    if token is None and (data_dir / "admin.token").exists():
        token = (data_dir / "admin.token").read_text().strip()
    try:
        resp = httpx.request(
            method, gateway.rstrip("/") + path, json=body, timeout=10, headers={"Authorization": f"Bearer {token}"}
        )
    except httpx.HTTPError as exc:
        raise AdminError(f"cannot reach {gateway}: {tls.describe(exc)}") from exc
    if resp.status_code != 200:
        try:
            message = resp.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = resp.text[:200]
        raise AdminError(f"{gateway} answered {resp.status_code}: {message}")
    return resp.json()


def item_path(collection: str, item_id: str) -> str:
    """`collection/item_id`, the id quoted as one path segment (`/admin/keys/<id>`)."""
    return f"{collection}/{urllib.parse.quote(item_id, safe='')}"


class AdminCommands:
    """Admin API calls as commands make them: an error is the CLI's one-line error (`fail`: exit 2); and the shape
    of the list and revoke commands of a group (`keys`, `tokens`)."""

    def __init__(self, console: Console, fail: Callable[[str], Exception]) -> None:
        self.console, self.fail = console, fail

    def call(self, gateway: str, token: str | None, data_dir: Path, method: str, path: str, body: Any = None) -> Any:
        try:
            return admin_call(gateway, token, data_dir, method, path, body)
        except AdminError as exc:
            raise self.fail(str(exc)) from None

    def show_list(
        self,
        gateway: str,
        token: str | None,
        data_dir: Path,
        collection: str,
        member: str,
        table: Callable[[list[dict[str, Any]]], Table],
        *,
        as_json: bool,
    ) -> None:
        """GET `collection` and print its answer's `member` list: as JSON, or as `table` renders it."""
        found = self.call(gateway, token, data_dir, "GET", collection)[member]
        if as_json:
            print(json.dumps(found, indent=2))
            return
        self.console.print(table(found))

    def revoke(self, gateway: str, token: str | None, data_dir: Path, collection: str, item_id: str) -> Any:
        """DELETE `collection/item_id`; the answer (what was revoked)."""
        return self.call(gateway, token, data_dir, "DELETE", item_path(collection, item_id))


def explain_tables(decision: dict[str, Any]) -> list[Table]:
    needs = Table(title=f"decision {decision['decision_id']}: requirements", show_header=False)
    for key, value in decision.get("requirements", {}).items():
        needs.add_row(key, str(value))
    scores = Table(title="eligible nodes (best first)")
    for column in ("rank", "node", "score", "signal", "raw", "normalized", "weight", "contribution"):
        scores.add_column(column)
    for cand in decision.get("candidates", []):
        for i, s in enumerate(cand["scores"]):
            head = (str(cand["rank"]), cand["node_id"][:12], f"{cand['score']:.3f}") if i == 0 else ("", "", "")
            scores.add_row(
                *head,
                s["scorer"],
                f"{s['raw']:.4g} {s['unit']}",
                f"{s['normalized']:.3f}",
                f"{s['weight']:.2f}",
                f"{s['contribution']:.3f}",
            )
    verdicts = Table(title="every node")
    for column in ("node", "verdict", "filter", "reason"):
        verdicts.add_column(column)
    for v in decision.get("nodes", []):
        verdicts.add_row(
            v["node_id"][:12], "[green]eligible[/]" if v["eligible"] else "[red]rejected[/]", v["filter"], v["reason"]
        )
    outcome = Table(title="outcome", show_header=False)
    for key in ("chosen", "served_by", "margin", "picked_by", "status", "explanation"):
        outcome.add_row(key, str(decision.get(key)))
    return [needs, verdicts, scores, outcome]


def register(app: typer.Typer, console: Console, fail: Any) -> None:
    admin = AdminCommands(console, fail)

    @app.command()
    def explain(
        decision_id: str,
        gateway: GatewayOpt = "http://127.0.0.1:8000",
        admin_token: TokenOpt = None,
        data_dir: DataDirOpt = Path(".gridserve"),
    ) -> None:
        """Why that node? Render a decision: requirements, every node's verdict, the scores, the winner."""
        decision = admin.call(gateway, admin_token, data_dir, "GET", f"/v1/decisions/{decision_id}")
        for table in explain_tables(decision):
            console.print(table)

    @app.command()
    def incidents(
        gateway: GatewayOpt = "http://127.0.0.1:8000",
        node: Annotated[str | None, typer.Option()] = None,
        admin_token: TokenOpt = None,
        data_dir: DataDirOpt = Path(".gridserve"),
    ) -> None:
        """List incidents and reliability state changes."""
        query = f"?node_id={node}" if node else ""
        found = admin.call(gateway, admin_token, data_dir, "GET", f"/admin/incidents{query}")
        table = Table(title="incidents and state changes")
        for column in ("at", "node", "what", "detail"):
            table.add_column(column)
        rows = [(e["at"], e["node_id"], f"incident ({e['severity']})", e["detail"]) for e in found["incidents"]]
        rows += [(t["at"], t["node_id"], f"{t['old']} -> {t['new']}", t["reason"]) for t in found["transitions"]]
        for at, node_id, what, detail in sorted(rows, reverse=True):
            table.add_row(f"{at:.0f}", node_id[:12], what, detail)
        console.print(table)

    def _action(verb: str, node: str, reason: str, gateway: str, token: str | None, data_dir: Path) -> None:
        result = admin.call(gateway, token, data_dir, "POST", f"/admin/nodes/{node}/{verb}", {"reason": reason})
        console.print(f"{node[:12]}: {result['state']}")

    @app.command()
    def quarantine(
        node: str,
        reason: Annotated[str, typer.Option(help="why (recorded)")],
        gateway: GatewayOpt = "http://127.0.0.1:8000",
        admin_token: TokenOpt = None,
        data_dir: DataDirOpt = Path(".gridserve"),
    ) -> None:
        """Quarantine a node: it receives no work until released."""
        _action("quarantine", node, reason, gateway, admin_token, data_dir)

    @app.command()
    def release(
        node: str,
        reason: Annotated[str, typer.Option(help="why (recorded)")],
        gateway: GatewayOpt = "http://127.0.0.1:8000",
        admin_token: TokenOpt = None,
        data_dir: DataDirOpt = Path(".gridserve"),
    ) -> None:
        """Release a quarantined node into probation."""
        _action("release", node, reason, gateway, admin_token, data_dir)
