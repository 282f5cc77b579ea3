"""Schemathesis against the gateway's own OpenAPI document (issue 8 item 5): every public and admin operation,
generated from `/openapi.json` of a running grid, gets no server error and an answer that matches the document
(status code, content type, headers, body schema); without the right token every protected operation is 401."""

import itertools
import re
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import APIOperation, Case, GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.result import Ok
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from starlette.routing import Route
from tests.conftest import ADMIN, API_KEY, make_grid

from gridserve.cli.grid import LocalGrid
from gridserve.engines.tiny import TINY_MODEL
from gridserve.gateway.api.hotpath import HEARTBEAT, HotPath
from gridserve.gateway.api.hotpath import ROUTES as hot_routes
from gridserve.gateway.app import Gateway, build_gateway_app
from gridserve.gateway.config import GatewayConfig
from gridserve.store import Store
from gridserve.trust import Identity

SEED = 20_260_805
EXAMPLES = 25
"""Per operation and test (fixed, with a fixed seed: the same requests on every run)."""
SERVED_EXAMPLES = 30
"""Completions on the tiny model, which the grid serves (they run a real generation)."""
MAX_GENERATED_TOKENS = 8
"""Completions on the tiny model are capped at this many tokens: generation time, not a property under test."""
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    negative_data_rejection,
]
FUZZ = settings(
    max_examples=EXAMPLES,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
)
TOKENS = {"apiKey": API_KEY, "adminToken": ADMIN}


@pytest.fixture(scope="module")
def fuzz_grid(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalGrid]:
    grid = make_grid(Path(tmp_path_factory.mktemp("fuzz-api")), ["tiny", "emulated:rtx4090"], threads=1)
    try:
        grid.start(timeout_s=120)
        yield grid
    finally:
        grid.stop()


@pytest.fixture(scope="module")
def api_schema(fuzz_grid: LocalGrid) -> schemathesis.BaseSchema:
    # The tests send the credentials themselves (and, on purpose, wrong ones): no generated Authorization header.
    generation = {"deterministic": True, "with-security-parameters": False}
    config = schemathesis.Config.from_dict({"seed": SEED, "generation": generation})
    return schemathesis.openapi.from_url(fuzz_grid.url + "/openapi.json", config=config)


def operations(schema: schemathesis.BaseSchema, path: str = "") -> list[APIOperation]:
    found = []
    for result in schema.get_all_operations():
        assert isinstance(result, Ok), f"the document has an invalid operation: {result}"
        if re.search(path, result.ok().path):
            found.append(result.ok())
    assert found
    return found


def fuzz(
    subtests: pytest.Subtests,
    targets: list[APIOperation],
    test: Callable[[Case], None],
    *,
    examples: int = EXAMPLES,
    modes: tuple[GenerationMode, ...] = (GenerationMode.POSITIVE, GenerationMode.NEGATIVE),
) -> None:
    """Run `test` on `examples` generated cases of each operation (valid and invalid ones), one subtest each."""
    for operation in targets:
        cases = st.one_of([operation.as_strategy(generation_mode=mode) for mode in modes])

        @settings(FUZZ, max_examples=examples)
        @given(case=cases)
        def run(case: Case) -> None:
            test(case)

        with subtests.test(msg=operation.label):
            run()


def schemes(case: Case) -> set[str]:
    """The security schemes the document says this operation needs."""
    return {name for requirement in case.operation.definition.raw.get("security", []) for name in requirement}


