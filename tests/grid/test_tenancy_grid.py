"""API keys with limits on a running grid (the tiny model, priced at 1 USD per million tokens), through the official
openai SDK and httpx: keys are made, listed and revoked through the admin API and the CLI; a key over its requests,
tokens or concurrency limit gets OpenAI's 429 with Retry-After and x-ratelimit-* headers; a budget stops a key
within one request in flight; a key refused a model or a tier gets a 403; a revoked key is refused by another
gateway on the same PostgreSQL database within a second, and a requests limit holds across the two."""

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI
from prometheus_client.parser import text_string_to_metric_families
from tests.conftest import ADMIN, API_KEY, make_grid, two_gateways_on_pg

from gridserve.cli.grid import LocalGrid
from gridserve.engines.tiny import TINY_MODEL

PRICE_PER_MTOK = 1.0
HELLO: Any = [{"role": "user", "content": "Hello there"}]


@pytest.fixture(scope="module")
def grid(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalGrid]:
    g = make_grid(
        tmp_path_factory.mktemp("tenancy"),
        ["tiny"],
        threads=1,
        extra_node_args=["--price", str(PRICE_PER_MTOK)],
        extra_gateway_args=["--vetting-checks", "0", "--canary-interval", "0"],
    )
    try:
        g.start(timeout_s=120)
        yield g
    finally:
        g.stop()


