"""Embeddings without processes or sockets: the capability (ModelOffer.tasks) and the scheduler's filter both ways
(column path, every packaged profile, and the compiled kernel), request validation, the response's shape, the
pooling (normalised, deterministic, order kept, independent of the batch), the node answer's checks, and the
dispatch's failover past a node that answers wrongly."""

from __future__ import annotations

import asyncio
import base64
import random
import re
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import numpy as np
import orjson
import pytest
import torch
from pydantic import ValidationError
from tests.unit.dispatch_support import CONFIG, store_writer

from gridserve.engines.embedding import embedder_for, parse_tasks
from gridserve.engines.pooling import mean_pooled
from gridserve.engines.tiny import TINY_MODEL, build_tiny_model
from gridserve.engines.torch_engine import TorchEngine
from gridserve.engines.upstream import UpstreamEngine, _embeddings
from gridserve.gateway.api import embeddings_api
from gridserve.gateway.api.embeddings_api import EmbeddingRequest, parse, response
from gridserve.gateway.api.errors import APIError
from gridserve.gateway.dispatch.dispatcher import Dispatcher
from gridserve.gateway.dispatch.embeddings import EmbeddingDispatch
from gridserve.gateway.integrity.audit import Auditor, Verifier
from gridserve.gateway.integrity.embeddings import (
    AUDIT_TOLERANCE,
    SPECIAL_TOKENS_PER_INPUT,
    BadReply,
    Integrity,
    check_embeddings,
    most_tokens,
    read_reply,
    verifiable,
)
from gridserve.gateway.integrity.receipts import ReceiptChecker
from gridserve.gateway.lifecycle import Finished, NodeWork, Scope, Timing
from gridserve.gateway.lifecycle.subscribers import MetricsSubscriber, Settlement
from gridserve.gateway.ops.metrics import GatewayMetrics
from gridserve.gateway.registry.events import Registered
from gridserve.gateway.registry.membership import Membership
from gridserve.gateway.transport import Refused, Unreachable
from gridserve.gateway.transport.fake import FakeTransport
from gridserve.scheduler import Scheduler, default_profile, fused, named_profile
from gridserve.scheduler.baselines import BASELINES
from gridserve.scheduler.context import Context
from gridserve.scheduler.snapshot import NodeSnapshot
from gridserve.store import StoreWriter
from gridserve.trust import EnvelopeVerifier, FreshnessPolicy, Identity, sign_envelope
from gridserve.types import Capability, HardwareInfo, ModelOffer, NodeId, NodeState, RuntimeInfo, Telemetry
from gridserve.types.embedding import (
    EMBED_REPLY_PURPOSE,
    MAX_EMBED_INPUTS,
    EmbedRequest,
    decode_vectors,
    encode_vector,
)
from gridserve.types.node import Task
from gridserve.types.scheduling import Candidate, Decision, ScheduleRequest

NOW = 1_700_000_000.0
WIDTH = 64
"""The tiny model's hidden size (catalogue: gridserve-tiny)."""


# -- the capability ---------------------------------------------------------------------------------------------


def test_an_offer_that_names_no_task_is_for_generation_as_before() -> None:
    old = ModelOffer.model_validate_json(b'{"name": "m", "max_context": 64}')
    assert old.tasks == ("generate",) and old.serves("generate") and not old.serves("embed")
    with pytest.raises(ValidationError):
        ModelOffer.model_validate_json(b'{"name": "m", "tasks": ["rerank"]}')
    with pytest.raises(ValidationError):
        ModelOffer.model_validate_json(b'{"name": "m", "tasks": []}')


def test_tasks_are_parsed_by_name_once_each() -> None:
    assert parse_tasks(["embed", " generate", "embed"]) == ("embed", "generate")
    with pytest.raises(Exception, match="unknown task 'rerank'"):
        parse_tasks(["rerank"])
    with pytest.raises(Exception, match="at least one"):
        parse_tasks([])


# -- the scheduler: embedding is its own capability ----------------------------------------------------------------


