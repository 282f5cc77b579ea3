"""Join tokens (gateway/registry/tokens.py): created once and stored as a digest, redeemed by binding node identities
up to their uses (the same node again uses nothing), refused when unknown, expired, revoked or used up; kept in the
store; checked by `POST /nodes/register` before a node is accepted, managed by the admin API; and the node stops when
its token is refused. In process: no sockets (the gateway's app through httpx's ASGI transport)."""

import asyncio
import hashlib
import hmac
import json
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import httpx
import pytest
from tests.hostile import HostileNode
from tests.inprocess import Check
from tests.inprocess import with_gateway as run_gateway

from gridserve.engines import Engine
from gridserve.engines.base import EngineStats
from gridserve.gateway.app import Gateway
from gridserve.gateway.config import GatewayConfig
from gridserve.gateway.registry import tokens as tokens_module
from gridserve.gateway.registry.tokens import JOIN_TOKEN_HEADER, JoinRefused, JoinTokens, UnknownToken, digest
from gridserve.node.agent import JoinTokenRefused, NodeAgent
from gridserve.node.config import NodeConfig
from gridserve.store import Store
from gridserve.trust import BadSignature, EnvelopeVerifier, FreshnessPolicy, Identity
from gridserve.types import HardwareInfo, ModelOffer

ADMIN = "test-admin"
MODEL = "llama-3-8b"
T0 = 1_800_000_000.0


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    found = Store(f"sqlite:///{tmp_path / 'gs.db'}")
    found.migrate()
    yield found
    found.close()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def tokens(store: Store, clock: Clock) -> JoinTokens:
    return JoinTokens(store, EnvelopeVerifier(FreshnessPolicy(), clock), clock)


def refusal(token: str | None, node_id: str, tokens: JoinTokens) -> str:
    with pytest.raises(JoinRefused) as caught:
        tokens.redeem(token or "", node_id)
    assert caught.value.kind == "join_token"
    return caught.value.detail


# -- the token state -----------------------------------------------------------------------------------------------


def test_a_token_is_shown_once_and_only_its_digest_is_stored(tokens: JoinTokens, store: Store) -> None:
    made = tokens.create(label="rack 4", uses=2, expires_in_s=3600)
    token = made["token"]
    assert token.startswith(f"gsj_{made['id']}.") and len(token) > 40
    assert made["expires_at"] == T0 + 3600 and made["uses_left"] == 2 and made["status"] == "active"
    (row,) = store.list_join_tokens()
    assert row["digest"] == hashlib.sha256(token.encode()).hexdigest() == digest(token)
    secret = token.partition(".")[2]
    assert secret not in json.dumps(row) and token not in json.dumps(row)
    listed = tokens.list_tokens()
    assert listed == [{k: v for k, v in made.items() if k != "token"}]
    assert "token" not in listed[0] and "digest" not in listed[0]


def test_redeeming_binds_node_ids_up_to_the_uses_and_the_same_node_again_uses_nothing(tokens: JoinTokens) -> None:
    token = tokens.create(uses=2)["token"]
    assert tokens.redeem(token, "n-a")["node_ids"] == ["n-a"]
    for _ in range(3):  # a restart (or a model loaded): the same identity registers again
        again = tokens.redeem(token, "n-a")
        assert again["node_ids"] == ["n-a"] and again["uses_left"] == 1
    assert tokens.redeem(token, "n-b")["node_ids"] == ["n-a", "n-b"]
    assert "admitted its 2 node identities already" in refusal(token, "n-c", tokens)
    assert tokens.redeem(token, "n-b")["status"] == "used"  # both bound identities still pass
    assert tokens.list_tokens()[0]["node_ids"] == ["n-a", "n-b"]


def test_a_single_use_token_refuses_a_second_identity(tokens: JoinTokens) -> None:
    token = tokens.create()["token"]
    tokens.redeem(token, "n-a")
    assert "admitted its 1 node identity already" in refusal(token, "n-b", tokens)


def test_unknown_malformed_and_forged_tokens_are_refused(tokens: JoinTokens) -> None:
    token = tokens.create()["token"]
    token_id, _, secret = token.removeprefix("gsj_").partition(".")
    forged = f"gsj_{token_id}.{'A' * len(secret)}"  # a known id with another secret
    for bad in ("", "garbage", "gsj_", f"gsj_{token_id}", f"gsj_{token_id}.", "gsj_ffffffffffff." + secret, forged):
        assert "not recognized" in refusal(bad, "n-a", tokens), bad
    assert tokens.list_tokens()[0]["node_ids"] == []  # nothing bound by the refused attempts


