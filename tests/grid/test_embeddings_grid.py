"""`POST /v1/embeddings` through the official openai SDK on running grids: the shared tiny grid (two tiny nodes, which
embed, and an emulated card, which does not), a grid whose nodes split the tasks (one tiny node embeds only, the
other generates only: neither kind of request lands on the other's node), and a grid with a node that embeds with
other weights than it claims (the gateway's sampled re-computation catches it)."""

import base64
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest
from openai import OpenAI
from tests.conftest import API_KEY, admin_get, make_grid

from gridserve.cli.grid import LocalGrid
from gridserve.engines.tiny import TINY_MODEL
from gridserve.trust import EnvelopeVerifier, FreshnessPolicy, Identity, load_or_create_identity, sign_envelope
from gridserve.types.embedding import EMBED_PURPOSE, EMBED_REPLY_PURPOSE

EMULATED = "llama-3-8b"
WIDTH = 64
"""The tiny model's hidden size."""
TEXTS = ["the cat sat on the mat", "grids of untrusted nodes", "the cat sat on the mat", "a"]


def client_of(grid: LocalGrid) -> OpenAI:
    return OpenAI(base_url=grid.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


def vectors(reply: Any) -> np.ndarray[Any, Any]:
    return np.array([d.embedding for d in reply.data], dtype=np.float32)


@pytest.fixture(scope="module")
def client(tiny_grid: LocalGrid) -> OpenAI:
    return client_of(tiny_grid)


def test_one_normalised_vector_per_input_in_order(client: OpenAI, tiny_grid: LocalGrid) -> None:
    raw = client.embeddings.with_raw_response.create(model=TINY_MODEL, input=TEXTS, encoding_format="float")
    reply = raw.parse()
    assert reply.object == "list" and reply.model == TINY_MODEL
    assert [(d.object, d.index) for d in reply.data] == [("embedding", i) for i in range(len(TEXTS))]
    got = vectors(reply)
    assert got.shape == (len(TEXTS), WIDTH)
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    assert np.array_equal(got[0], got[2]), "the same input, the same vector"
    assert not np.allclose(got[0], got[1]) and not np.allclose(got[1], got[3]), "different inputs differ"
    assert reply.usage.prompt_tokens == sum(len(t.encode()) + 1 for t in TEXTS) == reply.usage.total_tokens
    for i, text in enumerate(TEXTS[:2]):  # each alone: its vector in the batch, whichever node serves it
        alone = client.embeddings.create(model=TINY_MODEL, input=text, encoding_format="float")
        assert np.array_equal(vectors(alone)[0], got[i])
    tiny_nodes = {n["node_id"] for n in tiny_grid.nodes() if n["engine"] == "tiny"}
    assert raw.headers["x-gridserve-node"] in tiny_nodes, "the emulated card does not embed"
    decision = admin_get(tiny_grid, f"/v1/decisions/{raw.headers['x-gridserve-decision']}").json()
    assert decision["status"] == "ok" and decision["served_by"] == raw.headers["x-gridserve-node"]
    assert (decision["requirements"]["task"], decision["requirements"]["max_tokens"]) == ("embed", 0)
    # settled like any answer: the input tokens its node embedded (its signed count, the client's usage)
    served = raw.headers["x-gridserve-node"]
    assert decision["settled"] == [{"node_id": served, "tokens": reply.usage.prompt_tokens, "status": "ok"}]


def test_base64_decodes_to_the_same_floats(client: OpenAI, tiny_grid: LocalGrid) -> None:
    floats = vectors(client.embeddings.create(model=TINY_MODEL, input=TEXTS[:2], encoding_format="float"))
    by_sdk = vectors(client.embeddings.create(model=TINY_MODEL, input=TEXTS[:2]))  # the SDK asks base64, decodes
    assert np.array_equal(by_sdk, floats)
    body = {"model": TINY_MODEL, "input": TEXTS[:2], "encoding_format": "base64"}
    answer = httpx.post(
        tiny_grid.url + "/v1/embeddings", json=body, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60
    ).json()
    raw = [np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in answer["data"]]
    assert np.array_equal(np.stack(raw), floats)


def test_the_api_key_is_required(tiny_grid: LocalGrid) -> None:
    answer = httpx.post(tiny_grid.url + "/v1/embeddings", json={"model": TINY_MODEL, "input": "a"}, timeout=10)
    assert answer.status_code == 401 and answer.json()["error"]["code"] == "invalid_api_key"


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"input": [[1, 2, 3]]}, "input"),
        ({"input": [1, 2, 3]}, "input"),
        ({"input": []}, "input"),
        ({"input": ["ok", ""]}, "input.1"),
        ({"input": ["a"] * 257}, "input"),
        ({"input": "a", "dimensions": 8}, "dimensions"),
        ({"input": "a", "encoding_format": "int8"}, "encoding_format"),
        ({"input": "a", "model": EMULATED}, "model"),  # served, for generation only
        ({"input": "a" * 5000}, "input"),  # beyond the tiny model's context
    ],
)
def test_bad_input_is_a_400_naming_the_parameter(client: OpenAI, kwargs: dict[str, Any], param: str) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        client.embeddings.create(**{"model": TINY_MODEL, **kwargs})
    body = refused.value.body
    assert isinstance(body, dict) and body["param"] == param, body