def snapshot(name: str, tasks: tuple[Task, ...], model: str = TINY_MODEL, accelerator: str = "cpu") -> NodeSnapshot:
    dtype = "float32" if model == TINY_MODEL else "float16"
    capability = Capability(
        node_id=NodeId(name),
        public_key=f"pk-{name}",
        endpoint=f"http://{name}.test",
        engine="tiny",
        models=(ModelOffer(name=model, dtype=dtype, max_context=4096, tasks=tasks),),
        hardware=HardwareInfo(accelerator=accelerator, memory_bytes=80 * 2**30),
        runtime=RuntimeInfo(gridserve="t", python="t", engine="t"),
    )
    return NodeSnapshot(
        node_id=NodeId(name),
        state=NodeState.UP,
        capability=capability,
        last_heartbeat=NOW - 1,
        telemetry=Telemetry(memory_total_bytes=80 * 2**30),
    )


def mixed_grid(model: str = TINY_MODEL, accelerator: str = "cpu", copies: int = 1) -> list[NodeSnapshot]:
    nodes = []
    for i in range(copies):
        nodes += [
            snapshot(f"gen-{i}", ("generate",), model, accelerator),
            snapshot(f"emb-{i}", ("embed",), model, accelerator),
            snapshot(f"both-{i}", ("generate", "embed"), model, accelerator),
        ]
    return nodes


def ask(task: Task, model: str = TINY_MODEL) -> ScheduleRequest:
    max_tokens = 0 if task == "embed" else 16
    return ScheduleRequest(request_id="r", model=model, prompt_tokens=8, max_tokens=max_tokens, task=task)


def eligible(decision: Decision) -> set[str]:
    return {v.node_id for v in decision.verdicts if v.eligible}


@pytest.mark.parametrize("profile", ["default", *BASELINES])
def test_each_task_goes_only_to_offers_of_that_task_and_says_why_not(profile: str) -> None:
    scheduler = Scheduler(default_profile() if profile == "default" else named_profile(profile))
    nodes = mixed_grid()
    embedding = scheduler.schedule(ask("embed"), nodes, random.Random(0), NOW)
    generation = scheduler.schedule(ask("generate"), nodes, random.Random(0), NOW)
    assert eligible(embedding) == {"emb-0", "both-0"} and embedding.chosen in {"emb-0", "both-0"}
    assert embedding.requirements["task"] == "embed" and "task" not in generation.requirements
    assert eligible(generation) == {"gen-0", "both-0"} and generation.chosen in {"gen-0", "both-0"}
    (no_embed,) = embedding.rejections
    assert (no_embed.node_id, no_embed.filter) == ("gen-0", "model-served")
    assert no_embed.reason == f"serves {TINY_MODEL} for generate only, not embed"
    (no_generate,) = generation.rejections
    assert (no_generate.node_id, no_generate.filter) == ("emb-0", "model-served")
    assert no_generate.reason == f"serves {TINY_MODEL} for embed only, not generate"


def test_a_node_without_the_model_is_not_served_an_embedding_either() -> None:
    nodes = [snapshot("other", ("generate", "embed"), model="gemma-3-270m"), snapshot("emb", ("embed",))]
    decision = Scheduler(default_profile()).schedule(ask("embed"), nodes, random.Random(0), NOW)
    assert decision.chosen == "emb"
    (rejected,) = decision.rejections
    assert rejected.node_id == "other" and rejected.reason == f"does not serve {TINY_MODEL} (serves gemma-3-270m)"


def test_the_compiled_kernel_keeps_generations_off_embed_only_offers_and_leaves_embeddings_to_the_columns() -> None:
    nodes = mixed_grid("llama-3-8b", "rtx4090", copies=10)  # 30 nodes: over the kernel's pool
    generate, embed = ask("generate", "llama-3-8b"), ask("embed", "llama-3-8b")
    assert fused.applies(Context.build(generate, NOW)) and not fused.applies(Context.build(embed, NOW))
    kernel = Scheduler(default_profile(), compiled=True)
    column = Scheduler(default_profile())
    for request in (generate, embed):
        by_kernel = kernel.schedule(request, nodes, random.Random(3), NOW, decision_id="d")
        by_columns = column.schedule(request, nodes, random.Random(3), NOW, decision_id="d")
        assert by_kernel.verdicts == by_columns.verdicts and by_kernel.chosen == by_columns.chosen
    by_kernel = kernel.schedule(generate, nodes, random.Random(3), NOW)
    assert eligible(by_kernel) == {n.node_id for n in nodes if not n.node_id.startswith("emb-")}
    assert {v.filter for v in by_kernel.rejections} == {"model-served"}


