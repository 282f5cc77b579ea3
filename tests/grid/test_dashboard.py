"""The operator dashboard in headless Chromium (Debian's package, driven by playwright; no browser download)
against a real grid: nodes, traffic charts, incidents, decision explorer, doctor and API keys (usage; create,
rotate, revoke), with screenshots kept as test artifacts (`test-artifacts/dashboard/`, or under
$GRIDSERVE_TEST_ARTIFACTS)."""

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai import OpenAI
from playwright.sync_api import Dialog, Page, expect, sync_playwright
from tests.conftest import ADMIN, API_KEY, make_grid

from gridserve.catalog.hardware import HARDWARE
from gridserve.catalog.models import TINY_MODEL
from gridserve.cli.grid import LocalGrid
from gridserve.diagnostics.doctor import Cause

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
EMULATED_MODEL = "llama-3-8b"
REASON = "dashboard test: receipts <b>disputed</b> & audited"
"""Holds markup on purpose: the page must show it as text."""
TINY_REQUESTS = 3
WAIT_MS = 20_000
NEW_KEY_NAME = "dashboard test key"

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason=f"no Chromium at {CHROMIUM} (`make` installs it)")


def artifacts_dir() -> Path:
    base = os.environ.get("GRIDSERVE_TEST_ARTIFACTS") or str(Path(__file__).resolve().parents[2] / "test-artifacts")
    out = Path(base) / "dashboard"
    out.mkdir(parents=True, exist_ok=True)
    return out


@dataclass
class Served:
    decision_id: str
    node_id: str


@dataclass
class Scene:
    grid: LocalGrid
    served: list[Served]
    quarantined: str
    nodes: dict[str, dict[str, Any]]
    """/admin/nodes by node id."""

    @property
    def node_ids(self) -> list[str]:
        return list(self.nodes)

    def hardware(self, engine: str) -> str:
        """The card of the nodes running `engine` (all alike here)."""
        (card,) = {n["hardware"]["accelerator"] for n in self.nodes.values() if n["engine"] == engine}
        return str(card)


def complete(client: OpenAI, model: str, prompt: str) -> Served:
    raw = client.completions.with_raw_response.create(
        model=model, prompt=prompt, max_tokens=8, temperature=0, extra_body={"gridserve": {"hedge": False}}
    )
    assert raw.parse().choices[0].text is not None
    return Served(raw.headers["x-gridserve-decision"], raw.headers["x-gridserve-node"])


@pytest.fixture(scope="module")
def scene(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scene]:
    """A grid (two tiny nodes, one emulated RTX 4090) that served a few completions, one node quarantined."""
    grid = make_grid(tmp_path_factory.mktemp("dashboard-grid"), ["tiny", "tiny", "emulated:rtx4090"], threads=1)
    try:
        grid.start(timeout_s=120)
        client = OpenAI(base_url=grid.url + "/v1", api_key=API_KEY, max_retries=0)
        served = [complete(client, TINY_MODEL, f"The grid serves request {i}") for i in range(TINY_REQUESTS)]
        served.append(complete(client, EMULATED_MODEL, "An emulated card answers"))
        nodes = {n["node_id"]: n for n in grid.nodes()}
        tiny = sorted(k for k, n in nodes.items() if n["engine"] == "tiny")
        resp = httpx.post(
            f"{grid.url}/admin/nodes/{tiny[0]}/quarantine",
            json={"reason": REASON},
            headers={"Authorization": f"Bearer {ADMIN}"},
            timeout=10,
        )
        assert resp.status_code == 200 and resp.json()["state"] == "quarantined", resp.text
        yield Scene(grid, served, tiny[0], nodes)
    finally:
        grid.stop()


def admin(grid: LocalGrid, path: str, token: str = ADMIN) -> httpx.Response:
    return httpx.get(grid.url + path, headers={"Authorization": f"Bearer {token}"}, timeout=10)


def test_series_endpoint_needs_the_admin_token_and_valid_params(scene: Scene) -> None:
    assert admin(scene.grid, "/admin/series", token=API_KEY).status_code == 401
    for query in (
        "window_s=0",
        "window_s=abc",
        "bucket_s=-1",
        "window_s=60&bucket_s=61",
        "window_s=nan",
        "bucket_s=0.001",
    ):
        resp = admin(scene.grid, f"/admin/series?{query}")
        assert resp.status_code == 400, (query, resp.text)
        assert resp.json()["error"]["type"] == "invalid_request_error"
    found = admin(scene.grid, "/admin/series?window_s=600&bucket_s=10").json()
    tiny = [s for s in found["series"] if s["model"] == TINY_MODEL]
    card = scene.hardware("tiny")
    assert [(s["hardware"], s["hw_class"], s["requests"]) for s in tiny] == [
        (card, HARDWARE[card].hw_class, TINY_REQUESTS)
    ]
    assert sum(b["requests"] for b in tiny[0]["buckets"]) == TINY_REQUESTS and len(tiny[0]["buckets"]) == 60
    emulated = [s for s in found["series"] if s["model"] == EMULATED_MODEL]
    assert [(s["hardware"], s["hw_class"], s["requests"]) for s in emulated] == [("rtx4090", "consumer-high", 1)]