def admin(grid: LocalGrid, method: str, path: str, body: Any = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {ADMIN}"}
    return httpx.request(method, grid.url + path, json=body, headers=headers, timeout=10)


def new_key(grid: LocalGrid, **policy: Any) -> dict[str, Any]:
    made = admin(grid, "POST", "/admin/keys", {"name": f"test-{time.monotonic_ns()}", **policy})
    assert made.status_code == 200, made.text
    return made.json()  # type: ignore[no-any-return]


def fresh_minute(needed_s: float = 15.0) -> None:
    """Wait, if need be, for a minute window (the limits') with `needed_s` left in it: a test's requests then count
    in one window."""
    left = 60.0 - time.time() % 60.0
    if left < needed_s:
        time.sleep(left + 0.05)


def client(grid: LocalGrid, key: str) -> OpenAI:
    return OpenAI(base_url=grid.url + "/v1", api_key=key, max_retries=0, timeout=60)


def ask(grid: LocalGrid, key: str, max_tokens: int = 4, **extra: Any) -> httpx.Response:
    body = {"model": TINY_MODEL, "messages": HELLO, "max_tokens": max_tokens, "temperature": 0, **extra}
    return httpx.post(
        grid.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=60
    )


def test_a_key_is_shown_once_listed_without_secrets_and_works(grid: LocalGrid) -> None:
    made = new_key(grid, rpm=100, models=[TINY_MODEL], priority="interactive")
    assert made["key"].startswith("gsk_") and made["rpm"] == 100 and made["priority"] == "interactive"
    listed = {k["id"]: k for k in admin(grid, "GET", "/admin/keys").json()["keys"]}
    assert made["id"] in listed and "key" not in listed[made["id"]] and "digest" not in listed[made["id"]]
    reply = client(grid, made["key"]).chat.completions.with_raw_response.create(
        model=TINY_MODEL, messages=HELLO, max_tokens=4
    )
    assert reply.headers["x-ratelimit-limit-requests"] == "100"
    assert reply.headers["x-ratelimit-remaining-requests"] == "99"
    assert reply.parse().choices[0].message.content is not None


def test_the_static_key_still_works_and_a_wrong_key_is_refused(grid: LocalGrid) -> None:
    assert ask(grid, API_KEY).status_code == 200
    refused = ask(grid, "gsk_000000000000.not-a-key")
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"


def test_over_the_requests_limit_is_a_429_with_retry_after(grid: LocalGrid) -> None:
    made = new_key(grid, rpm=3)
    fresh_minute()
    codes = [ask(grid, made["key"]).status_code for _ in range(3)]
    assert codes == [200, 200, 200]
    with pytest.raises(openai.RateLimitError) as caught:
        client(grid, made["key"]).chat.completions.create(model=TINY_MODEL, messages=HELLO, max_tokens=4)
    response = caught.value.response
    assert 1 <= int(response.headers["retry-after"]) <= 60
    assert response.headers["x-ratelimit-remaining-requests"] == "0"
    assert response.headers["x-ratelimit-limit-requests"] == "3"
    assert response.json()["error"]["code"] == "rate_limit_exceeded"


def test_over_the_tokens_limit_is_a_429(grid: LocalGrid) -> None:
    made = new_key(grid, tpm=1000)
    fresh_minute()
    first = ask(grid, made["key"], max_tokens=10, ignore_eos=True)
    assert first.status_code == 200, first.text
    used = first.json()["usage"]["total_tokens"]
    second = ask(grid, made["key"], max_tokens=1000 - used)  # its prompt and max_tokens do not fit what is left
    assert second.status_code == 429 and "tokens per minute" in second.json()["error"]["message"]
    assert int(second.headers["retry-after"]) >= 1 and second.headers["x-ratelimit-limit-tokens"] == "1000"
    assert int(second.headers["x-ratelimit-remaining-tokens"]) == 1000 - used  # the reservation became the use
    too_big = ask(grid, made["key"], max_tokens=2000)
    assert too_big.status_code == 429 and "this request alone needs" in too_big.json()["error"]["message"]
    assert ask(grid, made["key"], max_tokens=10).status_code == 200


def test_over_the_concurrency_limit_is_a_429_until_the_first_ends(grid: LocalGrid) -> None:
    made = new_key(grid, max_concurrency=1)
    sdk = client(grid, made["key"])
    stream = sdk.chat.completions.create(  # thousands of tokens: under way until the client closes it
        model=TINY_MODEL, messages=HELLO, max_tokens=3000, stream=True, extra_body={"ignore_eos": True}
    )
    next(iter(stream))
    second = ask(grid, made["key"])
    assert second.status_code == 429 and second.json()["error"]["code"] == "concurrency_limit_exceeded"
    assert second.headers["retry-after"] == "1"
    stream.close()  # the client leaves: the request ends, and its place in flight frees
    deadline = time.monotonic() + 10.0
    while (third := ask(grid, made["key"])).status_code == 429:
        assert time.monotonic() < deadline, "the closed stream still held the key's place after 10 s"
        time.sleep(0.05)
    assert third.status_code == 200


def spent(grid: LocalGrid, key_id: str) -> dict[str, Any]:
    return {k["id"]: k for k in admin(grid, "GET", "/admin/usage").json()["keys"]}[key_id]  # type: ignore[no-any-return]


def test_a_budget_stops_a_key_within_one_request_of_its_limit(grid: LocalGrid) -> None:
    probe = new_key(grid)
    assert ask(grid, probe["key"], max_tokens=10, ignore_eos=True).status_code == 200
    cost_of_one = spent(grid, probe["id"])["cluster"]["spent_usd"]  # the node's settled price of one answer
    assert cost_of_one > 0
    budget = 3.5 * cost_of_one
    made = new_key(grid, budget_usd=budget)
    codes = [ask(grid, made["key"], max_tokens=10, ignore_eos=True).status_code for _ in range(6)]
    assert codes == [200] * 4 + [429] * 2  # the fourth starts with 3 answers spent, under the budget
    refused = ask(grid, made["key"])
    assert refused.json()["error"]["code"] == "insufficient_quota" and "retry-after" not in refused.headers
    usage = spent(grid, made["id"])
    assert budget <= usage["cluster"]["spent_usd"] <= budget + cost_of_one * 1.001
    assert usage["served_here"]["requests"] == 4 and usage["served_here"]["refused"] == {"insufficient_quota": 3}


def test_a_key_may_be_limited_to_models_and_tiers(grid: LocalGrid) -> None:
    made = new_key(grid, models=["llama-3-8b"], tiers=["batch"])
    wrong_model = ask(grid, made["key"])
    assert wrong_model.status_code == 403 and wrong_model.json()["error"]["param"] == "model"
    other = new_key(grid, tiers=["batch"])
    wrong_tier = ask(grid, other["key"])
    assert wrong_tier.status_code == 403 and wrong_tier.json()["error"]["param"] == "gridserve.tier"
    assert ask(grid, other["key"], gridserve={"tier": "batch"}).status_code == 200


def test_a_revoked_key_is_refused(grid: LocalGrid) -> None:
    made = new_key(grid)
    assert ask(grid, made["key"]).status_code == 200
    gone = admin(grid, "DELETE", f"/admin/keys/{made['id']}")
    assert gone.status_code == 200 and gone.json()["status"] == "revoked"
    deadline = time.monotonic() + 2.0
    while ask(grid, made["key"]).status_code != 401:
        assert time.monotonic() < deadline, "the revoked key was still accepted after 2 s"
        time.sleep(0.05)
    assert admin(grid, "DELETE", "/admin/keys/nosuchkey").status_code == 404


def test_a_rotated_key_keeps_its_id_and_limits_and_its_old_secret_stops_working(grid: LocalGrid) -> None:
    made = new_key(grid, rpm=5)
    fresh_minute()
    assert ask(grid, made["key"]).status_code == 200
    rotated = admin(grid, "POST", f"/admin/keys/{made['id']}/rotate")
    assert rotated.status_code == 200, rotated.text
    new = rotated.json()
    assert (new["id"], new["rpm"]) == (made["id"], 5) and new["key"] != made["key"]
    assert ask(grid, made["key"]).status_code == 401
    answered = ask(grid, new["key"])
    assert answered.status_code == 200 and answered.headers["x-ratelimit-remaining-requests"] == "3"  # counts stay
    assert admin(grid, "DELETE", f"/admin/keys/{made['id']}").status_code == 200
    assert admin(grid, "POST", f"/admin/keys/{made['id']}/rotate").status_code == 404  # a revoked key stays so


def test_bad_key_requests_are_400s_naming_the_field(grid: LocalGrid) -> None:
    for body, param in (({}, "name"), ({"name": "x", "rpm": 0}, "rpm"), ({"name": "x", "priority": "vip"}, "priority")):
        refused = admin(grid, "POST", "/admin/keys", body)
        assert refused.status_code == 400 and refused.json()["error"]["param"] == param, refused.text
    assert admin(grid, "POST", "/admin/keys", {"name": "x", "colour": "red"}).json()["error"]["param"] == "colour"


def test_usage_is_in_metrics_per_key(grid: LocalGrid) -> None:
    """/metrics names the ten keys with the most requests and sums the rest as `other` (the keys of this module's
    earlier tests are there too), and agrees with /admin/usage."""
    made = new_key(grid)
    assert all(ask(grid, made["key"]).status_code == 200 for _ in range(3))
    served = {k["id"]: k["served_here"]["requests"] for k in admin(grid, "GET", "/admin/usage").json()["keys"]}
    served = {key: n for key, n in served.items() if n}
    text = httpx.get(grid.url + "/metrics", timeout=10).text
    shown = {
        s.labels["key"]: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "gridserve_key_requests_total"
    }
    named = {key: n for key, n in shown.items() if key != "other"}
    assert len(named) == min(10, len(served)) and all(served[key] == n for key, n in named.items()), (named, served)
    assert sum(shown.values()) == sum(served.values())
    assert served[made["id"]] == 3
    assert made["id"] in named or min(named.values()) >= 3, "a key outside the top ten has no more requests than they"


def test_the_cli_makes_lists_and_revokes_keys(grid: LocalGrid) -> None:
    def cli(*args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "gridserve", "keys", *args, "--gateway", grid.url, "--admin-token", ADMIN],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    made = cli("create", "cli-key", "--rpm", "7", "--model", TINY_MODEL, "--json")
    import json

    key = json.loads(made)
    assert key["rpm"] == 7 and key["models"] == [TINY_MODEL]
    assert ask(grid, key["key"]).status_code == 200
    assert key["id"] in cli("list")
    new_secret = cli("rotate", key["id"]).strip().splitlines()[-1]
    assert new_secret.startswith("gsk_") and new_secret != key["key"]
    assert ask(grid, new_secret).status_code == 200 and ask(grid, key["key"]).status_code == 401
    assert "revoked" in cli("revoke", key["id"])


# -- two gateways on one database ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalGrid, LocalGrid]]:
    """Gateways A and B on one PostgreSQL schema, with one tiny node that registered with A (B adopts it)."""
    with two_gateways_on_pg(Path(tmp_path_factory.mktemp("tenancy-pair")), ("--vetting-checks", "0")) as pair:
        yield pair


def test_a_key_rotated_or_revoked_on_one_gateway_is_refused_by_the_other_within_a_second(
    pair: tuple[LocalGrid, LocalGrid],
) -> None:
    a, b = pair
    made = new_key(a)
    deadline = time.monotonic() + 5.0
    while ask(b, made["key"]).status_code != 200:  # B learns of the new key
        assert time.monotonic() < deadline
        time.sleep(0.05)
    rotated = admin(a, "POST", f"/admin/keys/{made['id']}/rotate").json()["key"]
    rotated_at = time.monotonic()
    while ask(b, made["key"]).status_code != 401:
        assert time.monotonic() - rotated_at < 1.0, "B still accepted the old secret a second after the rotation"
        time.sleep(0.02)
    assert ask(b, rotated).status_code == 200
    assert admin(a, "DELETE", f"/admin/keys/{made['id']}").status_code == 200
    revoked_at = time.monotonic()
    while ask(b, rotated).status_code != 401:
        assert time.monotonic() - revoked_at < 1.0, "B still accepted the key a second after its revocation"
        time.sleep(0.02)


def test_a_requests_limit_holds_across_gateways(pair: tuple[LocalGrid, LocalGrid]) -> None:
    a, b = pair
    made = new_key(a, rpm=4, models=[TINY_MODEL])
    deadline = time.monotonic() + 10.0
    while (probe := ask(b, made["key"], model="no-such-model")).status_code == 401:  # B learns of the key
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert probe.status_code == 403  # refused before any limit counts it
    fresh_minute()
    assert [ask(g, made["key"]).status_code for g in (a, b, a, b)] == [200] * 4
    for g in (a, b):  # each gateway learns the other's counts
        while spent(g, made["id"])["cluster"]["requests_this_minute"] < 4:
            assert time.monotonic() < deadline + 20.0
            time.sleep(0.05)
    refused = [ask(g, made["key"]) for g in (a, b)]
    assert [r.status_code for r in refused] == [429, 429], [r.text for r in refused]


def test_a_stored_response_is_its_keys_only(grid: LocalGrid) -> None:
    mine, theirs = (client(grid, new_key(grid)["key"]) for _ in range(2))
    made = mine.responses.create(model=TINY_MODEL, input="The sea is", max_output_tokens=4, temperature=0)
    assert mine.responses.retrieve(made.id).id == made.id
    with pytest.raises(openai.NotFoundError):
        theirs.responses.retrieve(made.id)
    with pytest.raises(openai.NotFoundError):  # nor continued by another key
        theirs.responses.create(model=TINY_MODEL, input="And?", previous_response_id=made.id, max_output_tokens=4)
    with pytest.raises(openai.NotFoundError):
        theirs.responses.delete(made.id)
    mine.responses.delete(made.id)
    with pytest.raises(openai.NotFoundError):
        mine.responses.retrieve(made.id)


def test_embeddings_count_against_a_keys_limits(grid: LocalGrid) -> None:
    made = new_key(grid, rpm=2)
    sdk = client(grid, made["key"])
    fresh_minute()
    first = sdk.embeddings.with_raw_response.create(model=TINY_MODEL, input=["one", "two"])
    assert first.headers["x-ratelimit-remaining-requests"] == "1" and len(first.parse().data) == 2
    sdk.embeddings.create(model=TINY_MODEL, input="three")
    with pytest.raises(openai.RateLimitError) as caught:
        sdk.embeddings.create(model=TINY_MODEL, input="four")
    assert int(caught.value.response.headers["retry-after"]) >= 1
    served = spent(grid, made["id"])["served_here"]
    assert served["requests"] == 2 and served["prompt_tokens"] > 0 and served["refused"] == {"rate_limit_exceeded": 1}


# -- the fair queue on a node with batch slots ---------------------------------------------------------------------

EMULATED = "llama-3-8b"


@pytest.fixture(scope="module")
def slotted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalGrid]:
    """One emulated RTX 4090 (8 batch slots, later requests wait on the node in order), 1 s to a first token."""
    g = make_grid(
        tmp_path_factory.mktemp("tenancy-slots"),
        ["emulated:rtx4090"],
        threads=1,
        extra_node_args=["--fifo-slots", "--fixed-ttft-ms", "1000", "--fixed-itl-ms", "5"],
        extra_gateway_args=["--vetting-checks", "0", "--canary-interval", "0"],
    )
    try:
        g.start(timeout_s=120)
        yield g
    finally:
        g.stop()


