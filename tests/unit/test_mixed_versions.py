"""Two versions on one grid. A node upgraded before its gateway sends fields the gateway does not know: its
capability, heartbeats and receipts are read without them (the capability's named back in the registration reply,
so its operator sees what is not used to route to it), and anything else wrong is refused as before. A gateway
sends a node only the request fields that differ from their defaults, so an older node reads every request that
uses nothing newer than it (a request that does goes only to nodes offering it)."""

from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from pydantic import ValidationError, create_model
from tests.hostile import HostileNode
from tests.inprocess import with_gateway

from gridserve.gateway.app import Gateway
from gridserve.gateway.config import GatewayConfig
from gridserve.types import Capability, GenerateRequest, SamplingParams
from gridserve.types.base import NAMED_UNKNOWN, Strict, lenient, wire_payload
from gridserve.types.wire import ResponseFormat

MODEL = "llama-3-8b"
JSON = {"content-type": "application/json"}


def newer_capability(node: HostileNode) -> dict[str, Any]:
    doc = node.capability("http://127.0.0.1:9", [MODEL], speculative={"draft": "llama-3-1b"})
    doc["capability"]["models"][0]["kv_offload"] = True
    doc["capability"]["hardware"]["npu"] = "hexagon"
    return doc


def test_a_newer_nodes_registration_and_heartbeats_are_read_and_the_reply_names_what_was_not(tmp_path: Path) -> None:
    async def check(gw: Gateway, client: httpx.AsyncClient) -> None:
        node = HostileNode()
        resp = await client.post("/nodes/register", content=node.envelope(newer_capability(node), "register"))
        assert resp.status_code == 200, resp.text
        unread = orjson.loads(resp.content)["payload"]["unread"]
        assert sorted(unread) == [
            "capability.hardware.npu",
            "capability.models[0].kv_offload",
            "capability.speculative",
        ]
        record = gw.membership.nodes[node.node_id]  # type: ignore[index]
        assert [m.name for m in record.capability.models] == [MODEL] and record.capability.hardware.accelerator == "cpu"
        beat = {"node_id": node.node_id, "seq": 1, "telemetry": {"queue_depth": 2, "joules_per_token": 0.4}}
        resp = await client.post("/nodes/heartbeat", content=node.envelope(beat, "heartbeat"))
        assert resp.status_code == 200, resp.text
        assert gw.membership.nodes[node.node_id].telemetry.queue_depth == 2  # type: ignore[index]
        over_tunnel = {"node_id": node.node_id, "seq": 2, "telemetry": {"queue_depth": 5, "npu_load": 0.5}}
        gw.membership.channel_heartbeat(node.node_id, orjson.dumps(over_tunnel))  # type: ignore[arg-type]
        assert gw.membership.nodes[node.node_id].telemetry.queue_depth == 5  # type: ignore[index]

    with_gateway(tmp_path, check, GatewayConfig(allow_emulated=True))


def test_a_field_this_version_reads_is_still_checked_beside_unknown_ones(tmp_path: Path) -> None:
    async def check(gw: Gateway, client: httpx.AsyncClient) -> None:
        node = HostileNode()
        doc = newer_capability(node)
        doc["capability"]["models"][0]["max_context"] = "long"
        resp = await client.post("/nodes/register", content=node.envelope(doc, "register"))
        assert resp.status_code == 401 and "capability document invalid" in resp.json()["error"]["message"]
        assert not gw.membership.nodes
        same = HostileNode()  # a node of this version: the reply has no field an older node would refuse
        resp = await client.post(
            "/nodes/register", content=same.envelope(same.capability("http://127.0.0.1:9", [MODEL]), "register")
        )
        assert resp.status_code == 200 and "unread" not in orjson.loads(resp.content)["payload"]

    with_gateway(tmp_path, check, GatewayConfig(allow_emulated=True))


def test_many_unknown_fields_are_named_up_to_a_bound_and_counted() -> None:
    doc = HostileNode().capability("http://127.0.0.1:9", [MODEL], **{f"f{i}": i for i in range(40)})["capability"]
    capability, unread = lenient(Capability, doc)
    assert capability.engine == "hostile"
    assert len(unread) == NAMED_UNKNOWN + 1 and unread[-1] == f"... {40 - NAMED_UNKNOWN} more"
    with pytest.raises(ValidationError):
        lenient(Capability, {**doc, "engine": 7})


def test_a_request_reaches_an_older_node_without_the_fields_it_does_not_use() -> None:
    job = GenerateRequest(request_id="r", model=MODEL, prompt="p", sampling=SamplingParams(max_tokens=4, seed=3))
    sent = wire_payload(job)
    assert GenerateRequest.model_validate_json(orjson.dumps(sent)) == job
    newer = ("logprobs", "min_tokens", "ignore_eos", "response_format", "top_k", "repetition_penalty")
    older = create_model(  # SamplingParams as a node from before these fields reads it
        "OlderSampling",
        __base__=Strict,
        **{n: (f.annotation, f) for n, f in SamplingParams.model_fields.items() if n not in newer},  # type: ignore[call-overload]
    )
    older.model_validate_json(orjson.dumps(sent["sampling"]))
    with pytest.raises(ValidationError, match="Extra inputs"):
        older.model_validate_json(orjson.dumps(job.model_dump(mode="json")["sampling"]))
    structured = job.model_copy(
        update={"sampling": job.sampling.model_copy(update={"response_format": ResponseFormat(type="json_object")})}
    )
    assert "response_format" in wire_payload(structured)["sampling"], "a field in use is sent"