def test_dashboard_assets_are_public_and_self_contained(scene: Scene) -> None:
    page = httpx.get(scene.grid.url + "/dashboard", timeout=10)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert not re.search(r"(src|href)=\"(https?:)?//", page.text), "the page loads nothing from elsewhere"
    assert httpx.get(scene.grid.url + "/dashboard/dashboard.js", timeout=10).status_code == 200
    missing = httpx.get(scene.grid.url + "/dashboard/secrets.txt", timeout=10)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    assert "innerHTML" not in httpx.get(scene.grid.url + "/dashboard/dashboard.js", timeout=10).text


def shoot(page: Page, name: str) -> Path:
    path = artifacts_dir() / name
    page.screenshot(path=str(path), full_page=True)
    return path


def sign_in(page: Page, token: str) -> None:
    page.get_by_test_id("token-input").fill(token)
    page.get_by_test_id("token-submit").click()


def check_nodes(page: Page, scene: Scene) -> None:
    rows = page.get_by_test_id("node-row")
    expect(rows).to_have_count(len(scene.node_ids), timeout=WAIT_MS)
    for node_id, node in scene.nodes.items():
        row = page.locator(f'[data-testid="node-row"][data-node-id="{node_id}"]')
        expect(row.get_by_test_id("node-id")).to_have_text(node_id[:12])
        expect(row.get_by_test_id("node-state")).to_have_text("up")
        reliability = "quarantined" if node_id == scene.quarantined else re.compile("^(healthy|probation)$")
        expect(row.get_by_test_id("node-reliability")).to_have_text(reliability)
        expect(row.get_by_test_id("node-hardware")).to_contain_text(node["hardware"]["accelerator"])
        expect(row.get_by_test_id("node-emulated")).to_have_text("emulated" if node["emulated"] else "real")
    emulated = [n for n in scene.nodes.values() if n["emulated"]]
    assert [n["hardware"]["accelerator"] for n in emulated] == ["rtx4090"]
    quarantined = page.locator(f'[data-testid="node-row"][data-node-id="{scene.quarantined}"]')
    expect(quarantined.get_by_test_id("node-score")).to_have_text("0.000")  # a quarantined node scores 0


def check_traffic(page: Page, scene: Scene) -> None:
    card = scene.hardware("tiny")
    panel = page.locator(f'[data-testid="series"][data-model="{TINY_MODEL}"][data-hardware="{card}"]')
    expect(panel).to_have_count(1, timeout=WAIT_MS)
    expect(panel.locator("h3")).to_contain_text(f"{TINY_REQUESTS} requests")
    rates = panel.get_by_test_id("chart-rate").get_by_test_id("point")
    values = [float(v or 0) for v in rates.evaluate_all("ps => ps.map(p => p.getAttribute('data-value'))")]
    assert len(values) == 60 and sum(values) * 10 == pytest.approx(TINY_REQUESTS), values
    for chart in ("chart-ttft", "chart-itl"):
        points = panel.get_by_test_id(chart).get_by_test_id("point")
        assert points.count() >= 2, chart  # p50 and p95 of at least one bucket
        assert all(float(v) > 0 for v in points.evaluate_all("ps => ps.map(p => p.getAttribute('data-value'))"))
    emulated = page.locator(f'[data-testid="series"][data-model="{EMULATED_MODEL}"][data-hardware="rtx4090"]')
    expect(emulated.get_by_test_id("chart-ttft").get_by_test_id("point")).not_to_have_count(0)


def check_incidents(page: Page, scene: Scene) -> None:
    row = page.locator(f'[data-testid="incident-row"][data-node-id="{scene.quarantined}"]', has_text="quarantined")
    expect(row).to_have_count(1, timeout=WAIT_MS)
    detail = row.get_by_test_id("incident-detail")
    expect(detail).to_contain_text(REASON)  # markup in the reason shown as text ...
    expect(detail.locator("b")).to_have_count(0)  # ... never parsed


def check_doctor(page: Page, scene: Scene) -> None:
    rows = page.get_by_test_id("doctor-row")
    expect(rows).to_have_count(len(scene.node_ids), timeout=WAIT_MS)
    verdicts = set(page.get_by_test_id("doctor-verdict").all_inner_texts())
    assert verdicts and verdicts <= {c.value for c in Cause}, verdicts
    assert {r.get_attribute("data-node-id") for r in rows.all()} == set(scene.node_ids)


