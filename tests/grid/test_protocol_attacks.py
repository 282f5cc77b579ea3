"""Node protocol attacks against a running gateway and node: each is rejected and recorded."""

import time
from typing import Any

import httpx
import orjson
import pytest
from tests.conftest import admin_get

from gridserve.cli.grid import LocalGrid
from gridserve.trust import Identity, sign_envelope
from gridserve.types import Capability, HardwareInfo, ModelOffer, NodeId, RuntimeInfo, Telemetry


def capability(identity: Identity) -> dict[str, Any]:
    cap = Capability(
        node_id=NodeId(identity.node_id),
        public_key=identity.public_key,
        endpoint="http://127.0.0.1:9",
        engine="tiny",
        models=(ModelOffer(name="llama-3-8b", weights_digest="emulated:llama-3-8b"),),
        hardware=HardwareInfo(accelerator="cpu"),
        runtime=RuntimeInfo(gridserve="0", python="3.11", engine="tiny"),
    )
    return {"capability": cap.model_dump(mode="json")}


def heartbeat(identity: Identity, seq: int = 1) -> dict[str, Any]:
    return {"node_id": identity.node_id, "seq": seq, "telemetry": Telemetry().model_dump(mode="json")}


def send(grid: LocalGrid, path: str, body: bytes) -> httpx.Response:
    return httpx.post(grid.url + path, content=body, headers={"content-type": "application/json"}, timeout=10)


def rejections(grid: LocalGrid) -> list[dict[str, Any]]:
    events = admin_get(grid, "/admin/events?kind=protocol_rejected&limit=1000").json()["events"]
    return [e["detail"] for e in events]


@pytest.fixture(scope="module")
def member(tiny_grid: LocalGrid) -> Identity:
    """A properly registered identity whose messages the attacks tamper with."""
    identity = Identity.generate()
    resp = send(
        tiny_grid, "/nodes/register", sign_envelope(identity, capability(identity), purpose="register", now=time.time())
    )
    assert resp.status_code == 200, resp.text
    return identity


def expect_rejected(grid: LocalGrid, path: str, body: bytes, reason: str, status: int = 401) -> None:
    before = sum(1 for d in rejections(grid) if d["reason"] == reason and d["path"] == path)
    resp = send(grid, path, body)
    assert resp.status_code == status, resp.text
    assert resp.json()["error"]["type"] == reason
    after = sum(1 for d in rejections(grid) if d["reason"] == reason and d["path"] == path)
    assert after >= before + 1


def test_valid_heartbeat_is_accepted(tiny_grid: LocalGrid, member: Identity) -> None:
    resp = send(
        tiny_grid, "/nodes/heartbeat", sign_envelope(member, heartbeat(member), purpose="heartbeat", now=time.time())
    )
    assert resp.status_code == 200


def test_unsigned_message_is_rejected(tiny_grid: LocalGrid, member: Identity) -> None:
    expect_rejected(tiny_grid, "/nodes/heartbeat", orjson.dumps({"payload": heartbeat(member)}), "unsigned")
    expect_rejected(tiny_grid, "/nodes/register", orjson.dumps(capability(member)), "malformed")


def test_forged_signature_is_rejected(tiny_grid: LocalGrid, member: Identity) -> None:
    attacker = Identity.generate()
    doc = orjson.loads(sign_envelope(attacker, heartbeat(member), purpose="heartbeat", now=time.time()))
    doc["sig"]["keyid"] = member.public_key  # claim the member's key, signed by another
    expect_rejected(tiny_grid, "/nodes/heartbeat", orjson.dumps(doc), "bad_signature")


def test_tampered_payload_is_rejected(tiny_grid: LocalGrid, member: Identity) -> None:
    doc = orjson.loads(sign_envelope(member, heartbeat(member), purpose="heartbeat", now=time.time()))
    doc["payload"]["seq"] = 999
    expect_rejected(tiny_grid, "/nodes/heartbeat", orjson.dumps(doc), "bad_signature")


def test_replayed_nonce_is_rejected(tiny_grid: LocalGrid, member: Identity) -> None:
    body = sign_envelope(member, heartbeat(member, seq=2), purpose="heartbeat", now=time.time())
    assert send(tiny_grid, "/nodes/heartbeat", body).status_code == 200
    expect_rejected(tiny_grid, "/nodes/heartbeat", body, "replayed")


