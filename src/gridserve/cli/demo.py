"""`gridserve demo`: start a local grid, stream a few chat answers with the node behind each, stop."""

import time

import httpx
from rich.console import Console

from gridserve.cli.grid import LocalGrid

PROMPTS = (
    ("gemma-3-270m", "What is the capital of France? Answer in one sentence."),
    ("gemma-3-270m", "Write a haiku about a grid of computers."),
    ("llama-3-8b", "Name three primary colours."),
    ("llama-3-8b", "Say hello."),
)


def run_demo(grid: LocalGrid, console: Console, max_tokens: int = 48) -> int:
    from openai import OpenAI

    client = OpenAI(base_url=grid.url + "/v1", api_key=grid.api_key, max_retries=0)
    models = {m.id for m in client.models.list().data}
    console.print(f"[bold]models served:[/] {', '.join(sorted(models))}")
    failures = 0
    for model, prompt in PROMPTS:
        if model not in models:
            continue
        console.rule(f"[bold]{model}[/]: {prompt}")
        started = time.monotonic()
        raw = client.chat.completions.with_streaming_response.create(
            model=model,
            messages=[{"role": "user", "content": prompt}],
            max_tokens=max_tokens,
            temperature=0,
            stream=True,
        )
        with raw as response:
            decision_id = response.headers.get("x-gridserve-decision", "")
            first: float | None = None
            for chunk in response.parse():
                if chunk.choices and chunk.choices[0].delta.content:
                    first = first or time.monotonic() - started
                    console.print(chunk.choices[0].delta.content, end="", markup=False, highlight=False)
        console.print()
        decision = httpx.get(
            f"{grid.url}/v1/decisions/{decision_id}", headers={"Authorization": f"Bearer {grid.admin_token}"}, timeout=5
        ).json()
        if decision.get("status") != "ok":
            failures += 1
        node = next((n for n in grid.nodes() if n["node_id"] == decision.get("served_by")), {})
        hardware = node.get("hardware", {}).get("accelerator", "?") + (" (emulated)" if node.get("emulated") else "")
        console.print(
            f"[dim]served by {str(decision.get('served_by'))[:12]} ({node.get('engine', '?')}, {hardware}); "
            f"first token {first or 0:.2f} s; decision {decision_id}: {decision.get('explanation')}[/]"
        )
    return failures
