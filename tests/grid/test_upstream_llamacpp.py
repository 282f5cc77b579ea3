"""The openai-upstream engine in front of a real llama.cpp server serving the Gemma GGUF."""

from collections.abc import Iterator

import pytest
from openai import OpenAI
from tests.conftest import API_KEY, admin_get
from tests.llama_support import SERVED, grid_in_front_of
from tests.llama_support import llama_server as start_llama

from gridserve.cli.grid import LocalGrid

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    yield from start_llama(tmp_path_factory.mktemp("llama"), "--chat_format", "gemma")


@pytest.fixture(scope="module")
def upstream_grid(llama_server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalGrid]:
    yield from grid_in_front_of(llama_server, tmp_path_factory.mktemp("upstream"))


def _same_cache_state(direct: OpenAI) -> None:
    """llama-cpp-python reuses the KV of the longest prefix shared with the previous prompt and evaluates only
    the rest: the same prompt sent twice is computed in other batch shapes the second time, and near-tied
    logits can then pick another token. Each compared request is preceded by the same unrelated prompt, so
    both start from the same cache and compute alike."""
    direct.completions.create(model="gemma-gguf", prompt="Zebras", max_tokens=1, temperature=0)


def test_chat_through_gateway_equals_llama_server(upstream_grid: LocalGrid, llama_server: str) -> None:
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    via_grid = OpenAI(base_url=upstream_grid.url + "/v1", api_key=API_KEY, max_retries=0)
    direct = OpenAI(base_url=llama_server + "/v1", api_key="none", max_retries=0)
    _same_cache_state(direct)
    raw = via_grid.chat.completions.with_raw_response.create(
        model=SERVED, messages=messages, max_tokens=24, temperature=0
    )  # type: ignore[arg-type]
    _same_cache_state(direct)
    expected = direct.chat.completions.create(
        model="gemma-gguf",
        messages=messages,
        max_tokens=24,  # type: ignore[arg-type]
        temperature=0,
    )
    answer = raw.parse().choices[0].message.content
    assert answer == expected.choices[0].message.content and answer
    decision = admin_get(upstream_grid, f"/v1/decisions/{raw.headers['x-gridserve-decision']}").json()
    node = next(n for n in upstream_grid.nodes() if n["node_id"] == decision["served_by"])
    assert node["engine"] == "openai-upstream"


def test_streamed_completion_equals_llama_server(upstream_grid: LocalGrid, llama_server: str) -> None:
    prompt = "The three primary colours are"
    via_grid = OpenAI(base_url=upstream_grid.url + "/v1", api_key=API_KEY, max_retries=0)
    direct = OpenAI(base_url=llama_server + "/v1", api_key="none", max_retries=0)
    _same_cache_state(direct)
    stream = via_grid.completions.create(
        model=SERVED, prompt=prompt, max_tokens=16, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    _same_cache_state(direct)
    expected = direct.completions.create(model="gemma-gguf", prompt=prompt, max_tokens=16, temperature=0)
    assert text == expected.choices[0].text and text
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == expected.usage.completion_tokens  # type: ignore[union-attr]


def test_an_honest_upstream_node_is_never_accused(upstream_grid: LocalGrid) -> None:
    """Upstream servers do not name their tokens: receipts are still checked, counts only bounded."""
    client = OpenAI(base_url=upstream_grid.url + "/v1", api_key=API_KEY, max_retries=0)
    for i in range(3):
        client.chat.completions.create(
            model=SERVED, messages=[{"role": "user", "content": f"Count to {i + 3}."}], max_tokens=12, temperature=0
        )
    node = upstream_grid.nodes()[0]
    assert admin_get(upstream_grid, f"/admin/incidents?node_id={node['node_id']}").json()["incidents"] == []
    totals = admin_get(upstream_grid, "/admin/settlement").json()["totals"]
    assert totals and all(t["disputed"] == 0 and t["tokens"] > 0 for t in totals)


def test_an_extension_the_upstream_server_does_not_honour_is_a_400_naming_it(upstream_grid: LocalGrid) -> None:
    """llama-cpp-python's server is not among those known to honour vLLM's extensions (its /v1/models says
    owned_by "me"): the node offers none, and the gateway refuses such a request rather than serve it without."""
    import openai

    client = OpenAI(base_url=upstream_grid.url + "/v1", api_key=API_KEY, max_retries=0)
    (node,) = upstream_grid.nodes()
    assert all(not offer.get("features") for offer in node["models"]), node["models"]
    for extension in ({"ignore_eos": True}, {"min_tokens": 4}, {"top_k": 5}, {"repetition_penalty": 1.2}):
        with pytest.raises(openai.BadRequestError) as refused:
            client.completions.create(model=SERVED, prompt="Hi", max_tokens=8, extra_body=extension)
        body = refused.value.body
        assert isinstance(body, dict) and (body["param"], body["code"]) == (
            next(iter(extension)),
            "unsupported_parameter",
        )
        assert "no live node serving it honours" in body["message"]