def check_keys(page: Page, scene: Scene) -> None:
    """The key the scene's requests were sent with, and the answers it got (the static --api-key key)."""
    row = page.get_by_test_id("key-row")
    expect(row).to_have_count(1, timeout=WAIT_MS)
    expect(row.get_by_test_id("key-requests")).to_have_text(str(len(scene.served)))
    expect(row.get_by_test_id("key-refused")).to_have_text("0")
    assert "--api-key 1" in row.inner_text()


def with_key(grid: LocalGrid, key: str, model: str | None = None) -> int:
    """The status a request with `key` gets: `/v1/models`, or a one-token completion of `model` when given."""
    headers = {"Authorization": f"Bearer {key}"}
    if model is None:
        return httpx.get(grid.url + "/v1/models", headers=headers, timeout=10).status_code
    body = {"model": model, "prompt": "a key's models", "max_tokens": 1}
    return httpx.post(grid.url + "/v1/completions", json=body, headers=headers, timeout=30).status_code


def assert_secret_hidden(page: Page, secret: str, console: list[str], *, shown: bool) -> None:
    """`secret` is in no attribute, URL, storage or console message; on the page only as text while `shown`."""
    found = page.evaluate(
        """(secret) => {
            const has = (v) => v.includes(secret);
            return {
                attribute: [...document.querySelectorAll("*")].some((e) => [...e.attributes].some((a) => has(a.value))),
                url: has(location.href),
                storage: [localStorage, sessionStorage].some((s) => Object.values({ ...s }).some(has)),
                text: has(document.documentElement.textContent),
            };
        }""",
        secret,
    )
    assert found == {"attribute": False, "url": False, "storage": False, "text": shown}, found
    assert not [m for m in console if secret in m]


def check_key_management(page: Page, scene: Scene, console: list[str]) -> None:
    """Through the page: create a key (rpm limit, models list), use it, rotate it, revoke it; a bad create is
    refused with the API's message next to the form and adds no row."""
    grid = scene.grid
    accept = [True]

    def on_dialog(dialog: Dialog) -> None:
        assert NEW_KEY_NAME in dialog.message
        dialog.accept() if accept[0] else dialog.dismiss()

    page.on("dialog", on_dialog)
    page.get_by_test_id("key-name").fill(NEW_KEY_NAME)
    page.get_by_test_id("key-rpm").fill("30")
    page.get_by_test_id("key-models").fill(f" {TINY_MODEL} , other-model ")
    page.get_by_test_id("key-priority").select_option("batch")
    page.get_by_test_id("key-create").click()
    box = page.get_by_test_id("new-key")
    expect(box).to_be_visible(timeout=WAIT_MS)
    expect(box).to_contain_text("will not be shown again")
    key = page.get_by_test_id("new-key-value").inner_text()
    assert key.startswith("gsk_"), key
    key_id = key.removeprefix("gsk_").split(".")[0]
    expect(page.get_by_test_id("new-key-title")).to_have_text(f"New key created for {NEW_KEY_NAME} ({key_id}):")
    expect(page.get_by_test_id("key-name")).to_have_value("")  # the form is ready for the next one
    assert_secret_hidden(page, key, console, shown=True)

    row = page.locator(f'[data-testid="issued-row"][data-key-id="{key_id}"]')
    expect(row.get_by_test_id("issued-state")).to_have_text("active", timeout=WAIT_MS)
    expect(row.get_by_test_id("issued-name")).to_have_text(f"{NEW_KEY_NAME} ({key_id})")
    expect(row.get_by_test_id("issued-rpm")).to_have_text("30")
    expect(row.get_by_test_id("issued-tpm")).to_have_text("no limit")  # left empty: not sent
    expect(row.get_by_test_id("issued-budget")).to_have_text("no limit")
    expect(row.get_by_test_id("issued-models")).to_have_text(f"{TINY_MODEL}, other-model")
    expect(row.get_by_test_id("issued-tiers")).to_have_text("any")
    expect(row.get_by_test_id("issued-priority")).to_have_text("batch")
    assert with_key(grid, key) == 200
    assert with_key(grid, key, EMULATED_MODEL) == 403  # not among the key's models

    page.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=grid.url)
    page.get_by_test_id("new-key-copy").click()
    expect(page.get_by_test_id("new-key-copied")).to_have_text("Copied to the clipboard.")
    assert page.evaluate("navigator.clipboard.readText()") == key
    page.get_by_test_id("new-key-dismiss").click()
    expect(box).to_be_hidden()
    assert_secret_hidden(page, key, console, shown=False)

    row.get_by_test_id("key-rotate").click()
    expect(page.get_by_test_id("new-key-title")).to_have_text(f"New key rotated for {NEW_KEY_NAME} ({key_id}):")
    rotated = page.get_by_test_id("new-key-value").inner_text()
    assert rotated.startswith(f"gsk_{key_id}.") and rotated != key
    assert (with_key(grid, key), with_key(grid, rotated)) == (401, 200)
    page.get_by_test_id("signout").click()  # signing out takes the shown key off the page
    expect(page.get_by_test_id("login")).to_be_visible()
    assert_secret_hidden(page, rotated, console, shown=False)
    sign_in(page, ADMIN)

    accept[0] = False
    row.get_by_test_id("key-revoke").click()  # ... and thought better of it
    expect(row.get_by_test_id("issued-state")).to_have_text("active")
    assert with_key(grid, rotated) == 200
    accept[0] = True
    row.get_by_test_id("key-revoke").click()
    expect(row.get_by_test_id("issued-state")).to_have_text("revoked", timeout=WAIT_MS)
    expect(row.locator("button")).to_have_count(0)
    assert with_key(grid, rotated) == 401

    rows = page.get_by_test_id("issued-row")
    expect(rows).to_have_count(1)
    form_error = page.get_by_test_id("key-form-error")
    for name, rpm, sent in (("bad key", "-1", {"name": "bad key", "rpm": -1}), ("   ", "", {"name": ""})):
        refused = httpx.post(
            grid.url + "/admin/keys", json=sent, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=10
        )
        assert refused.status_code == 400, refused.text
        page.get_by_test_id("key-name").fill(name)
        page.get_by_test_id("key-rpm").fill(rpm)
        page.get_by_test_id("key-create").click()
        expect(form_error).to_have_text(refused.json()["error"]["message"], timeout=WAIT_MS)
        expect(box).to_be_hidden()
    expect(page.get_by_test_id("key-name")).to_have_attribute("aria-invalid", "true")
    expect(rows).to_have_count(1)
    assert [k["id"] for k in admin(grid, "/admin/keys").json()["keys"]] == [key_id]
    page.remove_listener("dialog", on_dialog)