# -- the request ------------------------------------------------------------------------------------------------


def refused(body: Any) -> APIError:
    with pytest.raises(APIError) as caught:
        parse(body if isinstance(body, bytes) else orjson.dumps(body))
    assert caught.value.status == 400
    return caught.value


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"model": "m", "input": [1, 2, 3]}, "input", "token ids"),
        ({"model": "m", "input": [[1, 2], [3]]}, "input", "token ids"),
        ({"model": "m", "input": ["a"] * (MAX_EMBED_INPUTS + 1)}, "input", f"from 1 to {MAX_EMBED_INPUTS}"),
        ({"model": "m", "input": []}, "input", "holds 0 texts"),
        ({"model": "m", "input": ""}, "input", "the text is empty"),
        ({"model": "m", "input": ["a", ""]}, "input.1", "the text is empty"),
        ({"model": "m", "input": ["a", None]}, "input.1", "is not a string"),
        ({"model": "m", "input": 7}, "input", "a string or a list of strings"),
        ({"model": "m"}, "input", "required"),
        ({"input": "a"}, "model", "required"),
        ({"model": "m", "input": "a", "encoding_format": "int8"}, "encoding_format", "float"),
        ({"model": "m", "input": "a", "dimensions": 0}, "dimensions", "greater than or equal to 1"),
        ({"model": "m", "input": "a", "user": 5}, "user", "string"),
        ({"model": "m", "input": "a", "temperature": 1}, "temperature", "not permitted"),
    ],
)
def test_bad_input_is_a_400_naming_the_parameter(body: dict[str, Any], param: str, words: str) -> None:
    error = refused(body)
    assert error.param == param, error.message
    assert words in error.message, error.message


def test_a_body_that_is_not_a_json_object_is_a_400() -> None:
    assert "not valid JSON" in refused(b"{nope").message
    assert "JSON object" in refused([1]).message


def test_a_valid_request_takes_one_text_or_a_list_and_user() -> None:
    one = parse(orjson.dumps({"model": "m", "input": "hi", "user": "u-1"}))
    many = parse(orjson.dumps({"model": "m", "input": ["a", "b"], "encoding_format": "base64"}))
    assert one.inputs() == ("hi",) and one.encoding_format == "float"
    assert many.inputs() == ("a", "b") and many.encoding_format == "base64"


def test_dimensions_other_than_the_models_own_width_are_a_400() -> None:
    embeddings_api._check_dimensions(EmbeddingRequest(model=TINY_MODEL, input="a", dimensions=WIDTH))
    for model, dimensions in ((TINY_MODEL, 32), ("not-in-the-catalogue", 8)):
        with pytest.raises(APIError) as caught:
            embeddings_api._check_dimensions(EmbeddingRequest(model=model, input="a", dimensions=dimensions))
        assert (caught.value.status, caught.value.param) == (400, "dimensions")


# -- the response -----------------------------------------------------------------------------------------------


def test_the_response_is_openais_shape_in_input_order_as_floats_or_base64() -> None:
    vectors = np.random.default_rng(1).standard_normal((3, 5)).astype(np.float32)
    for fmt in ("float", "base64"):
        req = EmbeddingRequest(model="m", input=["a", "b", "c"], encoding_format=fmt)  # type: ignore[arg-type]
        raw = orjson.loads(orjson.dumps(response(req, vectors, 7), option=orjson.OPT_SERIALIZE_NUMPY))
        assert raw["object"] == "list" and raw["model"] == "m"
        assert raw["usage"] == {"prompt_tokens": 7, "total_tokens": 7}
        assert [(d["object"], d["index"]) for d in raw["data"]] == [
            ("embedding", 0),
            ("embedding", 1),
            ("embedding", 2),
        ]
        for row, entry in zip(vectors, raw["data"], strict=True):
            value = entry["embedding"]
            got = (
                np.frombuffer(base64.b64decode(value), dtype="<f4")
                if fmt == "base64"
                else np.array(value, dtype=np.float32)
            )
            assert np.array_equal(got, row), "the same float32 values either way"


