"""`gridserve simulate`: replay a request trace on a simulated grid under each routing policy."""

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

DEFAULT_POLICIES = (
    "default,round-robin,random,least-loaded,capacity-only,latency-ewma,petals-like,prefix-load,cache-aware,kv-overlap"
)


def register(app: typer.Typer, console: Console, fail: Any) -> None:
    @app.command()
    def simulate(
        trace: Annotated[Path, typer.Option(help="Azure CSV (TIMESTAMP,ContextTokens,GeneratedTokens) or JSONL")],
        out: Annotated[Path, typer.Option(help="directory for report.json, summary.md and plots")],
        nodes: Annotated[int, typer.Option(help="simulated nodes")] = 100,
        load: Annotated[float, typer.Option(help="arrival rate as a share of grid capacity")] = 0.8,
        loads: Annotated[
            str, typer.Option(help="loads tried for goodput and the attainment plot")
        ] = "0.4,0.6,0.8,1.0,1.2",
        policies: Annotated[str, typer.Option(help="comma-separated profiles")] = DEFAULT_POLICIES,
        limit: Annotated[int | None, typer.Option(help="use the first N requests of the trace")] = None,
        seed: Annotated[int, typer.Option(help="randomness (same seed, same result)")] = 0,
        model: Annotated[
            str | None,
            typer.Option(
                help="catalogue model every node serves (default: one whose context holds the trace); with "
                "--model-config, the name of that model"
            ),
        ] = None,
        model_config: Annotated[
            Path | None,
            typer.Option(help="a Hugging Face config.json: serve that model (named after its directory or --model)"),
        ] = None,
        churn: Annotated[bool, typer.Option(help="nodes leave and come back (Weibull sessions)")] = True,
        uptime_mean_s: Annotated[float, typer.Option(help="mean session length")] = 1800.0,
        downtime_mean_s: Annotated[float, typer.Option(help="mean time away")] = 300.0,
        dishonest: Annotated[float, typer.Option(help="share of dishonest nodes")] = 0.05,
        stragglers: Annotated[float, typer.Option(help="share of nodes slower than their spec")] = 0.05,
        thermal_per_hour: Annotated[float, typer.Option(help="throttling episodes per node per hour")] = 2.0,
        ttft_slo: Annotated[float, typer.Option(help="TTFT target, seconds")] = 2.0,
        tpot_slo: Annotated[float, typer.Option(help="time per output token target, seconds")] = 0.1,
        refine: Annotated[int, typer.Option(help="bisection runs per policy to narrow goodput")] = 3,
    ) -> None:
        """Simulate the grid on a trace with each policy: SLO attainment, goodput, latency, cost; plots."""
        from gridserve.catalog.models import UnknownModel, register_config
        from gridserve.scheduler import ProfileError, named_profile
        from gridserve.sim import report as rep
        from gridserve.sim.cards import cards_section
        from gridserve.sim.engine import SimConfig
        from gridserve.sim.grid import DECENTRALIZED_MIX, model_for_trace
        from gridserve.sim.trace import TraceError, load_trace, prefix_ceiling

        try:
            if model_config is not None:
                model = register_config(model_config, model).name
            requests = load_trace(trace, limit)
            if model is None:
                model, unservable = model_for_trace(requests, DECENTRALIZED_MIX)
                longest = max(r.prompt_tokens + r.output_tokens for r in requests)
                console.print(
                    f"model {model}: longest request {longest:,} tokens; "
                    + (
                        f"{unservable} requests exceed every catalogue model's context (they fail)"
                        if unservable
                        else "every request fits its context"
                    )
                )
            names = [p.strip() for p in policies.split(",") if p.strip()]
            for name in names:
                named_profile(name)
            points = sorted({float(x) for x in loads.split(",") if x.strip()} | {load})
            if nodes < 1 or load <= 0 or any(p <= 0 for p in points):
                raise ValueError("nodes and loads must be positive")
            shares = (dishonest, stragglers)
            if any(not 0 <= x <= 1 for x in shares) or min(uptime_mean_s, downtime_mean_s, ttft_slo, tpot_slo) <= 0:
                raise ValueError("shares must be in [0, 1]; times and SLOs must be positive")
            mix = _mix_holding(model, console)
            config = SimConfig(
                nodes=nodes,
                seed=seed,
                model=model,
                mix=mix,
                churn=churn,
                uptime_mean_s=uptime_mean_s,
                downtime_mean_s=downtime_mean_s,
                dishonest_share=dishonest,
                straggler_share=stragglers,
                thermal_per_hour=max(0.0, thermal_per_hour),
                ttft_slo_s=ttft_slo,
                tpot_slo_s=tpot_slo,
            )
        except (TraceError, ProfileError, UnknownModel, ValueError) as exc:
            raise fail(str(exc)) from None
        with Progress(console=console) as progress:
            task = progress.add_task("simulating", total=len(names) * (len(points) + max(0, refine)))

            def advance(policy: str, at: float) -> None:
                progress.update(task, advance=1, description=f"{policy} at load {at:.2f}")

            runs, capacity = rep.compare(requests, config, names, points, advance, refine=max(0, refine))
            progress.update(task, completed=len(names) * (len(points) + max(0, refine)))
        entries = rep.report(runs, config, load, capacity)
        header = {
            "trace": str(trace),
            "requests": len(requests),
            "nodes": nodes,
            "load": load,
            "capacity_rps": round(capacity, 3),
            "seed": seed,
            "ttft_slo_s": config.ttft_slo_s,
            "tpot_slo_s": config.tpot_slo_s,
            "model": config.model,
            "prefix_ceiling": round(prefix_ceiling(requests)[1], 4) if any(r.blocks for r in requests) else None,
            "churn": config.churn,
            "uptime_mean_s": config.uptime_mean_s,
            "downtime_mean_s": config.downtime_mean_s,
            "dishonest_share": config.dishonest_share,
            "straggler_share": config.straggler_share,
            "thermal_per_hour": config.thermal_per_hour,
        }
        served = {policy: run.outcomes for policy, run in rep.runs_at(runs, load).items()}
        cards = cards_section(config, served)
        rep.write(entries, runs, out, header, cards)
        table = Table(title=f"{nodes} nodes, load {load} ({capacity * load:.1f} req/s)")
        columns = (
            "policy",
            "SLO attainment",
            "goodput req/s",
            "goodput 99% req/s",
            "cache hit",
            "TTFT p99 s",
            "TPOT p99 s",
            "failed",
            "retried",
        )
        for column in (*columns, "dishonest tokens"):
            table.add_column(column)
        for e in entries:
            table.add_row(
                e["policy"],
                f"{e['slo_attainment']:.3f}",
                f"{e['goodput_rps']:.1f}",
                f"{e['goodput_99_rps']:.1f}",
                f"{e['cache_hit_rate']:.3f}",
                str(e["ttft_p99_s"]),
                str(e["tpot_p99_s"]),
                str(e["failed"]),
                str(e["retried"]),
                str(e["dishonest_tokens"]),
            )
        console.print(table)
        for card_table in _cards_tables(cards, config.model, load):
            console.print(card_table)
        console.print(f"report: {out / 'report.json'}, {out / 'summary.md'}, plots in {out}")


