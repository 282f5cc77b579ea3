"""Embeddings from a real llama.cpp server (llama-cpp-python's, started with `--embedding true` on the Gemma GGUF)
behind an openai-upstream node offering the model for embedding only (`--tasks embed`)."""

from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import openai
import pytest
from openai import OpenAI
from tests.conftest import API_KEY
from tests.llama_support import SERVED, grid_in_front_of, llama_server

from gridserve.cli.grid import LocalGrid

pytestmark = pytest.mark.slow
TEXTS = ["The capital of France is Paris.", "Embeddings map text to vectors.", "The capital of France is Paris."]


@pytest.fixture(scope="module")
def llama_embedder(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    yield from llama_server(tmp_path_factory.mktemp("llama-embed"), "--embedding", "true")


@pytest.fixture(scope="module")
def embed_grid(llama_embedder: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalGrid]:
    yield from grid_in_front_of(llama_embedder, tmp_path_factory.mktemp("upstream-embed"), ("--tasks", "embed"))


def pooled(per_token: list[list[float]]) -> np.ndarray[Any, Any]:
    """What the node makes of a server that pools nothing (one vector per token): their mean, L2-normalised."""
    mean = np.asarray(per_token, dtype=np.float32).mean(axis=0)
    return mean / np.linalg.norm(mean)


def direct(server: str, text: str) -> tuple[list[list[float]], int]:
    """The server's own answer for one input (the node asks one input at a time): its per-token vectors, tokens."""
    answer = httpx.post(server + "/v1/embeddings", json={"model": "gemma-gguf", "input": [text]}, timeout=60).json()
    (entry,) = answer["data"]
    return entry["embedding"], answer["usage"]["prompt_tokens"]


def test_embeddings_through_the_gateway_are_the_llama_servers(embed_grid: LocalGrid, llama_embedder: str) -> None:
    answers = [direct(llama_embedder, text) for text in TEXTS]
    assert all(isinstance(v[0], list) for v, _ in answers), "llama-cpp-python's server pools nothing for Gemma"
    expected = np.stack([pooled(v) for v, _ in answers])
    client = OpenAI(base_url=embed_grid.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)
    reply = client.embeddings.create(model=SERVED, input=TEXTS, encoding_format="float")
    got = np.array([d.embedding for d in reply.data], dtype=np.float32)
    assert got.shape == (3, 640), "Gemma 3 270M's hidden size"
    assert np.allclose(got, expected, atol=1e-6), float(np.abs(got - expected).max())
    assert np.array_equal(got[0], got[2]) and not np.allclose(got[0], got[1])
    assert reply.usage.prompt_tokens == sum(tokens for _, tokens in answers) > 0
    by_sdk = client.embeddings.create(model=SERVED, input=TEXTS[:1])  # base64, decoded by the SDK
    assert np.allclose(np.array(by_sdk.data[0].embedding, dtype=np.float32), expected[0], atol=1e-6)


def test_an_embedding_only_node_gets_no_chat_request(embed_grid: LocalGrid) -> None:
    (node,) = embed_grid.nodes()
    assert node["models"][0]["tasks"] == ["embed"]
    client = OpenAI(base_url=embed_grid.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=SERVED, messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
    assert refused.value.param == "model"
    assert f"The model '{SERVED}' is served for embeddings only" in refused.value.message