def test_an_expired_token_admits_no_new_identity_but_still_the_ones_it_bound(tokens: JoinTokens, clock: Clock) -> None:
    token = tokens.create(uses=3, expires_in_s=60)["token"]
    tokens.redeem(token, "n-a")
    clock.now += 61
    assert "expired" in refusal(token, "n-b", tokens)
    assert tokens.redeem(token, "n-a")["node_ids"] == ["n-a"]  # a restart after the expiry
    assert tokens.list_tokens()[0]["status"] == "expired"
    absolute = tokens.create(expires_at=clock.now + 10)["token"]
    clock.now += 10
    assert "expired" in refusal(absolute, "n-c", tokens)


def test_a_revoked_token_admits_no_one_not_even_the_nodes_it_bound(tokens: JoinTokens) -> None:
    made = tokens.create(uses=2)
    tokens.redeem(made["token"], "n-a")
    assert tokens.revoke(made["id"])["status"] == "revoked"
    assert "revoked" in refusal(made["token"], "n-a", tokens)
    assert "revoked" in refusal(made["token"], "n-b", tokens)
    first = tokens.list_tokens()[0]["revoked_at"]
    assert tokens.revoke(made["id"])["revoked_at"] == first  # revoking again changes nothing
    with pytest.raises(UnknownToken):
        tokens.revoke("nosuchtoken")


def test_bad_creations_are_refused(tokens: JoinTokens, clock: Clock) -> None:
    for kwargs in ({"uses": 0}, {"uses": 10_001}, {"expires_at": clock.now - 1}):
        with pytest.raises(ValueError):
            tokens.create(**kwargs)
    assert tokens.list_tokens() == []


def test_digests_are_compared_in_constant_time(tokens: JoinTokens, monkeypatch: pytest.MonkeyPatch) -> None:
    token = tokens.create()["token"]
    compared: list[tuple[str, str]] = []
    constant_time = hmac.compare_digest

    def spy(a: str, b: str) -> bool:
        compared.append((a, b))
        return constant_time(a, b)

    monkeypatch.setattr(tokens_module, "hmac", SimpleNamespace(compare_digest=spy))
    tokens.redeem(token, "n-a")
    assert compared == [(digest(token), digest(token))]
    with pytest.raises(JoinRefused):
        tokens.redeem(token[:-1] + ("A" if token[-1] != "A" else "B"), "n-a")
    assert len(compared) == 2 and compared[1][0] == digest(token)


def test_tokens_survive_a_restart_of_the_store(tmp_path: Path, clock: Clock) -> None:
    url = f"sqlite:///{tmp_path / 'restart.db'}"
    first = Store(url)
    first.migrate()
    made = JoinTokens(first, EnvelopeVerifier(FreshnessPolicy(), clock), clock).create(label="kept", uses=2)
    JoinTokens(first, EnvelopeVerifier(FreshnessPolicy(), clock), clock).redeem(made["token"], "n-a")
    first.close()
    second = Store(url)
    second.migrate()  # idempotent: the table and its rows stay
    again = JoinTokens(second, EnvelopeVerifier(FreshnessPolicy(), clock), clock)
    (listed,) = again.list_tokens()
    assert listed["label"] == "kept" and listed["node_ids"] == ["n-a"] and listed["uses_left"] == 1
    assert again.redeem(made["token"], "n-a")["uses_left"] == 1
    assert again.redeem(made["token"], "n-b")["uses_left"] == 0
    second.close()


def test_a_change_that_raises_leaves_the_row_as_it_was(store: Store, tokens: JoinTokens) -> None:
    made = tokens.create()

    def change(row: dict[str, Any]) -> dict[str, Any]:
        raise JoinRefused("no")

    with pytest.raises(JoinRefused):
        store.change_join_token(made["id"], change)
    assert store.change_join_token("missing", change) is None
    assert tokens.list_tokens()[0]["status"] == "active"


# -- registration at the gateway --------------------------------------------------------------------------------------


def register_body(node: HostileNode) -> bytes:
    return node.envelope(node.capability("http://127.0.0.1:9", [MODEL]), "register")


def with_gateway(tmp: Path, check: Check, *, required: bool = True) -> None:
    """Run `check` against an in-process gateway (join tokens required unless told)."""
    config = GatewayConfig(admin_token=ADMIN, allow_emulated=True, join_tokens_required=required)
    run_gateway(tmp, check, config)


