"""Benchmark clients against a local grid, as a user would run them: NVIDIA's aiperf, with and without
`ignore_eos` (which benchmark clients send so that every answer has the length they ask for), guidellm (which
sends `ignore_eos` itself), and the Kubernetes serving group's inference-perf (as a vLLM server: `ignore_eos`,
streaming with `stream_options.include_usage`), on the text completions API with random prompts and on the chat
API with shared-prefix prompts (groups of questions behind one system prompt).

They conflict with gridserve's pins: install each in its own venv (Python 3.12) and pass its executable, e.g.
`python3.12 -m venv /tmp/aiperf && /tmp/aiperf/bin/pip install aiperf==0.13.0` (and `guidellm==0.8.1`,
`inference-perf==0.7.0`), then `.venv/bin/python bench/load_tools.py --aiperf /tmp/aiperf/bin/aiperf --guidellm
/tmp/guidellm/bin/guidellm --inference-perf /tmp/iperf/bin/inference-perf --tokenizer DIR` (DIR: a local Hugging
Face tokenizer, e.g. the Gemma cache `~/.cache/gridserve/models/gemma-3-270m`; the tools make prompts with it;
output tokens are the server's usage). Prints a JSON list, one row per run: requests, errors, and the output
lengths (tokens) the server reported."""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from gridserve.cli.grid import LocalGrid, free_port_block

KEY = "bench-key"


def aiperf(tool: str, tokenizer: str, url: str, out: Path, args: argparse.Namespace, ignore_eos: bool) -> Any:
    command = [
        tool,
        "profile",
        *("--model", args.model, "--url", url, "--endpoint-type", "chat", "--streaming", "--api-key", KEY),
        *("--tokenizer", tokenizer, "--use-server-token-count", "--ui", "none", "--artifact-dir", str(out)),
        *("--synthetic-input-tokens-mean", "64", "--output-tokens-mean", str(args.tokens)),
        *("--concurrency", str(args.concurrency), "--request-count", str(args.requests)),
        *(("--extra-inputs", "ignore_eos:true") if ignore_eos else ()),
    ]
    print(f"aiperf, ignore_eos={ignore_eos} ...", file=sys.stderr, flush=True)
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return json.loads((out / "profile_export_aiperf.json").read_text())


def short_share(out: Path, asked: int) -> float:
    """The share of requests whose answer the server ended before `asked` tokens (aiperf's per-request records)."""
    lines = (out / "profile_export.jsonl").read_text().splitlines()
    lengths = [json.loads(line)["metrics"].get("output_sequence_length", {}).get("value", 0) for line in lines if line]
    return round(sum(n < asked for n in lengths) / max(1, len(lengths)), 4)


def row(found: Any, ignore_eos: bool, asked: int, out: Path) -> dict[str, Any]:
    lengths = found["output_sequence_length"]
    errors = found.get("error_request_count") or {}
    return {
        "tool": "aiperf",
        "ignore_eos": ignore_eos,
        "requests": found["request_count"]["avg"],
        "errors": errors.get("avg", 0) if isinstance(errors, dict) else errors,
        "asked_tokens": asked,
        "output_tokens_min": lengths["min"],
        "output_tokens_p50": lengths["p50"],
        "output_tokens_max": lengths["max"],
        "output_tokens_mean": lengths["avg"],
        "ended_early_share": short_share(out, asked),
        "ttft_p50_ms": found["time_to_first_token"]["p50"],
        "request_latency_p50_ms": found["request_latency"]["p50"],
    }


