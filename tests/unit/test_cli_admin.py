"""What the admin command groups share (cli/admin.py `AdminCommands`), through `gridserve keys` and `gridserve tokens`
with the admin API faked: the call each command makes, ids quoted as one path segment, lists as JSON or a table,
and an error answer as one `error:` line with exit code 2."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from gridserve.cli import admin
from gridserve.cli.main import app

KEY = {
    "id": "k1",
    "name": "team [a]",
    "created_at": 1_700_000_000.0,
    "revoked_at": None,
    "status": "active",
    "rpm": 5,
    "tpm": None,
    "max_concurrency": None,
    "budget_usd": None,
    "models": None,
    "tiers": None,
    "priority": "standard",
}
TOKEN = {
    "id": "t1",
    "label": "lab",
    "status": "active",
    "created_at": 1_700_000_000.0,
    "expires_at": None,
    "uses": 1,
    "uses_left": 1,
    "node_ids": [],
}


class FakeAdmin:
    """admin_call's stand-in: records (method, path) and answers from `answers`, or raises AdminError."""

    def __init__(self, answers: dict[tuple[str, str], Any]) -> None:
        self.answers = answers
        self.calls: list[tuple[str, str]] = []

    def __call__(
        self, gateway: str, token: str | None, data_dir: Path, method: str, path: str, body: Any = None
    ) -> Any:
        self.calls.append((method, path))
        if (method, path) not in self.answers:
            raise admin.AdminError(f"{gateway} answered 404: No such thing {path}.")
        return self.answers[(method, path)]


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeAdmin:
    found = FakeAdmin(
        {
            ("GET", "/admin/keys"): {"keys": [KEY]},
            ("GET", "/admin/tokens"): {"tokens": [TOKEN]},
            ("DELETE", "/admin/keys/k1"): {**KEY, "status": "revoked"},
            ("DELETE", "/admin/tokens/t1"): {**TOKEN, "status": "revoked"},
        }
    )
    monkeypatch.setattr(admin, "admin_call", found)
    return found


def invoke(*args: str) -> Any:
    return CliRunner().invoke(app, [*args, "--gateway", "http://gw:1", "--data-dir", "/nonexistent"])


@pytest.mark.parametrize(("group", "member", "item"), [("keys", "keys", KEY), ("tokens", "tokens", TOKEN)])
def test_list_prints_json_or_a_table(fake: FakeAdmin, group: str, member: str, item: dict[str, Any]) -> None:
    as_json = invoke(group, "list", "--json")
    assert as_json.exit_code == 0, as_json.output
    assert json.loads(as_json.output) == [item]
    table = invoke(group, "list")
    assert table.exit_code == 0, table.output
    shown = item.get("name", item.get("label"))
    assert f"│ {item['id']} " in table.output and f"│ {shown} " in table.output, table.output
    assert fake.calls == [("GET", f"/admin/{member}")] * 2


def test_revoke_deletes_the_item_and_says_so(fake: FakeAdmin) -> None:
    key = invoke("keys", "revoke", "k1")
    token = invoke("tokens", "revoke", "t1")
    assert (key.exit_code, key.output) == (0, "API key k1 (team [a]) revoked\n")
    assert (token.exit_code, token.output) == (0, "join token t1 revoked\n")
    assert fake.calls == [("DELETE", "/admin/keys/k1"), ("DELETE", "/admin/tokens/t1")]


def test_an_id_is_one_path_segment_and_an_error_answer_is_one_line_exit_2(fake: FakeAdmin) -> None:
    for group in ("keys", "tokens"):
        refused = invoke(group, "revoke", "a/../b")
        assert refused.exit_code == 2
        assert refused.output == f"error: http://gw:1 answered 404: No such thing /admin/{group}/a%2F..%2Fb.\n"
    rotated = invoke("keys", "rotate", "a/b")
    assert rotated.exit_code == 2
    assert fake.calls == [
        ("DELETE", "/admin/keys/a%2F..%2Fb"),
        ("DELETE", "/admin/tokens/a%2F..%2Fb"),
        ("POST", "/admin/keys/a%2Fb/rotate"),
    ]