async def register(client: httpx.AsyncClient, node: HostileNode, token: str | None) -> httpx.Response:
    headers = {"content-type": "application/json", **({JOIN_TOKEN_HEADER: token} if token is not None else {})}
    return await client.post("/nodes/register", content=register_body(node), headers=headers)


async def create(client: httpx.AsyncClient, body: Any) -> httpx.Response:
    return await client.post("/admin/tokens", json=body, headers={"Authorization": f"Bearer {ADMIN}"})


def refused_as_join_token(resp: httpx.Response) -> str:
    assert resp.status_code == 401, resp.text
    error = resp.json()["error"]
    assert error["type"] == "join_token"
    return str(error["message"])


def test_registration_needs_a_token_that_admits_the_node(tmp_path: Path) -> None:
    async def check(gw: Gateway, client: httpx.AsyncClient) -> None:
        alice, bob = HostileNode(), HostileNode()
        message = refused_as_join_token(await register(client, alice, None))
        assert "admits only nodes holding a join token" in message and "gridserve tokens create" in message
        assert "not recognized" in refused_as_join_token(await register(client, alice, "gsj_abc.def"))
        assert not gw.membership.nodes
        made = (await create(client, {"label": "alice"})).json()
        assert (await register(client, alice, made["token"])).status_code == 200
        assert (await register(client, alice, made["token"])).status_code == 200  # a restart: still one use
        assert set(gw.membership.nodes) == {alice.node_id}
        assert "already" in refused_as_join_token(await register(client, bob, made["token"]))
        assert set(gw.membership.nodes) == {alice.node_id}  # refused before it was accepted
        assert gw.join_tokens.list_tokens()[0]["node_ids"] == [alice.node_id]

    with_gateway(tmp_path, check)


def test_a_badly_signed_registration_binds_nothing(tmp_path: Path) -> None:
    async def check(gw: Gateway, client: httpx.AsyncClient) -> None:
        made = (await create(client, {})).json()
        mallory, alice = HostileNode(), HostileNode()
        body = mallory.envelope(mallory.capability("http://127.0.0.1:9", [MODEL]), "register", keyid=alice.public_key)
        headers = {"content-type": "application/json", JOIN_TOKEN_HEADER: made["token"]}
        resp = await client.post("/nodes/register", content=body, headers=headers)
        assert resp.status_code == 401 and resp.json()["error"]["type"] == BadSignature.kind
        assert gw.join_tokens.list_tokens()[0]["node_ids"] == []
        assert (await register(client, mallory, made["token"])).status_code == 200

    with_gateway(tmp_path, check)


def test_a_revoked_token_stops_registrations(tmp_path: Path) -> None:
    async def check(gw: Gateway, client: httpx.AsyncClient) -> None:
        made = (await create(client, {"uses": 3})).json()
        alice = HostileNode()
        assert (await register(client, alice, made["token"])).status_code == 200
        admin = {"Authorization": f"Bearer {ADMIN}"}
        revoked = await client.delete(f"/admin/tokens/{made['id']}", headers=admin)
        assert revoked.status_code == 200 and revoked.json()["status"] == "revoked"
        assert "revoked" in refused_as_join_token(await register(client, HostileNode(), made["token"]))
        assert "revoked" in refused_as_join_token(await register(client, alice, made["token"]))

    with_gateway(tmp_path, check)


def test_an_open_gateway_ignores_tokens(tmp_path: Path) -> None:
    async def check(gw: Gateway, client: httpx.AsyncClient) -> None:
        assert (await register(client, HostileNode(), None)).status_code == 200
        assert (await register(client, HostileNode(), "gsj_unknown.token")).status_code == 200
        assert len(gw.membership.nodes) == 2

    with_gateway(tmp_path, check, required=False)


def test_the_admin_api_answers_bad_input_in_its_error_format(tmp_path: Path) -> None:
    bad_bodies: list[Any] = [
        None,
        [],
        {"uses": 0},
        {"uses": "2"},
        {"uses": True},
        {"expires_in_s": -1},
        {"expires_at": 1.0},  # in the past
        {"expires_in_s": 10, "expires_at": T0},
        {"label": "x" * 201},
        {"secret": "chosen"},
    ]

    async def check(gw: Gateway, client: httpx.AsyncClient) -> None:
        admin = {"Authorization": f"Bearer {ADMIN}"}
        for body in bad_bodies:
            content = b"" if body is None else json.dumps(body)
            resp = await client.post("/admin/tokens", content=content, headers=admin)
            assert resp.status_code == 400, (body, resp.text)
            assert resp.json()["error"]["code"] == "invalid_request"
        missing = await client.delete("/admin/tokens/nosuch", headers=admin)
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
        for method, path in (("POST", "/admin/tokens"), ("GET", "/admin/tokens"), ("DELETE", "/admin/tokens/x")):
            assert (await client.request(method, path, json={})).status_code == 401
        made = await create(client, {"label": "a", "uses": 2, "expires_in_s": 3600})
        assert made.status_code == 200 and made.json()["token"].startswith("gsj_")
        listed = (await client.get("/admin/tokens", headers=admin)).json()["tokens"]
        assert [t["label"] for t in listed] == ["a"] and "token" not in listed[0]

    with_gateway(tmp_path, check)


