"""A/B: run one benchmark of this checkout and of an earlier revision side by side, alternating, in one run.

The earlier revision is checked out into a temporary git worktree and run with the same interpreter and venv,
its own `src/` first on PYTHONPATH (processes the benchmark starts inherit it). Runs alternate A, B, A, B ...,
so a machine that gets busier part-way affects both alike. Prints JSON on stdout: each run's output, per side.

    .venv/bin/python bench/ab.py --before b9e24b3 --runs 3 -- bench/gateway_overhead.py --rounds 5
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def run_side(tree: Path, argv: list[str]) -> Any:
    env = {**os.environ, "PYTHONPATH": str(tree / "src")}
    script = tree / argv[0]
    done = subprocess.run(
        [sys.executable, str(script), *argv[1:]], cwd=tree, env=env, capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise SystemExit(f"{tree.name}: {argv[0]} exited {done.returncode}: {done.stderr.strip()[-500:]}")
    return json.loads(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", required=True, help="git revision to compare with (e.g. a commit or tag)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("bench", nargs=argparse.REMAINDER, help="-- bench/NAME.py [its arguments]")
    args = parser.parse_args()
    argv = [a for a in args.bench if a != "--"]
    if not argv:
        parser.error("name the benchmark after --")
    with tempfile.TemporaryDirectory(prefix="gridserve-ab-") as tmp:
        before = Path(tmp) / "before"
        subprocess.run(["git", "worktree", "add", "-q", "--detach", str(before), args.before], cwd=ROOT, check=True)
        try:
            results: dict[str, list[Any]] = {"before": [], "after": []}
            for i in range(args.runs):
                for side, tree in (("before", before), ("after", ROOT)):
                    print(f"run {i + 1}/{args.runs}: {side}", file=sys.stderr, flush=True)
                    results[side].append(run_side(tree, argv))
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(before)], cwd=ROOT, check=False)
    print(json.dumps({"before": args.before, "bench": argv, **results}, indent=1))


if __name__ == "__main__":
    main()