def decision_of(grid: LocalGrid, reply: httpx.Response) -> dict[str, Any]:
    found = admin(grid, "GET", f"/v1/decisions/{reply.headers['x-gridserve-decision']}")
    assert found.status_code == 200, found.text
    return found.json()  # type: ignore[no-any-return]


def test_a_batch_flood_waits_at_the_gateway_and_an_interactive_request_does_not(slotted: LocalGrid) -> None:
    """Twelve batch requests at once: six start (75% of 8 slots), six wait at the gateway until one of the first
    finishes (1 s to a first token); an interactive request sent meanwhile starts at once on the room kept for it."""
    batch, interactive = new_key(slotted, priority="batch"), new_key(slotted, priority="interactive")
    go = threading.Barrier(12)
    body = {"model": EMULATED, "messages": HELLO, "max_tokens": 4, "temperature": 0}

    def one(http: httpx.Client) -> httpx.Response:
        go.wait(timeout=30)  # the flood leaves together, from one client made beforehand
        return http.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {batch['key']}"})

    with httpx.Client(base_url=slotted.url, timeout=60) as http, ThreadPoolExecutor(max_workers=12) as pool:
        assert http.get("/health").status_code == 200
        flood = [pool.submit(one, http) for _ in range(12)]
        time.sleep(0.5)  # the flood has arrived: six in flight for a second, six waiting
        urgent = ask(slotted, interactive["key"], 4, model=EMULATED)
        replies = [f.result() for f in flood]
    assert urgent.status_code == 200 and all(r.status_code == 200 for r in replies)
    decisions = sorted((decision_of(slotted, r) for r in replies), key=lambda d: float(d["queue_wait_s"]))
    waits = [d["queue_wait_s"] for d in decisions]
    assert waits[:6] == [0.0] * 6 and min(waits[6:]) > 0, waits
    # the second six started only once the first of the first six was done (1 s to its first token)
    first_start = min(float(d["created"]) for d in decisions[:6])
    assert min(float(d["created"]) for d in decisions[6:]) >= first_start + 0.9, [d["created"] for d in decisions]
    assert decision_of(slotted, urgent)["queue_wait_s"] == 0.0  # room kept for it
    assert urgent.elapsed.total_seconds() < 0.75 * max(r.elapsed.total_seconds() for r in replies)