def test_expired_and_far_future_messages_are_rejected(tiny_grid: LocalGrid, member: Identity) -> None:
    old = sign_envelope(member, heartbeat(member), purpose="heartbeat", now=time.time() - 600)
    expect_rejected(tiny_grid, "/nodes/heartbeat", old, "expired")
    future = sign_envelope(member, heartbeat(member), purpose="heartbeat", now=time.time() + 600)
    expect_rejected(tiny_grid, "/nodes/heartbeat", future, "from_the_future")
    long_lived = sign_envelope(member, heartbeat(member), purpose="heartbeat", now=time.time(), lifetime_s=86400)
    expect_rejected(tiny_grid, "/nodes/heartbeat", long_lived, "expired")


def test_signature_for_another_purpose_is_rejected(tiny_grid: LocalGrid, member: Identity) -> None:
    body = sign_envelope(member, heartbeat(member), purpose="register", now=time.time())
    expect_rejected(tiny_grid, "/nodes/heartbeat", body, "wrong_signer")


def test_heartbeat_from_unregistered_node_is_rejected(tiny_grid: LocalGrid) -> None:
    stranger = Identity.generate()
    body = sign_envelope(stranger, heartbeat(stranger), purpose="heartbeat", now=time.time())
    expect_rejected(tiny_grid, "/nodes/heartbeat", body, "unknown_node", status=404)


def test_registration_claiming_another_node_id_is_rejected(tiny_grid: LocalGrid, member: Identity) -> None:
    attacker = Identity.generate()
    body = sign_envelope(attacker, capability(member), purpose="register", now=time.time())
    expect_rejected(tiny_grid, "/nodes/register", body, "wrong_signer")


def _tiny_node(grid: LocalGrid) -> dict[str, Any]:
    return next(n for n in grid.nodes() if n["engine"] == "tiny")


def _generate_payload(node_id: str) -> dict[str, Any]:
    return {
        "request_id": "attack",
        "model": "gridserve-tiny",
        "prompt": "hi",
        "node_id": node_id,
        "sampling": {"max_tokens": 2, "temperature": 0.0, "top_p": 1.0, "seed": None, "stop": []},
    }


def test_generate_not_signed_by_the_gateway_is_rejected_and_recorded(tiny_grid: LocalGrid) -> None:
    node = _tiny_node(tiny_grid)
    url = node["endpoint"] + "/internal/generate"
    attacker = Identity.generate()
    forged = sign_envelope(attacker, _generate_payload(node["node_id"]), purpose="generate", now=time.time())
    resp = httpx.post(url, content=forged, timeout=10)
    assert resp.status_code == 401 and resp.json()["error"]["type"] == "wrong_signer"
    unsigned = httpx.post(url, content=orjson.dumps({"payload": _generate_payload(node["node_id"])}), timeout=10)
    assert unsigned.status_code == 401 and unsigned.json()["error"]["type"] == "unsigned"
    deadline = time.monotonic() + 10  # the node reports refusals in its next heartbeat
    errors: list[str] = []
    while time.monotonic() < deadline:
        fresh = next(n for n in tiny_grid.nodes() if n["node_id"] == node["node_id"])
        errors = [e["message"] for e in (fresh["telemetry"] or {}).get("errors", [])]
        if "refused generate: wrong_signer" in errors and "refused generate: unsigned" in errors:
            break
        time.sleep(0.5)
    assert "refused generate: wrong_signer" in errors and "refused generate: unsigned" in errors


def _replayed_count(grid: LocalGrid) -> float:
    for line in httpx.get(grid.url + "/metrics", timeout=10).text.splitlines():
        if line.startswith('gridserve_protocol_rejections_total{reason="replayed"}'):
            return float(line.split()[-1])
    return 0.0


def test_protocol_rejections_are_counted_in_metrics(tiny_grid: LocalGrid, member: Identity) -> None:
    before = _replayed_count(tiny_grid)
    body = sign_envelope(member, heartbeat(member, seq=3), purpose="heartbeat", now=time.time())
    assert send(tiny_grid, "/nodes/heartbeat", body).status_code == 200
    assert send(tiny_grid, "/nodes/heartbeat", body).status_code == 401
    assert _replayed_count(tiny_grid) == before + 1
