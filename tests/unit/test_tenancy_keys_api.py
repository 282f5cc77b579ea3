"""The admin API for API keys (gateway/api/keys_api.py) on an in-process gateway over SQLite: the policy's lists
(`models`, `tiers`) come as JSON arrays, and a body of the wrong shape or types is a 400 that names the field; and
`KeyPolicy` itself takes lists for its tuples but nothing else that is not one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import ValidationError
from tests.inprocess import Check
from tests.inprocess import with_gateway as run_gateway

from gridserve.gateway.app import Gateway
from gridserve.gateway.config import GatewayConfig
from gridserve.gateway.tenancy import KeyPolicy

ADMIN = "test-admin"


def with_gateway(tmp: Path, check: Check) -> None:
    run_gateway(tmp, check, GatewayConfig(admin_token=ADMIN))


async def create(client: httpx.AsyncClient, body: Any = None, *, content: bytes | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {ADMIN}"}
    if content is not None:
        return await client.post("/admin/keys", content=content, headers=headers)
    return await client.post("/admin/keys", json=body, headers=headers)


def test_models_and_tiers_come_as_json_arrays(tmp_path: Path) -> None:
    async def check(gw: Gateway, client: httpx.AsyncClient) -> None:
        body = {"name": "ci", "rpm": 5, "models": ["m1", "m2"], "tiers": ["batch"], "priority": "batch"}
        made = await create(client, body)
        assert made.status_code == 200, made.text
        shown = made.json()
        assert (shown["models"], shown["tiers"], shown["rpm"], shown["priority"]) == (
            ["m1", "m2"],
            ["batch"],
            5,
            "batch",
        )
        key = gw.tenancy.authenticate(shown["key"])
        assert key is not None
        assert (key.policy.models, key.policy.tiers) == (("m1", "m2"), ("batch",))
        empty = await create(client, {"name": "none", "models": []})
        assert empty.status_code == 200 and empty.json()["models"] == [], empty.text
        listed = await client.get("/admin/keys", headers={"Authorization": f"Bearer {ADMIN}"})
        assert [k["models"] for k in listed.json()["keys"]] == [["m1", "m2"], []]

    with_gateway(tmp_path, check)


@pytest.mark.parametrize(
    ("body", "param", "says"),
    [
        ({"name": "x", "models": "m1"}, "models", "Input should be a valid tuple"),
        ({"name": "x", "models": {"m1": 1}}, "models", "Input should be a valid tuple"),
        ({"name": "x", "models": ["m1", 2]}, "models.1", "Input should be a valid string"),
        ({"name": "x", "tiers": [["batch"]]}, "tiers.0", "Input should be a valid string"),
        ({"name": "x", "tiers": ["t"] * 11}, "tiers", "at most 10 items"),
        ({"name": "x", "rpm": "5"}, "rpm", "Input should be a valid integer"),
        ({"name": "x", "priority": "vip"}, "priority", "Input should be 'interactive', 'standard' or 'batch'"),
        ({"models": ["m1"]}, "name", "Field required"),
    ],
)
def test_bad_types_are_400s_naming_the_field(tmp_path: Path, body: dict[str, Any], param: str, says: str) -> None:
    async def check(gw: Gateway, client: httpx.AsyncClient) -> None:
        refused = await create(client, body)
        assert refused.status_code == 400, refused.text
        error = refused.json()["error"]
        assert error["param"] == param and error["code"] == "invalid_request"
        assert error["message"].startswith(f"Invalid key: {param}: "), error["message"]
        assert says in error["message"]
        assert gw.tenancy.list_keys() == [], "nothing made"

    with_gateway(tmp_path, check)


def test_a_body_that_is_not_json_is_a_400(tmp_path: Path) -> None:
    async def check(gw: Gateway, client: httpx.AsyncClient) -> None:
        refused = await create(client, content=b'{"name": "x", "models": [')
        assert refused.status_code == 400, refused.text
        assert refused.json()["error"]["message"].startswith("invalid body: a JSON object with at least `name`")

    with_gateway(tmp_path, check)


def test_key_policy_takes_lists_for_its_tuples_and_nothing_else() -> None:
    policy = KeyPolicy.model_validate({"models": ["m1"], "tiers": ["batch", "economy"]})
    assert (policy.models, policy.tiers) == (("m1",), ("batch", "economy"))
    assert KeyPolicy.model_validate({"models": ("m1",)}).models == ("m1",)
    assert KeyPolicy.model_validate({"models": None}).models is None
    for bad in ("m1", {"m1"}, [1], [b"m1"]):
        with pytest.raises(ValidationError):
            KeyPolicy.model_validate({"models": bad})
    with pytest.raises(ValidationError):
        KeyPolicy.model_validate({"rpm": "5"})  # still strict elsewhere