def check_decision(page: Page, served: Served) -> None:
    page.get_by_test_id("decision-input").fill(served.decision_id)
    page.get_by_test_id("decision-submit").click()
    expect(page.get_by_test_id("decision-winner")).to_have_text(served.node_id, timeout=WAIT_MS)
    expect(page.get_by_test_id("decision-served-by")).to_have_text(served.node_id)
    expect(page.get_by_test_id("decision-id")).to_have_text(served.decision_id)
    expect(page.get_by_test_id("decision-verdict")).to_have_count(3)
    rejected = page.locator('[data-testid="decision-verdict"].rejected')
    expect(rejected).to_have_count(1)  # the emulated node does not serve the tiny model
    expect(rejected.get_by_test_id("verdict-reason")).not_to_have_text("")
    winner = page.locator(f'[data-testid="decision-candidate"][data-node-id="{served.node_id}"]')
    expect(winner).to_have_count(1)
    expect(winner.locator("li").first).to_be_visible()  # its signals, with raw figures and weights


def test_dashboard_in_chromium(scene: Scene) -> None:
    errors: list[str] = []
    console: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.on("pageerror", lambda exc: errors.append(f"page error: {exc}"))
            page.on("console", lambda m: errors.append(m.text) if "Content Security Policy" in m.text else None)
            page.on("console", lambda m: console.append(m.text))
            page.goto(scene.grid.url + "/dashboard")

            sign_in(page, "not-the-admin-token")
            expect(page.get_by_test_id("login-error")).to_contain_text("admin token was refused", timeout=WAIT_MS)
            expect(page.locator("#main")).to_be_hidden()
            shots = [shoot(page, "01-wrong-token.png")]

            sign_in(page, ADMIN)
            check_nodes(page, scene)
            check_traffic(page, scene)
            check_incidents(page, scene)
            check_doctor(page, scene)
            check_keys(page, scene)
            assert page.evaluate("sessionStorage.getItem('gridserve-admin-token')") == ADMIN
            shots.append(shoot(page, "02-overview.png"))

            check_decision(page, scene.served[-2])  # the last tiny request
            shots.append(shoot(page, "03-decision.png"))

            check_key_management(page, scene, console)
            shots.append(shoot(page, "04-keys.png"))  # the revoked key, the refused create's message

            page.reload()  # the token survives a reload of the tab
            expect(page.get_by_test_id("node-row")).to_have_count(len(scene.node_ids), timeout=WAIT_MS)
        finally:
            browser.close()
    assert errors == []
    for shot in shots:
        width, height = png_size(shot)
        assert width == 1400 and height >= 1000 and shot.stat().st_size > 5_000, (shot, width, height)
    assert png_size(shots[1])[1] > png_size(shots[0])[1], "the overview is a full page, longer than the sign-in"


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", path
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