def _mix_holding(model: str, console: Console) -> dict[str, float]:
    """The default card mix less the cards that cannot hold `model` even at q4_k_m (said on the console);
    ValueError if none can."""
    from gridserve.catalog import hardware_spec, model_spec
    from gridserve.engines.placement import EmulationError, placement_for
    from gridserve.sim.grid import DECENTRALIZED_MIX

    spec, mix, left_out = model_spec(model), {}, []
    for card, share in DECENTRALIZED_MIX.items():
        try:
            placement_for(spec, hardware_spec(card))
            mix[card] = share
        except EmulationError:
            left_out.append(card)
    if not mix:
        raise ValueError(
            f"{model} fits on none of the simulated cards ({', '.join(DECENTRALIZED_MIX)}), even at q4_k_m"
        )
    if left_out:
        console.print(f"{model} does not fit on {', '.join(left_out)} even at q4_k_m: simulated without them")
    return mix


def _cards_tables(cards: list[dict[str, Any]], model: str, load: float) -> list[Table]:
    """The report's cards section, compact: each card of the default mix, whether it serves `model` and why, its
    predicted speed and price and its share of the nodes; then per policy the share of the served requests each
    serving card finished at `load`."""
    from rich.markup import escape

    fit = Table(
        title=f"cards for {model}",
        caption="why: the widest precision whose weights (every parameter) fit in memory less the KV reserve; "
        "read/token: weight bytes a decoded token streams; ITL full: every batch slot busy",
    )
    for column in ("card", "serves", "why", "read/token GB", "tok/s batch 1", "ITL full ms", "$/Mtok", "nodes"):
        fit.add_column(column)
    for c in cards:
        ok = c["serves"]
        fit.add_row(
            c["card"],
            "yes" if ok else "[red]no[/]",
            escape(c["reason"]),
            f"{c['bytes_per_token'] / 1e9:.2f}" if ok else "-",
            f"{c['decode_tokens_per_s']:.0f}" if ok else "-",
            f"{c['itl_full_batch_s'] * 1e3:.1f}" if ok else "-",
            f"{c['price_per_mtok']:.3f}" if ok else "-",
            f"{c['node_share']:.0%}",
        )
    serving = [c for c in cards if c["serves"]]
    policies = list(dict.fromkeys(p for c in serving for p in c["served"]))
    if not policies:
        return [fit]
    traffic = Table(title=f"requests served per card at load {load}")
    for column in ("policy", *(c["card"] for c in serving)):
        traffic.add_column(column)
    for policy in policies:
        traffic.add_row(policy, *(f"{c['served'][policy]['requests']:.0%}" for c in serving))
    return [fit, traffic]