def test_the_openapi_document_has_the_token_routes_and_their_errors(tmp_path: Path) -> None:
    async def check(gw: Gateway, client: httpx.AsyncClient) -> None:
        paths = (await client.get("/openapi.json")).json()["paths"]
        assert {"400", "401", "413", "200"} <= set(paths["/admin/tokens"]["post"]["responses"])
        assert {"401", "404", "200"} <= set(paths["/admin/tokens/{token_id}"]["delete"]["responses"])
        assert "join token" in paths["/nodes/register"]["post"]["responses"]["401"]["description"]

    with_gateway(tmp_path, check)


# -- the node ----------------------------------------------------------------------------------------------------------


class StillEngine:
    """An engine that offers one model and never generates (registration only)."""

    kind = "emulated:test"
    stats = EngineStats()

    def offers(self) -> tuple[ModelOffer, ...]:
        return (ModelOffer(name=MODEL, weights_digest=f"emulated:{MODEL}"),)

    def loadable(self) -> tuple[str, ...]:
        return ()

    def advertised_hardware(self) -> HardwareInfo | None:
        return HardwareInfo(accelerator="rtx4090", emulated=True)


def node_agent(answer: httpx.Response, seen: list[httpx.Request], token: str | None = "gsj_abc.def") -> NodeAgent:
    config = NodeConfig(gateway_url="http://gw", engine="emulated:test", port=9, join_token=token)
    agent = NodeAgent(config, Identity.generate(), cast(Engine, StillEngine()))

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return answer

    agent._client = httpx.AsyncClient(transport=httpx.MockTransport(handle))
    return agent


def join_refusal(message: str) -> httpx.Response:
    return httpx.Response(401, json={"error": {"type": "join_token", "message": message}})


def test_the_node_sends_its_token_and_stops_when_it_is_refused() -> None:
    seen: list[httpx.Request] = []

    async def go() -> NodeAgent:
        agent = node_agent(join_refusal("join token abc was revoked"), seen)
        await asyncio.wait_for(agent.run(), timeout=5)  # returns: no retrying a refused token
        await agent.aclose()
        return agent

    agent = asyncio.run(go())
    assert len(seen) == 1 and seen[0].headers[JOIN_TOKEN_HEADER] == "gsj_abc.def"
    assert agent.stopped.is_set() and isinstance(agent.refused, JoinTokenRefused)
    assert str(agent.refused) == "gateway http://gw refused this node: join token abc was revoked"
    assert not agent.registered.is_set()


def test_a_node_without_a_token_sends_no_header_and_other_refusals_are_retried() -> None:
    seen: list[httpx.Request] = []

    async def go() -> NodeAgent:
        agent = node_agent(httpx.Response(401, json={"error": {"type": "bad_signature", "message": "no"}}), seen, None)
        with pytest.raises(RuntimeError, match="registration refused"):
            await agent.register()
        await agent.aclose()
        return agent

    agent = asyncio.run(go())
    assert JOIN_TOKEN_HEADER not in seen[0].headers and not agent.stopped.is_set() and agent.refused is None


def test_the_node_registers_with_its_token(tmp_path: Path) -> None:
    async def check(gw: Gateway, client: httpx.AsyncClient) -> None:
        token = (await create(client, {})).json()["token"]
        agent = node_agent(httpx.Response(500), [], token)

        async def forward(request: httpx.Request) -> httpx.Response:
            resp = await client.post(request.url.path, content=request.content, headers=dict(request.headers))
            return httpx.Response(resp.status_code, content=resp.content, headers=resp.headers)

        agent._client = httpx.AsyncClient(transport=httpx.MockTransport(forward))
        await agent.register()
        await agent.aclose()
        assert agent.registered.is_set() and agent.identity.node_id in gw.membership.nodes
        assert gw.join_tokens.list_tokens()[0]["node_ids"] == [agent.identity.node_id]

    with_gateway(tmp_path, check)
