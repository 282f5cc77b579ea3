"""Faithfulness: a real grid of emulated nodes on 127.0.0.1 and the simulator, given the same cards and the
same requests, agree on client TTFT and TPOT within 10% at the median and the 90th percentile."""

from pathlib import Path

from conftest import make_grid
from gridserve.sim import faithful

CARDS = ["t4", "t4", "a10g"]
MODEL = "llama-3-8b"


def test_the_simulator_agrees_with_a_real_grid_within_10_percent(tmp_path: Path) -> None:
    grid = make_grid(
        tmp_path,
        [f"emulated:{card}" for card in CARDS],
        threads=1,
        extra_node_args=["--model", MODEL],
        extra_gateway_args=["--no-hedging"],  # the simulator does not hedge
    )
    trace = faithful.synthetic(60, rate=1.5, seed=0)
    try:
        grid.start(timeout_s=120)
        real = faithful.replay(grid.url, grid.api_key, MODEL, trace)
    finally:
        grid.stop()
    assert len(real) == len(trace)  # every request answered, streamed, with usage
    assert max(m.prompt_tokens for m in real) > 3000  # long prompts: the node counts the whole prompt
    sim = faithful.simulate(real, CARDS, MODEL)
    report = faithful.compare(real, sim)
    for key in ("ttft_p50", "ttft_p90", "tpot_p50", "tpot_p90"):
        assert abs(report[key]["diff"]) <= 0.10, report