def test_a_model_no_node_serves_is_a_404(client: OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as missing:
        client.embeddings.create(model="no-such-model", input="a")
    body = missing.value.body
    assert isinstance(body, dict) and (body["code"], body["param"]) == ("model_not_found", "model")


def test_the_node_takes_embed_calls_only_signed_by_its_gateway_for_embedding_once(tiny_grid: LocalGrid) -> None:
    """The node checks an embed call as it checks a generation: the gateway's key, the purpose, this node, fresh and
    never replayed; its answer is signed by its own key."""
    node = next(n for n in tiny_grid.nodes() if n["engine"] == "tiny")
    url = node["endpoint"] + "/internal/embed"
    gateway = load_or_create_identity(tiny_grid.data_dir / "gateway.key")
    payload = {"request_id": "emb-probe", "model": TINY_MODEL, "inputs": ["hi"], "node_id": node["node_id"]}

    def sent(signer: Identity, purpose: str, **changes: Any) -> httpx.Response:
        body = sign_envelope(signer, {**payload, **changes}, purpose=purpose, now=time.time())
        return httpx.post(url, content=body, timeout=30)

    refusals = [
        sent(Identity.generate(), EMBED_PURPOSE),
        sent(gateway, "generate"),
        sent(gateway, EMBED_PURPOSE, node_id="another-node"),
    ]
    assert [(r.status_code, r.json()["error"]["type"]) for r in refusals] == [
        (401, "wrong_signer"),
        (401, "wrong_signer"),
        (401, "trust_error"),
    ], [r.text for r in refusals]
    valid = sign_envelope(gateway, payload, purpose=EMBED_PURPOSE, now=time.time())
    answered = httpx.post(url, content=valid, timeout=30)
    assert answered.status_code == 200
    replayed = httpx.post(url, content=valid, timeout=30)
    assert (replayed.status_code, replayed.json()["error"]["type"]) == (401, "replayed")
    verifier = EnvelopeVerifier(FreshnessPolicy(), time.time)
    reply = verifier.verify(answered.content, purpose=EMBED_REPLY_PURPOSE, expected_keyid=node["public_key"]).payload
    assert (reply["request_id"], reply["dimensions"], len(reply["vectors"])) == ("emb-probe", WIDTH, 1)


# -- a grid whose nodes split the tasks -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def split_grid(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalGrid, str, str]]:
    """One tiny node offering the model for embedding only, one for generation only: (grid, embedder, generator)."""
    grid = make_grid(Path(tmp_path_factory.mktemp("split-tasks")), ["tiny", "tiny"], threads=1)
    try:
        grid.start_gateway()
        grid.start_node(0, "tiny", ["--tasks", "embed"])
        grid.start_node(1, "tiny", ["--tasks", "generate"])
        grid.wait_nodes(2, 120)
        by_tasks = {tuple(n["models"][0]["tasks"]): n["node_id"] for n in grid.nodes()}
        yield grid, by_tasks[("embed",)], by_tasks[("generate",)]
    finally:
        grid.stop()


def test_each_kind_of_request_lands_only_on_the_node_that_offers_it(split_grid: tuple[LocalGrid, str, str]) -> None:
    """A model served for one task only is a 400 naming the model for the other: chat once the generator has left,
    embeddings once the embedder has."""
    grid, embedder, generator = split_grid
    client = client_of(grid)
    for i in range(6):
        raw = client.embeddings.with_raw_response.create(model=TINY_MODEL, input=f"text {i}")
        assert raw.headers["x-gridserve-node"] == embedder
        chat = client.chat.completions.with_raw_response.create(
            model=TINY_MODEL, messages=[{"role": "user", "content": f"hi {i}"}], max_tokens=4
        )
        assert chat.headers["x-gridserve-node"] == generator
    decision = admin_get(grid, f"/v1/decisions/{chat.headers['x-gridserve-decision']}").json()
    (rejected,) = decision["rejections"]
    assert rejected["node_id"] == embedder and rejected["filter"] == "model-served"
    assert rejected["reason"] == f"serves {TINY_MODEL} for embed only, not generate"
    listed = {m.id: m.model_extra for m in client.models.list().data}
    assert (listed[TINY_MODEL] or {})["tasks"] == ["embed", "generate"]
    _leave(grid, "node-1", generator)
    with pytest.raises(openai.BadRequestError) as embeds_only:
        client.chat.completions.create(model=TINY_MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert embeds_only.value.param == "model" and "embeddings only" in embeds_only.value.message
    grid.start_node(1, "tiny", ["--tasks", "generate"])
    grid.wait_nodes(2, 120)
    _leave(grid, "node-0", embedder)
    with pytest.raises(openai.BadRequestError) as refused:
        client.embeddings.create(model=TINY_MODEL, input="a")
    body = refused.value.body
    assert isinstance(body, dict) and body["param"] == "model" and "not served for embeddings" in body["message"]


def _leave(grid: LocalGrid, name: str, node_id: str) -> None:
    """Stop a node and wait until the gateway no longer counts it live."""
    grid.procs[name].terminate()
    deadline = time.monotonic() + 30
    while any(n["node_id"] == node_id and n["state"] in ("up", "suspect", "probation") for n in grid.nodes()):
        assert time.monotonic() < deadline, f"{name} is still live"
        time.sleep(0.2)


def test_an_outbound_only_node_embeds_over_its_tunnel(tmp_path: Path, client: OpenAI) -> None:
    """The embed call through a tunnel (the node dials the gateway): the same vectors as a directly reached node's."""
    grid = make_grid(tmp_path, ["tiny"], threads=1, outbound_only=True)
    with grid:
        grid.start(timeout_s=120)
        (node,) = grid.nodes()
        assert node["endpoint"].startswith("tunnel://")
        raw = client_of(grid).embeddings.with_raw_response.create(
            model=TINY_MODEL, input=TEXTS, encoding_format="float"
        )
        assert raw.headers["x-gridserve-node"] == node["node_id"]
    direct = client.embeddings.create(model=TINY_MODEL, input=TEXTS, encoding_format="float")
    assert np.array_equal(vectors(raw.parse()), vectors(direct))


# -- a node that embeds with other weights ------------------------------------------------------------------------


def test_a_node_embedding_with_other_weights_is_caught_by_the_sampled_audit(tmp_path: Path) -> None:
    grid = make_grid(
        tmp_path,
        ["tiny"],
        threads=1,
        extra_node_args=["--tasks", "embed", "--allow-dishonest", "--dishonest", "wrong_model"],
        extra_gateway_args=["--audit-rate", "1", "--vetting-checks", "0"],
    )
    with grid:
        grid.start(timeout_s=120)
        (node,) = grid.nodes()
        reply = client_of(grid).embeddings.create(model=TINY_MODEL, input=["one", "two"])
        assert len(reply.data) == 2 and len(reply.data[0].embedding) == WIDTH, "the right shape: only a re-run tells"
        deadline = time.monotonic() + 60
        while True:
            incidents = admin_get(grid, f"/admin/incidents?node_id={node['node_id']}").json()["incidents"]
            if incidents or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        assert incidents and "embedding of input" in str(incidents[0]), incidents
