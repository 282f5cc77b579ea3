"""The node table shown by `gridserve up` and `gridserve nodes`."""

from typing import Any

from rich.table import Table

STATE_STYLE = {"up": "green", "suspect": "yellow", "down": "red", "quarantined": "magenta", "banned": "magenta"}


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f}"


def _trust(rel: dict[str, Any] | None) -> str:
    if not rel:
        return "-"
    state = rel["state"]
    return f"{state} {rel['score']:.2f}" if state != "healthy" else f"{rel['score']:.2f}"


def node_table(nodes: list[dict[str, Any]], title: str = "gridserve nodes") -> Table:
    table = Table(title=title, expand=False)
    for column in (
        "node",
        "state",
        "trust",
        "engine",
        "hardware",
        "models",
        "active",
        "tok/s",
        "util",
        "mem GiB",
        "hb age s",
        "endpoint",
    ):
        table.add_column(column, no_wrap=column in ("node", "endpoint"))
    for node in sorted(nodes, key=lambda n: n["endpoint"]):
        hw = node["hardware"]
        tele = node.get("telemetry") or {}
        hardware = hw["accelerator"] + (" (emulated)" if node.get("emulated") else "")
        state = node["state"]
        table.add_row(
            node["node_id"][:12],
            f"[{STATE_STYLE.get(state, 'white')}]{state}[/]",
            _trust(node.get("reliability")),
            node["engine"],
            hardware,
            ", ".join(m["name"] for m in node["models"]),
            str(tele.get("active_requests", 0)),
            f"{tele.get('tokens_per_s', 0.0):.1f}",
            f"{100 * tele.get('utilization', 0.0):.0f}%",
            f"{_gib(tele.get('memory_used_bytes', 0))}/{_gib(tele.get('memory_total_bytes', 0))}",
            f"{node.get('heartbeat_age_s', 0):.1f}",
            node["endpoint"],
        )
    return table
