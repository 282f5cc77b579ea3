"""`gridserve up` starts a grid and stops it cleanly on SIGTERM; `gridserve nodes`; readable CLI errors."""

import itertools
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from gridserve.cli.grid import PORT_SHARE_ENV, free_port_block

GRIDSERVE = [sys.executable, "-m", "gridserve"]


def test_up_serves_and_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    port = free_port_block(4)
    proc = subprocess.Popen(
        [
            *GRIDSERVE,
            "up",
            "--nodes",
            "2",
            "--engine",
            "tiny",
            "--port",
            str(port),
            "--data-dir",
            str(tmp_path),
            "--api-key",
            "k-cli",
            "--admin-token",
            "a-cli",
            "--heartbeat-interval",
            "1",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 120
        lines = []
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            lines.append(line)
            if "grid up" in line or not line:
                break
        assert any("grid up" in line for line in lines), "".join(lines)
        assert any(f"http://127.0.0.1:{port}/v1" in line and "k-cli" in line for line in lines)

        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k-cli", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["gridserve-tiny"]
        table = subprocess.run(
            [*GRIDSERVE, "nodes", "--gateway", f"http://127.0.0.1:{port}", "--admin-token", "a-cli"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert table.returncode == 0, table.stderr
        assert table.stdout.count("tiny") >= 2 and "up" in table.stdout

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        rest = proc.stdout.read()
        assert "grid stopped" in rest
        for offset in range(3):  # gateway and both nodes are gone
            try:
                httpx.get(f"http://127.0.0.1:{port + offset}/health", timeout=1)
                raise AssertionError(f"port {port + offset} still answers")
            except httpx.ConnectError:
                pass
    finally:
        if proc.poll() is None:
            proc.kill()


def test_cli_errors_are_one_readable_line(tmp_path: Path) -> None:
    bad_engine = subprocess.run(
        [
            *GRIDSERVE,
            "node",
            "--gateway",
            "http://127.0.0.1:9",
            "--engine",
            "warp-drive",
            "--port",
            "9",
            "--key",
            str(tmp_path / "k.key"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad_engine.returncode == 2
    assert "unknown engine 'warp-drive'" in bad_engine.stderr and "Traceback" not in bad_engine.stderr
    bad_hw = subprocess.run(
        [
            *GRIDSERVE,
            "node",
            "--gateway",
            "http://127.0.0.1:9",
            "--engine",
            "emulated:abacus",
            "--port",
            "9",
            "--key",
            str(tmp_path / "k.key"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad_hw.returncode == 2 and "unknown hardware 'abacus'" in bad_hw.stderr
    assert "Traceback" not in bad_hw.stderr
    unreachable = subprocess.run(
        [*GRIDSERVE, "nodes", "--gateway", "http://127.0.0.1:9", "--admin-token", "x"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert unreachable.returncode == 2 and "cannot reach" in unreachable.stderr
    assert len(unreachable.stderr.strip().splitlines()) == 1


def _plan(*args: str) -> subprocess.CompletedProcess[str]:
    env = {"COLUMNS": "200", "PATH": "/usr/bin:/bin"}
    return subprocess.run([*GRIDSERVE, "plan", *args], capture_output=True, text=True, timeout=120, env=env)


def test_plan_splits_a_model_over_catalogue_cards_and_beats_the_baselines() -> None:
    import json

    done = _plan("llama-3-70b", "--cards", "rtx3090,rtx4090,t4,rtx4090", "--quantization", "q4_k_m", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    stages = report["stages"]
    cuts = [tuple(int(x) for x in s["layers"].split(":")) for s in stages]
    assert cuts[0][0] == 0 and cuts[-1][1] == 80  # llama-3-70b has 80 layers: all of them, once, in order
    assert all(a[1] == b[0] for a, b in itertools.pairwise(cuts))
    assert all(s["memory_gib"] <= s["node_memory_gib"] for s in stages)
    baselines = [ms for ms in report["baselines_ms_per_token"].values() if ms is not None]
    assert baselines and all(report["ms_per_token"] <= ms for ms in baselines)
    text = _plan("llama-3-70b", "--cards", "rtx3090,rtx4090,t4,rtx4090", "--quantization", "q4_k_m")
    assert text.returncode == 0 and "gridserve node --layers" in text.stdout


def test_plan_errors_are_one_readable_line() -> None:
    for args, expected in (
        (("nope", "--cards", "t4"), "unknown model"),
        (("llama-3-70b", "--cards", "t4,zzz"), "unknown hardware"),
        (("llama-3-70b", "--cards", "t4"), "no chain"),
        (("llama-3-70b",), "either --cards or --gateway"),
    ):
        done = _plan(*args)
        assert done.returncode == 2 and expected in done.stderr, done.stderr
        assert "Traceback" not in done.stderr


def _model_config(folder: Path, change: dict[str, object] | None = None) -> Path:
    """A Hugging Face checkout's config.json (Qwen/Qwen3-30B-A3B's, as shipped), with `change` applied."""
    import json

    from gridserve.catalog.hf_config import shipped_config

    folder.mkdir(parents=True)
    path = folder / "config.json"
    path.write_text(json.dumps({**shipped_config("qwen3-30b-a3b"), **(change or {})}))
    return path


def test_plan_and_simulate_serve_a_model_read_from_its_config(tmp_path: Path) -> None:
    import json

    config = _model_config(tmp_path / "Qwen3-30B-A3B")
    done = _plan("--model-config", str(config), "--cards", "rtx4090,t4,rtx4090", "--quantization", "q4_k_m", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["model"] == "Qwen3-30B-A3B"  # named after its directory
    assert report["stages"][0]["layers"].startswith("0:") and report["stages"][-1]["layers"].endswith(":48")
    named = _plan("mine", "--model-config", str(config), "--cards", "h100-sxm", "--json")
    assert named.returncode == 0 and json.loads(named.stdout)["model"] == "mine"
    trace = tmp_path / "t.jsonl"
    trace.write_text(
        "".join(json.dumps({"timestamp": i * 50.0, "input_length": 500, "output_length": 50}) + "\n" for i in range(60))
    )
    out = tmp_path / "out"
    run = ("--nodes", "12", "--loads", "0.5", "--load", "0.5", "--policies", "default", "--refine", "0")
    sim = subprocess.run(
        [*GRIDSERVE, "simulate", "--trace", str(trace), "--out", str(out), *run, "--model-config", str(config)],
        capture_output=True,
        text=True,
        timeout=300,
        env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"},
    )
    assert sim.returncode == 0, sim.stderr
    assert "does not fit on t4 even at q4_k_m: simulated without them" in sim.stdout
    summary = json.loads((out / "report.json").read_text())
    assert summary["model"] == "Qwen3-30B-A3B"
    assert summary["policies"][0]["share_by_hardware"] and "t4" not in summary["policies"][0]["share_by_hardware"]
    t4 = next(c for c in summary["cards"] if c["card"] == "t4")
    assert not t4["serves"] and t4["reason"].startswith("does not fit even at q4_k_m: needs 17.4 GiB, has 16 GiB")
    assert "## Cards" in (out / "summary.md").read_text()


def test_a_bad_model_config_is_one_readable_line(tmp_path: Path) -> None:
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    no_layers = _model_config(tmp_path / "nolayers", {"num_hidden_layers": None})
    trace = tmp_path / "t.jsonl"
    trace.write_text('{"timestamp": 0, "input_length": 10, "output_length": 5}\n')
    for path, expected in (
        (tmp_path / "missing" / "config.json", "cannot read model config"),
        (tmp_path / "broken" / "config.json", "is not valid JSON"),
        (no_layers, "nolayers: config.json has no num_hidden_layers"),
    ):
        planned = _plan("--model-config", str(path), "--cards", "t4")
        simulated = subprocess.run(
            [*GRIDSERVE, "simulate", "--trace", str(trace), "--out", str(tmp_path / "o"), "--model-config", str(path)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        for done in (planned, simulated):
            assert done.returncode == 2 and expected in done.stderr, done.stderr
            assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
    neither = _plan("--cards", "t4")
    assert neither.returncode == 2 and "give a catalogue MODEL or --model-config FILE" in neither.stderr


def test_port_blocks_of_parallel_workers_never_overlap(monkeypatch: pytest.MonkeyPatch) -> None:
    spans = []
    for worker in range(3):
        monkeypatch.setenv(PORT_SHARE_ENV, f"{worker}/3")
        bases = [free_port_block(8) for _ in range(50)]
        spans.append((min(bases), max(bases) + 8))
    spans.sort()
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(spans)), spans
