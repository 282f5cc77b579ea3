"""The README's command examples use options the CLI has; a node advertised to other machines listens on them."""

import re
from pathlib import Path

import typer.main

from gridserve.cli.main import app

README = Path(__file__).resolve().parents[2] / "README.md"
FLAG = re.compile(r"(?<![\w-])(--[a-z][a-z0-9-]*)")


def _options() -> dict[str, set[str]]:
    """Flags of each command: `node`, and `keys create` for a group's subcommands."""
    group = typer.main.get_command(app)
    out: dict[str, set[str]] = {}
    for name, cmd in getattr(group, "commands", {}).items():
        for sub, leaf in getattr(cmd, "commands", {}).items():
            out[f"{name} {sub}"] = _flags(leaf)
        out[name] = _flags(cmd)
    return out


def _flags(cmd: object) -> set[str]:
    return {o for p in getattr(cmd, "params", []) for o in (*p.opts, *p.secondary_opts) if o.startswith("--")} | {
        "--help"
    }


def _example_commands() -> list[tuple[str, str]]:
    """(subcommand, the rest of its line) for every `gridserve SUB ...` in the README's code blocks."""
    out: list[tuple[str, str]] = []
    fence: str | None = None
    shell: list[str] = []
    for line in README.read_text().splitlines():
        if line.startswith("```"):
            fence = line[3:].strip() if fence is None else None
            continue
        if fence in ("bash", "sh"):
            shell.append(line)
    for line in "\n".join(shell).replace("\\\n", " ").splitlines():
        code = re.split(r"\s#\s", line)[0]  # drop trailing comments
        for sub, rest in re.findall(r"\bgridserve ([a-z][a-z-]*)([^|;&]*)", code):
            leaf = re.match(r"\s+([a-z][a-z-]*)", rest)  # a group's subcommand: `keys create`
            if leaf and f"{sub} {leaf.group(1)}" in _options():
                sub, rest = f"{sub} {leaf.group(1)}", rest[leaf.end() :]
            out.append((sub, rest))
    return out


def test_readme_examples_use_existing_commands_and_options() -> None:
    options = _options()
    examples = _example_commands()
    assert len(examples) >= 10
    problems = [
        f"gridserve {sub}: {flag}" if sub in options else f"no command {sub}"
        for sub, rest in examples
        for flag in (FLAG.findall(rest) if sub in options else [None])
        if sub not in options or flag not in options[sub]
    ]
    assert problems == []


def test_readme_nodes_advertised_to_other_machines_bind_a_public_address() -> None:
    remote_url = re.compile(r"--advertise-url http://(?!127\.|localhost)")
    remote = [rest for sub, rest in _example_commands() if sub == "node" and remote_url.search(rest)]
    assert len(remote) >= 2
    assert all(re.search(r"--host 0\.0\.0\.0\b", rest) for rest in remote), remote