def guidellm(tool: str, tokenizer: str, url: str, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    command = [
        tool,
        "run",
        *("--backend", f"kind=openai_http,target={url},model={args.model},api_key={KEY}"),
        *("--profile", f"kind=concurrent,streams={args.concurrency}"),
        *("--constraint", f"kind=max_requests,count={args.requests}"),
        *("--tokenizer", f"kind=hf_auto,model={tokenizer}"),
        *("--data", f"kind=synthetic_text,prompt_tokens=64,output_tokens={args.tokens}"),
        *("--output", f"kind=json,path={out}", "--disable-console"),
    ]
    print("guidellm ...", file=sys.stderr, flush=True)
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    requests = json.loads(out.read_text())["benchmarks"][0]["requests"]
    done = requests["successful"]
    sent = [json.loads(r["request_args"]).get("body", {}) for r in done]
    return {
        "tool": "guidellm",
        "ignore_eos": all(b.get("ignore_eos") is True for b in sent),
        "requests": len(done),
        "errors": len(requests["errored"]) + len(requests["incomplete"]),
        **_lengths([int(r["output_tokens"] or 0) for r in done], args.tokens),
    }


def _lengths(lengths: list[int], asked: int) -> dict[str, Any]:
    """The answers' lengths in tokens against the `asked` length: min, p50, max, mean, and the share that ended
    early."""
    ordered = sorted(lengths)
    count = max(1, len(ordered))
    return {
        "asked_tokens": asked,
        "output_tokens_min": ordered[0] if ordered else 0,
        "output_tokens_p50": ordered[len(ordered) // 2] if ordered else 0,
        "output_tokens_max": ordered[-1] if ordered else 0,
        "output_tokens_mean": sum(ordered) / count,
        "ended_early_share": round(sum(length < asked for length in ordered) / count, 4),
    }


def inference_perf(
    tool: str, tokenizer: str, url: str, out: Path, args: argparse.Namespace, api: str
) -> dict[str, Any]:
    """One inference-perf run: `api` "completion" with random prompts, or "chat" with shared-prefix ones."""
    n, asked = args.requests, args.tokens
    if api == "completion":
        fixed = {"min": 60, "max": 68, "mean": 64, "std_dev": 2, "total_count": n}
        data: dict[str, Any] = {
            "type": "random",
            "input_distribution": fixed,
            "output_distribution": {"min": asked, "max": asked, "mean": asked, "std_dev": 0, "total_count": n},
        }
    else:
        groups = max(1, n // 10)
        shared = {"num_groups": groups, "num_prompts_per_group": -(-n // groups), "output_len": asked}
        data = {"type": "shared_prefix", "shared_prefix": shared | {"system_prompt_len": 48, "question_len": 16}}
    config = {
        "api": {"type": api, "streaming": True},
        "server": {"type": "vllm", "model_name": args.model, "base_url": url, "ignore_eos": True, "api_key": KEY},
        "tokenizer": {"pretrained_model_name_or_path": tokenizer},
        "data": data,
        "load": {"type": "concurrent", "stages": [{"num_requests": n, "concurrency_level": args.concurrency}]},
        "report": {"request_lifecycle": {"summary": True, "per_request": True}},
        "storage": {"local_storage": {"path": str(out)}},
    }
    config_file = out.parent / f"{out.name}.json"
    config_file.write_text(json.dumps(config))
    print(f"inference-perf, {api} ...", file=sys.stderr, flush=True)
    command = [tool, "-c", str(config_file)]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    summary = json.loads((out / "summary_lifecycle_metrics.json").read_text())
    done = summary["successes"]
    records = json.loads((out / "per_request_lifecycle_metrics.json").read_text())
    return {
        "tool": "inference-perf",
        "api": api,
        "ignore_eos": all(json.loads(r["request"]).get("ignore_eos") is True for r in records),
        "requests": done["count"],
        "errors": summary["failures"]["count"],
        **_lengths([_usage_tokens(r["response"]) for r in records if not r.get("error")], asked),
        "ttft_p50_ms": round(done["latency"]["time_to_first_token"]["median"] * 1e3, 1),
        "request_latency_p50_ms": round(done["latency"]["request_latency"]["median"] * 1e3, 1),
    }


def _usage_tokens(stream: str) -> int:
    """The completion tokens in an SSE answer's usage chunk (the server's count); 0 if it has none."""
    for line in reversed(stream.splitlines()):
        if line.startswith("data: {") and '"usage"' in line:
            usage = json.loads(line[6:]).get("usage") or {}
            return int(usage.get("completion_tokens", 0))
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--aiperf", help="the aiperf executable (its own venv)")
    parser.add_argument("--guidellm", help="the guidellm executable (its own venv)")
    parser.add_argument("--inference-perf", help="the inference-perf executable (its own venv)")
    parser.add_argument("--tokenizer", required=True, help="a local Hugging Face tokenizer directory")
    parser.add_argument("--model", default="gridserve-tiny")
    parser.add_argument("--engines", nargs="*", default=["tiny", "tiny"])
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--concurrency", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        grid = LocalGrid(
            data_dir=Path(tmp) / "grid",
            port=free_port_block(len(args.engines) + 4),
            api_key=KEY,
            admin_token="bench-admin",
            engines=args.engines,
            threads=1,
            extra_gateway_args=["--vetting-checks", "0"],
        )
        with grid:
            grid.start(timeout_s=120)
            rows = []
            for eos in (False, True) if args.aiperf else ():
                out = Path(tmp) / f"aiperf-{int(eos)}"
                rows.append(row(aiperf(args.aiperf, args.tokenizer, grid.url, out, args, eos), eos, args.tokens, out))
            if args.guidellm:
                rows.append(guidellm(args.guidellm, args.tokenizer, grid.url, Path(tmp) / "guidellm.json", args))
            for api in ("completion", "chat") if args.inference_perf else ():
                out = Path(tmp) / f"inference-perf-{api}"
                rows.append(inference_perf(args.inference_perf, args.tokenizer, grid.url, out, args, api))
    print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