def credentials(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token is not None else {}


def call(case: Case, grid: LocalGrid, token: str | None) -> Any:
    return case.call_and_validate(base_url=grid.url, headers=credentials(token), checks=CHECKS, timeout=60)


def test_every_operation_with_its_credentials(
    api_schema: schemathesis.BaseSchema, fuzz_grid: LocalGrid, subtests: pytest.Subtests
) -> None:
    def test(case: Case) -> None:
        needed = schemes(case)
        response = call(case, fuzz_grid, TOKENS[min(needed)] if needed else None)
        assert response.status_code != 401 or not needed, f"{case.operation.label}: the documented token was refused"

    fuzz(subtests, operations(api_schema), test)


def test_protected_operations_refuse_other_credentials(
    api_schema: schemathesis.BaseSchema, fuzz_grid: LocalGrid, subtests: pytest.Subtests
) -> None:
    """Valid requests without the right token (none, a wrong one, the other kind): 401, in the documented shape."""

    def test(case: Case) -> None:
        needed = schemes(case)
        other = API_KEY if "adminToken" in needed else ADMIN  # an API key on an admin route, and the reverse
        for token in (None, "wrong-token", other):
            response = call(case, fuzz_grid, token)
            assert response.status_code == 401, f"{case.operation.label}: {response.status_code} with {token!r}"

    protected = [op for op in operations(api_schema) if op.definition.raw.get("security")]
    fuzz(subtests, protected, test, examples=4, modes=(GenerationMode.POSITIVE,))


def cap_generation(body: dict[str, Any], stream: bool) -> None:
    """Aim a generated completion body at the served tiny model, with a short answer; stream it if the body does
    not say (half of them: generated bodies mostly leave `stream` out)."""
    body["model"] = TINY_MODEL
    for key in ("max_tokens", "max_completion_tokens"):
        if isinstance(body.get(key), int | float):  # (an integral float is an integer to JSON Schema)
            body[key] = 1 + int(body[key]) % MAX_GENERATED_TOKENS
    if body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
        body["max_tokens"] = MAX_GENERATED_TOKENS
    body.setdefault("stream", stream)


def test_completions_on_a_served_model(
    api_schema: schemathesis.BaseSchema, fuzz_grid: LocalGrid, subtests: pytest.Subtests
) -> None:
    """Valid bodies aimed at the model the grid serves: real generations, streamed or not, checked whole."""

    served: Counter[tuple[str, bool]] = Counter()
    turn = itertools.count()

    def test(case: Case) -> None:
        assert isinstance(case.body, dict)
        cap_generation(case.body, stream=next(turn) % 2 == 0)
        if call(case, fuzz_grid, API_KEY).status_code == 200:
            served[case.operation.path, bool(case.body["stream"])] += 1

    targets = operations(api_schema, r"^/v1/(chat/)?completions$")
    fuzz(subtests, targets, test, examples=SERVED_EXAMPLES, modes=(GenerationMode.POSITIVE,))
    for operation in targets:  # the generated bodies did reach the model, whole and streamed
        assert served[operation.path, False] >= 3 and served[operation.path, True] >= 3, served


def served_routes() -> set[tuple[str, str]]:
    """(method, path) of every route a gateway serves: its FastAPI routes and the hot path's."""
    store = Store("sqlite://")
    store.migrate()
    gateway = Gateway(GatewayConfig(api_keys=(API_KEY,), admin_token=ADMIN), store, Identity.generate())
    try:
        app = build_gateway_app(gateway)
        assert isinstance(app, HotPath) and isinstance(app.app, FastAPI)
        found = {(m.lower(), r.path) for r in app.app.routes if isinstance(r, Route) for m in r.methods or ()}
    finally:
        gateway.writer.close()
        store.close()
    hot = {("post", path) for path in (*hot_routes, HEARTBEAT)}
    return {(m, p) for m, p in found if m != "head" and p != "/openapi.json"} | hot


def test_every_served_route_is_documented(api_schema: schemathesis.BaseSchema) -> None:
    documented = {(method, path) for path, item in api_schema.raw_schema["paths"].items() for method in item}
    assert served_routes() == documented


def test_document_covers_the_hot_path_and_admin_routes(api_schema: schemathesis.BaseSchema) -> None:
    raw = api_schema.raw_schema
    for path in ("/v1/chat/completions", "/v1/completions", "/nodes/heartbeat", "/nodes/register", "/admin/nodes"):
        assert path in raw["paths"], path
    chat = raw["paths"]["/v1/chat/completions"]["post"]
    assert chat["security"] == [{"apiKey": []}]
    assert {"200", "400", "401", "404", "413"} <= set(chat["responses"])
    assert "text/event-stream" in chat["responses"]["200"]["content"]
    assert raw["paths"]["/admin/nodes"]["get"]["security"] == [{"adminToken": []}]
    assert not any("422" in op["responses"] for item in raw["paths"].values() for op in item.values())
