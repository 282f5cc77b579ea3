"""`gridserve plan`: which nodes should hold which layers of a model, and how each baseline would split it.

The nodes are cards from the catalogue (`--cards rtx4090,t4,h100-sxm`) or a running grid's registered nodes
(`--gateway URL --admin-token T`: their cards, memory and measured round trips). The output is the plan with
its per-stage figures, the three baselines on the same inputs, and the `--layers` each node is to be started
with.
"""

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from gridserve.planner.plan import Plan


def register(app: typer.Typer, console: Console, fail: Any) -> None:
    @app.command()
    def plan(
        model: Annotated[
            str | None,
            typer.Argument(help="catalogue model, e.g. llama-3-70b (with --model-config: that model's name)"),
        ] = None,
        model_config: Annotated[
            Path | None,
            typer.Option(help="a Hugging Face config.json: plan that model (named after its directory or MODEL)"),
        ] = None,
        cards: Annotated[str | None, typer.Option(help="comma-separated catalogue cards, e.g. rtx4090,t4")] = None,
        gateway: Annotated[str | None, typer.Option(help="plan over this grid's registered nodes")] = None,
        admin_token: Annotated[str | None, typer.Option(envvar="GRIDSERVE_ADMIN_TOKEN")] = None,
        dtype: Annotated[str, typer.Option(help="weights precision")] = "float16",
        quantization: Annotated[str, typer.Option(help="none, q4_k_m, q8_0, awq, ...")] = "none",
        objective: Annotated[str, typer.Option(help="latency (interactive) or throughput (batch)")] = "latency",
        rtt_ms: Annotated[float, typer.Option(help="round trip between nodes (and to the gateway), ms")] = 20.0,
        context: Annotated[int, typer.Option(help="tokens of KV cache per session to plan memory for")] = 2048,
        sessions: Annotated[int, typer.Option(help="concurrent sessions each stage holds KV cache for")] = 1,
        max_stages: Annotated[int, typer.Option(help="longest chain considered")] = 4,
        as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of tables")] = False,
    ) -> None:
        """Plan a layer-wise split of MODEL over nodes; compare it with the fixed, exo and Petals splits."""
        from gridserve.catalog import model_spec
        from gridserve.catalog.hardware import UnknownHardware
        from gridserve.catalog.models import UnknownModel, register_config
        from gridserve.planner import LayerCosts, Network, PlanError, Workload
        from gridserve.planner import plan as make_plan
        from gridserve.planner.plan import OBJECTIVES

        if (cards is None) == (gateway is None):
            raise fail("give either --cards or --gateway")
        if model is None and model_config is None:
            raise fail("give a catalogue MODEL or --model-config FILE")
        if objective not in OBJECTIVES:
            raise fail(f"--objective must be one of {', '.join(OBJECTIVES)}")
        try:
            spec = register_config(model_config, model) if model_config is not None else model_spec(model or "")
            costs = LayerCosts.of(spec, dtype, quantization)
            nodes, names, gateway_rtt = (
                _catalogue_nodes(cards or "") if cards is not None else _grid_nodes(gateway or "", admin_token, fail)
            )
        except (UnknownModel, UnknownHardware, KeyError, ValueError) as exc:
            raise fail(str(exc).strip("'\"")) from None
        net = Network(default_rtt_s=rtt_ms / 1e3, gateway_rtt_s=gateway_rtt)
        work = Workload(context_tokens=context, sessions=sessions)
        try:
            best = make_plan(costs, nodes, net, work, objective=objective, max_stages=max_stages)
        except PlanError as exc:
            raise fail(str(exc)) from None
        report = _report(best, costs, nodes, net, work, objective, names)
        if as_json:
            console.print_json(json.dumps(report))
            return
        _print(console, report, best)


def _catalogue_nodes(cards: str) -> tuple[list[Any], dict[str, str], dict[str, float]]:
    from gridserve.catalog import hardware_spec
    from gridserve.planner import PlanNode

    keys = [c.strip() for c in cards.split(",") if c.strip()]
    if not keys:
        raise ValueError("--cards is empty")
    nodes = [PlanNode.of(f"{key}-{i}", hardware_spec(key)) for i, key in enumerate(keys)]
    return nodes, {n.node_id: key for n, key in zip(nodes, keys, strict=True)}, {}