def test_the_node_wire_encoding_is_exact_and_checks_the_width() -> None:
    vectors = np.random.default_rng(2).standard_normal((2, 6)).astype(np.float32)
    encoded = [encode_vector(v) for v in vectors]
    assert np.array_equal(decode_vectors(encoded, 6), vectors)
    with pytest.raises(ValueError, match="has 6 values, not 5"):
        decode_vectors(encoded, 5)
    with pytest.raises(ValueError, match="not base64"):
        decode_vectors(["***"], 6)


# -- pooling on the tiny engine ---------------------------------------------------------------------------------


def embed(engine: TorchEngine, *inputs: str) -> np.ndarray[Any, Any]:
    return asyncio.run(engine.embed(TINY_MODEL, inputs)).vectors


def test_vectors_are_normalised_deterministic_in_order_and_independent_of_the_batch(tiny: TorchEngine) -> None:
    texts = ("the cat sat", "on the mat", "a longer sentence about something else entirely")
    batch = embed(tiny, *texts)
    assert batch.shape == (3, WIDTH) and batch.dtype == np.float32
    assert np.allclose(np.linalg.norm(batch, axis=1), 1.0, atol=1e-6)
    alone = np.stack([embed(tiny, t)[0] for t in texts])
    assert np.array_equal(batch, alone), "each vector is its input's alone, bit for bit"
    assert np.array_equal(embed(tiny, *reversed(texts)), batch[::-1]), "order of inputs kept"
    assert np.array_equal(embed(tiny, texts[0], texts[0])[1], batch[0])
    assert not np.allclose(batch[0], batch[1]) and not np.allclose(batch[1], batch[2])


def test_the_vector_is_the_mean_of_the_last_hidden_state_normalised(tiny: TorchEngine) -> None:
    loaded = build_tiny_model()
    ids = loaded.codec.encode_prompt("pooling")
    with torch.inference_mode():
        states = loaded.model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0]
    mean = states.float().mean(dim=0)
    want = (mean / mean.norm()).numpy()
    assert np.allclose(embed(tiny, "pooling")[0], want, atol=1e-6)
    assert np.allclose(mean_pooled(loaded.model, ids), want, atol=1e-6)


def test_an_input_longer_than_the_context_is_refused_and_generation_only_offers_do_not_embed() -> None:
    from gridserve.engines.base import InvalidRequest
    from gridserve.engines.tiny import tiny_engine

    engine = tiny_engine(threads=1)
    engine.load_sync()
    try:
        with pytest.raises(InvalidRequest, match="exceeds the model's context"):
            embed(engine, "x" * 5000)
        assert embedder_for(engine, engine.offers(), TINY_MODEL) is engine
        engine.offer_tasks(("embed",))
        assert engine.offers()[0].tasks == ("embed",) and engine.offers()[0].features == ()
        engine.offer_tasks(("generate",))
        assert engine.offers()[0].tasks == ("generate",)
        assert embedder_for(engine, engine.offers(), TINY_MODEL) is None
        with pytest.raises(InvalidRequest, match="does not embed"):
            embed(engine, "a")
    finally:
        asyncio.run(engine.aclose())


