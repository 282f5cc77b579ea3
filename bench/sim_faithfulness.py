"""Simulator vs a real grid: a gateway and emulated nodes on 127.0.0.1 take a streamed trace; the simulator
replays the same arrivals and token counts on the same cards; prints p50/p90 TTFT and TPOT of both and their
relative difference (sim / real - 1), per scenario. The test suite checks the first scenario (below batch
capacity); `--fifo-slots` scenarios run the emulated nodes with their batch limit, so requests queue.

Run: `.venv/bin/python bench/sim_faithfulness.py` (about 3 minutes). Prints one JSON object.
"""

import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from gridserve.cli.grid import LocalGrid, free_port_block
from gridserve.sim import faithful

MODEL = "llama-3-8b"
SCENARIOS: list[dict[str, Any]] = [
    {"name": "below capacity", "cards": ["t4", "t4", "a10g"], "rate": 1.5, "fifo": False},
    {"name": "queueing (FIFO batch slots)", "cards": ["t4", "t4"], "rate": 2.5, "fifo": True},
    {"name": "overloaded (FIFO batch slots)", "cards": ["t4", "t4"], "rate": 4.0, "fifo": True},
]


def run(scenario: dict[str, Any], requests: int) -> dict[str, Any]:
    cards = scenario["cards"]
    with tempfile.TemporaryDirectory() as tmp:
        grid = LocalGrid(
            data_dir=Path(tmp),
            port=free_port_block(len(cards) + 4),
            api_key="bench",
            admin_token="bench-admin",
            engines=[f"emulated:{card}" for card in cards],
            threads=1,
            extra_node_args=["--model", MODEL, *(["--fifo-slots"] if scenario["fifo"] else [])],
            extra_gateway_args=["--no-hedging"],
        )
        try:
            grid.start(timeout_s=120)
            replayed = faithful.replay(
                grid.url, "bench", MODEL, faithful.synthetic(requests, scenario["rate"]), admin_token="bench-admin"
            )
        finally:
            grid.stop()
    real = replayed.measured
    compared = faithful.compare(real, faithful.simulate(real, cards, MODEL))
    return {**scenario, **compared, "failed": replayed.failed}


def main() -> None:
    requests = int(sys.argv[1]) if len(sys.argv) > 1 else 60
    json.dump({"bench": "sim_faithfulness", "scenarios": [run(s, requests) for s in SCENARIOS]}, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