def _grid_nodes(url: str, token: str | None, fail: Any) -> tuple[list[Any], dict[str, str], dict[str, float]]:
    import httpx

    from gridserve.catalog.claims import card_view
    from gridserve.planner import PlanNode
    from gridserve.types import HardwareInfo

    def _card(hardware: dict[str, Any]) -> Any:
        """The node's card as the gateway predicts it (catalogue, driver figures, micro-benchmark)."""
        try:
            view = card_view(HardwareInfo.model_validate(hardware, strict=False))
        except ValueError:
            return None
        return view.hw if view is not None else None

    try:
        resp = httpx.get(
            url.rstrip("/") + "/admin/nodes", headers={"Authorization": f"Bearer {token or ''}"}, timeout=10
        )
    except httpx.HTTPError as exc:
        raise fail(f"cannot reach {url}: {exc}") from None
    if resp.status_code != 200:
        raise fail(f"{url}/admin/nodes answered {resp.status_code} (an admin token is needed: --admin-token)")
    nodes, names, rtts = [], {}, {}
    for node in resp.json()["nodes"]:
        hw = _card(node["hardware"])
        if hw is None or node["state"] == "down":
            continue
        memory = node["hardware"].get("memory_bytes") or None
        nodes.append(PlanNode.of(node["node_id"], hw, memory_bytes=memory * 0.9 if memory else None))
        names[node["node_id"]] = hw.key
        if node.get("rtt_ms") is not None:
            rtts[node["node_id"]] = node["rtt_ms"] / 1e3
    if not nodes:
        raise fail("the grid has no live node with a card the catalogue knows")
    return nodes, names, rtts


def _ms(p: Plan | None) -> float | None:
    return round(p.cost_s * 1e3, 3) if p is not None else None


def _report(
    best: Plan, costs: Any, nodes: list[Any], net: Any, work: Any, objective: str, names: dict[str, str]
) -> dict[str, Any]:
    from gridserve.planner import fixed_blocks, memory_proportional, throughput_balanced

    by_id = {n.node_id: n for n in nodes}
    return {
        "model": best.model,
        "objective": objective,
        "ms_per_token": _ms(best),
        "chains_considered": best.chains_considered,
        "runner_up_ms": None if best.runner_up_s is None else round(best.runner_up_s * 1e3, 3),
        "stages": [
            {
                "node": s.node_id,
                "card": names.get(s.node_id, ""),
                "layers": f"{s.start}:{s.end}",
                "stage_ms": round(s.time_s * 1e3, 3),
                "hop_ms": round(s.hop_s * 1e3, 3),
                "memory_gib": round(s.memory_bytes / 2**30, 2),
                "node_memory_gib": round(by_id[s.node_id].memory_bytes / 2**30, 2),
            }
            for s in best.stages
        ],
        "baselines_ms_per_token": {  # every node, in the order given; null: a split that does not fit
            "fixed equal blocks": _ms(fixed_blocks(costs, nodes, net, work, objective)),
            "memory-proportional (exo)": _ms(memory_proportional(costs, nodes, net, work, objective)),
            "throughput-balanced (Petals)": _ms(throughput_balanced(costs, nodes, net, work, objective)),
        },
        "explanation": best.explain(),
    }


def _print(console: Console, report: dict[str, Any], best: Plan) -> None:
    table = Table(title=f"{report['model']}: {report['objective']} {report['ms_per_token']} ms per token")
    for col in ("stage", "node", "card", "layers", "stage ms", "hop ms", "memory GiB", "node GiB"):
        table.add_column(col)
    for i, s in enumerate(report["stages"]):
        table.add_row(
            str(i),
            s["node"],
            s["card"],
            s["layers"],
            f"{s['stage_ms']:.2f}",
            f"{s['hop_ms']:.2f}",
            f"{s['memory_gib']:.2f}",
            f"{s['node_memory_gib']:.2f}",
        )
    console.print(table)
    console.print(f"best of {report['chains_considered']} chains; next best {report['runner_up_ms']} ms")
    for name, ms in report["baselines_ms_per_token"].items():
        console.print(f"  {name}: {'does not fit' if ms is None else f'{ms} ms per token'}")
    if len(report["stages"]) == 1:
        console.print(f"one node holds it whole ({report['stages'][0]['node']}): no pipeline needed")
        return
    console.print("start each stage node with its layers:")
    for s in report["stages"]:
        console.print(f"  {s['node']}: gridserve node --layers {s['layers']} ...")