def test_an_upstream_answer_is_read_in_index_order_and_refused_when_not_one_vector_per_input() -> None:
    data = {
        "data": [{"index": 1, "embedding": [3.0, 4.0]}, {"index": 0, "embedding": [1.0, 2.0]}],
        "usage": {"prompt_tokens": 5, "total_tokens": 5},
    }
    made = _embeddings(data, 2)
    assert made.vectors.tolist() == [[1.0, 2.0], [3.0, 4.0]] and made.prompt_tokens == 5
    packed = {"data": [{"index": 0, "embedding": encode_vector(np.array([0.5, -1.0], dtype=np.float32))}]}
    assert _embeddings(packed, 1).vectors.tolist() == [[0.5, -1.0]]
    from gridserve.engines.base import EngineError

    per_token = {"data": [{"index": 0, "embedding": [[1.0, 0.0], [3.0, 4.0]]}]}  # llama.cpp's --pooling none
    assert np.allclose(_embeddings(per_token, 1).vectors, [[2.0 / np.sqrt(8.0), 2.0 / np.sqrt(8.0)]])
    ragged = {"data": [{"index": 0, "embedding": [1.0, 2.0]}, {"index": 1, "embedding": [1.0]}]}
    empty = {"data": [{"index": 0, "embedding": []}]}
    for bad, count in (({"data": data["data"][:1]}, 2), (ragged, 2), (empty, 1), ({"error": "x"}, 1)):
        with pytest.raises(EngineError):
            _embeddings(bad, count)
    engine = UpstreamEngine(url="http://127.0.0.1:1", served_name="m", upstream_model="m", max_context=64)
    assert engine.offers()[0].tasks == ("generate",)
    engine.offer_tasks(("embed",))
    assert engine.offers()[0].tasks == ("embed",)


# -- the node's answer ------------------------------------------------------------------------------------------

NODE = Identity.generate()
JOB = EmbedRequest(request_id="emb-1", model=TINY_MODEL, inputs=("a", "b"))


def verifier() -> EnvelopeVerifier:
    return EnvelopeVerifier(FreshnessPolicy(), time.time)


def signed(rows: np.ndarray[Any, Any], *, signer: Identity = NODE, **fields: Any) -> bytes:
    reply = {
        "request_id": JOB.request_id,
        "model": JOB.model,
        "dimensions": int(rows.shape[1]),
        "vectors": [encode_vector(v) for v in rows],
        "prompt_tokens": 4,
        **fields,
    }
    return sign_envelope(signer, reply, purpose=EMBED_REPLY_PURPOSE, now=time.time())


def unit_vectors(count: int = 2, width: int = WIDTH) -> np.ndarray[Any, Any]:
    rows = np.random.default_rng(count).standard_normal((count, width)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def test_a_valid_answer_is_read_exactly() -> None:
    vectors = unit_vectors()
    got, tokens = read_reply(verifier(), signed(vectors), NODE.public_key, JOB)
    assert np.array_equal(got, vectors) and tokens == 4


def test_the_input_tokens_a_node_is_paid_for_are_bounded_by_its_inputs_bytes(tiny: TorchEngine) -> None:
    """One token per byte at most, of the input as given or as a tokeniser may normalise it, plus each input's
    special tokens: the most an honest tokeniser counts, and the tiny engine's count stays within it."""
    assert most_tokens(("a", "b")) == 2 * (1 + SPECIAL_TOKENS_PER_INPUT)
    assert most_tokens(("\u00e9t\u00e9",)) == 7 + SPECIAL_TOKENS_PER_INPUT  # bytes of NFKD's e + accent, twice
    ligature = "\ufdfa"  # 3 bytes; NFKC makes it 18 characters, 33 bytes
    assert most_tokens((ligature,)) == 33 + SPECIAL_TOKENS_PER_INPUT
    texts = ["\u00e9t\u00e9", ligature, "\u00bd", "plain words", "\u3000\u337f"]
    counted = asyncio.run(tiny.embed(TINY_MODEL, texts)).prompt_tokens
    assert counted <= most_tokens(tuple(texts))


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (lambda: signed(unit_vectors(1)), "1 vectors for 2 inputs"),
        (lambda: signed(unit_vectors(2, 32)), "vectors of 32 values; gridserve-tiny's have 64"),
        (lambda: signed(np.full((2, WIDTH), np.nan, dtype=np.float32)), "vector 0 holds a value that is not finite"),
        (lambda: signed(unit_vectors(), request_id="emb-2"), "for emb-2"),
        (lambda: signed(unit_vectors(), signer=Identity.generate()), "signature does not hold"),
        (lambda: signed(unit_vectors(), vectors=["AAAAAA==", "AAAAAA=="]), "has 1 values, not 64"),
        (lambda: signed(unit_vectors(), dimensions=0), "not an embeddings answer"),
    ],
)
def test_a_wrong_answer_is_refused_saying_why(make: Any, words: str) -> None:
    with pytest.raises(BadReply, match=re.escape(words)):
        read_reply(verifier(), make(), NODE.public_key, JOB)