def test_a_budget_holds_across_gateways(pair: tuple[LocalGrid, LocalGrid]) -> None:
    """Requests on a budgeted key alternate between the two gateways as fast as they answer (each learns the other's
    spend a sync later): they spend from leases the store grants, so together they stop within one request each
    (what each had in flight when the budget ran out) of the budget, and spend at least all but the last request's
    worth of it."""
    a, b = pair
    probe = new_key(a)
    assert ask(a, probe["key"], max_tokens=10, ignore_eos=True).status_code == 200
    cost_of_one = spent(a, probe["id"])["cluster"]["spent_usd"]
    assert cost_of_one > 0
    budget = 5.5 * cost_of_one
    made = new_key(a, budget_usd=budget)
    deadline = time.monotonic() + 10.0
    while ask(b, made["key"], model="no-such-model").status_code == 401:  # B learns of the key
        assert time.monotonic() < deadline
        time.sleep(0.05)
    codes = [ask(g, made["key"], max_tokens=10, ignore_eos=True).status_code for _ in range(6) for g in (a, b)]
    assert codes.count(200) >= 5 and set(codes) <= {200, 429}, codes
    assert codes[-2:] == [429, 429], codes  # both gateways stopped
    time.sleep(0.5)  # both have written what they spent
    total = spent(a, made["id"])["cluster"]["spent_usd"]
    assert budget - cost_of_one <= total <= budget + 2 * cost_of_one * 1.001, (total, budget, cost_of_one)


# -- the queue on a grid shared by two gateways ----------------------------------------------------------------------
SHARED_TTFT_S = 3.0


@pytest.fixture(scope="module")
def slotted_pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalGrid, LocalGrid]]:
    """Gateways A and B on one PostgreSQL schema and one emulated RTX 4090 (8 batch slots, later requests wait on the
    node in order, 3 s to a first token) that heartbeats to both."""
    node = ("--fifo-slots", "--fixed-ttft-ms", str(int(SHARED_TTFT_S * 1000)), "--fixed-itl-ms", "5")
    tmp = Path(tmp_path_factory.mktemp("tenancy-shared-slots"))
    with two_gateways_on_pg(tmp, ("--vetting-checks", "0"), "emulated:rtx4090", node) as pair:
        yield pair


def test_a_batch_flood_through_one_gateway_holds_back_batch_but_not_interactive_on_another(
    slotted_pair: tuple[LocalGrid, LocalGrid],
) -> None:
    """A fills its batch share of the node (6 of 8 slots, two more waiting at A). B learns of them from the node's
    heartbeats: its own batch requests wait at B for the slots, and its interactive request starts at once on one
    of the two left free. Counting only its own requests, B would send its batch requests to the node too, and the
    interactive one would wait there behind them for a slot (another 3 s)."""
    a, b = slotted_pair
    batch, interactive = new_key(a, priority="batch"), new_key(a, priority="interactive")
    deadline = time.monotonic() + 10.0
    while ask(b, interactive["key"], model="no-such-model").status_code == 401:  # B learns of the keys
        assert time.monotonic() < deadline
        time.sleep(0.05)
    with ThreadPoolExecutor(max_workers=11) as pool:
        flood = [pool.submit(ask, a, batch["key"], 4, model=EMULATED) for _ in range(8)]
        node_id = a.nodes()[0]["node_id"]
        seen = 0
        while seen < 6:  # a heartbeat since the flood began has told B
            assert time.monotonic() < deadline + SHARED_TTFT_S, "B never heard of A's requests"
            found = [n for n in admin(b, "GET", "/admin/nodes").json()["nodes"] if n["node_id"] == node_id]
            telemetry = found[0]["telemetry"] if found else None
            seen = (telemetry["active_requests"] + telemetry["queue_depth"]) if telemetry else 0
            time.sleep(0.05)
        time.sleep(0.3)  # B's slot count is at most 0.25 s old
        late = [pool.submit(ask, b, batch["key"], 4, model=EMULATED) for _ in range(2)]
        time.sleep(0.2)
        urgent = ask(b, interactive["key"], 4, model=EMULATED)
        replies = [f.result() for f in flood + late]
    assert urgent.status_code == 200 and all(r.status_code == 200 for r in replies), [r.text for r in replies]
    assert all(decision_of(b, r)["queue_wait_s"] > 0.5 for r in replies[-2:]), "B's batch requests waited at B"
    decided = decision_of(b, urgent)
    assert decided["queue_wait_s"] == 0.0
    assert (decided.get("timing") or {}).get("queue_s", 0.0) < 0.5, decided.get("timing")  # no wait on the node
    assert urgent.elapsed.total_seconds() < 1.5 * SHARED_TTFT_S, urgent.elapsed