# -- dispatch: failover past a node that fails or answers wrongly -------------------------------------------------


@pytest.fixture(scope="module")
def writer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StoreWriter]:
    yield from store_writer(Path(tmp_path_factory.mktemp("embeddings")))


class Nodes:
    def __init__(self, writer: StoreWriter, answers: dict[str, Any]) -> None:
        self.membership = Membership(CONFIG, verifier(), writer, GatewayMetrics())
        for name in answers:
            capability = Capability(
                node_id=NodeId(name),
                public_key=NODE.public_key,
                endpoint=f"http://{name}.test",
                engine="tiny",
                models=(ModelOffer(name=TINY_MODEL, dtype="float32", tasks=("embed",)),),
                hardware=HardwareInfo(accelerator="cpu"),
                runtime=RuntimeInfo(gridserve="t", python="t", engine="t"),
            )
            now = time.time()
            self.membership.apply(Registered(capability, at=now, registered_at=now, capability_at=now, last_seen=now))
        self.transport = FakeTransport()
        self.transport.embed_answers = answers
        dispatcher = Dispatcher(CONFIG, self.membership, Identity.generate(), self.membership.metrics, self.transport)
        self.dispatch = EmbeddingDispatch(dispatcher, Integrity(self.membership))

    def decision(self) -> Decision:
        names = list(self.transport.embed_answers)
        candidates = tuple(
            Candidate(node_id=NodeId(n), rank=i, score=1 - i / 10, details=(), predicted_ttft_s=0.01)
            for i, n in enumerate(names)
        )
        request = ScheduleRequest(request_id=JOB.request_id, model=TINY_MODEL, prompt_tokens=2, max_tokens=0)
        return Decision(
            decision_id="d",
            request=request,
            requirements={},
            profile="t",
            created=0.0,
            chosen=candidates[0].node_id,
            candidates=candidates,
        )


def run(nodes: Nodes) -> Any:
    failed_over: list[tuple[str, str]] = []
    done = asyncio.run(nodes.dispatch.run(nodes.decision(), JOB, lambda n, why: failed_over.append((n, why))))
    return done, failed_over


def test_a_wrong_answer_is_an_incident_and_the_next_node_serves(writer: StoreWriter) -> None:
    good = unit_vectors()
    nodes = Nodes(writer, {"liar": signed(unit_vectors(2, 32)), "down": Unreachable("x"), "honest": signed(good)})
    done, failed_over = run(nodes)
    assert done.node_id == "honest" and np.array_equal(done.vectors, good)
    assert [node for node, _ in nodes.transport.embeds] == ["liar", "down", "honest"]
    assert [a.outcome for a in done.attempts] == ["failed", "failed", "served"]
    assert [n for n, _ in failed_over] == ["liar", "down"] and "vectors of 32 values" in failed_over[0][1]
    liar = nodes.membership.book.summary("liar", time.time())
    assert liar.state.value == "quarantined", "a severe integrity incident"
    assert nodes.membership.nodes[NodeId("down")].state == NodeState.DOWN
    assert nodes.membership.book.summary("honest", time.time()).state.value != "quarantined"


def test_a_request_every_node_refuses_as_invalid_is_a_400_naming_input(writer: StoreWriter) -> None:
    nodes = Nodes(writer, {"a": Refused(400, "too long"), "b": Refused(400, "too long")})
    with pytest.raises(APIError) as caught:
        run(nodes)
    assert (caught.value.status, caught.value.param) == (400, "input")


def test_nodes_that_all_fail_are_a_502(writer: StoreWriter) -> None:
    nodes = Nodes(writer, {"a": Refused(500, "engine"), "b": Refused(404, "not served")})
    with pytest.raises(APIError) as caught:
        run(nodes)
    assert caught.value.status == 502 and "every node tried failed to embed" in caught.value.message


# -- the sampled audit ------------------------------------------------------------------------------------------


def test_the_audit_passes_an_honest_answer_and_fails_another_models(tiny: TorchEngine) -> None:
    verifier = Verifier()
    job = EmbedRequest(request_id="emb-9", model=TINY_MODEL, inputs=("one", "two", "three"))
    honest = embed(tiny, *job.inputs)
    assert check_embeddings(verifier, "n", job, [0, 2], honest[[0, 2]]).ok
    other = build_tiny_model(seed=1)
    with torch.inference_mode():
        wrong = np.stack([mean_pooled(other.model, other.codec.encode_prompt(t)) for t in job.inputs])
    assert float(np.linalg.norm(wrong[1] - honest[1])) > AUDIT_TOLERANCE  # the premise
    result = check_embeddings(verifier, "n", job, [1], wrong[[1]])
    assert not result.ok and "embedding of input 1" in result.problems[0]


def test_what_a_node_says_of_its_precision_does_not_exempt_it_from_audit() -> None:
    auditor = cast(Auditor, SimpleNamespace(verifier=Verifier()))
    for dtype, quantization in (("float32", "none"), ("float16", "none"), ("int8", "q8_0")):
        offer = ModelOffer(name=TINY_MODEL, dtype=dtype, quantization=quantization, tasks=("embed",))
        assert verifiable(auditor, offer), (dtype, quantization)
    assert not verifiable(auditor, ModelOffer(name="llama-3-8b", tasks=("embed",))), "a model it cannot run"
    assert not verifiable(auditor, None)


# -- settlement -------------------------------------------------------------------------------------------------


def _settled(writer: StoreWriter, work: NodeWork) -> tuple[Any, Finished]:
    nodes = Nodes(writer, {"n": signed(unit_vectors())})
    end = Finished(
        decision=nodes.decision(),
        endpoint="embeddings",
        status="ok",
        error="",
        served_by="n",
        work=(work,),
        prompt_tokens=work.tokens,
        completion_tokens=0,
        duration_s=0.1,
        timing=Timing(ttft_s=None, itl_s=None),
    )
    return Settlement(ReceiptChecker(nodes.membership, writer), auditor=None).settle(end), end  # type: ignore[arg-type]


def test_an_embeddings_answer_is_settled_on_the_input_tokens_its_node_signed(writer: StoreWriter) -> None:
    """The node embedded 10 input tokens (its signed count) at $2 per million: one entry, receipted, $0.00002; and
    none of them counted as generated tokens."""
    settled, end = _settled(writer, NodeWork(NodeId("n"), outcome="ok", tokens=10, price_per_mtok=2.0, embedded=True))
    assert settled.problems == ()
    (entry,) = settled.entries
    assert (entry["node_id"], entry["tokens"], entry["status"]) == ("n", 10, "ok")
    assert entry["amount_usd"] == pytest.approx(10 * 2.0 / 1e6)
    metrics = GatewayMetrics()
    MetricsSubscriber(metrics).finished(Scope("embeddings"), end, settled)
    assert metrics.tokens.labels(node="n")._value.get() == 0.0
    assert metrics.requests.labels(endpoint="embeddings", status="ok")._value.get() == 1.0


def test_a_count_beyond_what_the_inputs_hold_is_paid_up_to_it_and_disputed(writer: StoreWriter) -> None:
    """No incident (a tokeniser the bound does not foresee must not get an honest node quarantined): the entry pays
    what the inputs can hold and says what the node claimed."""
    work = NodeWork(NodeId("n"), outcome="ok", tokens=10, price_per_mtok=2.0, embedded=True, claimed=40)
    settled, _ = _settled(writer, work)
    (entry,) = settled.entries
    assert (entry["tokens"], entry["claimed_tokens"], entry["status"]) == (10, 40, "disputed")
    assert "claims 40 input tokens" in entry["detail"] and entry["amount_usd"] == pytest.approx(10 * 2.0 / 1e6)
    assert len(settled.problems) == 1 and "claims 40 input tokens" in settled.problems[0]
