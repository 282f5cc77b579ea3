// gridserve operator dashboard: vanilla JS, no dependencies. Every string from the gateway (node ids, reasons,
// evidence: node-supplied, untrusted) reaches the page through textContent or setAttribute, never as HTML.
// Secrets: the admin token lives in session storage and goes out only as an Authorization header; a new API key
// (created or rotated) is shown once as the text of one element and removed from it on dismiss or sign-out. Neither
// is ever put in a URL, an attribute, local storage or the console.
"use strict";

const TOKEN_KEY = "gridserve-admin-token";
const POLL_MS = 2000;
const WINDOW_S = 600;
const BUCKET_S = 10;
const SVG_NS = "http://www.w3.org/2000/svg";

let token = null;
let timer = null;

class AuthError extends Error {}

/** A refusal from the API (not a 401): its status, and the OpenAI-shaped error's message and param. */
class ApiError extends Error {
  constructor(status, detail, param) {
    super(`${status}: ${detail}`);
    this.status = status;
    this.detail = detail;
    this.param = param || null;
  }
}

// ---- DOM helpers -------------------------------------------------------------------------------------------

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value !== null && value !== undefined) node.setAttribute(key, String(value));
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function svg(tag, attrs) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, String(value));
  return node;
}

function byTestId(id) {
  return document.querySelector(`[data-testid="${id}"]`);
}

function showError(id, message) {
  const node = byTestId(id);
  node.textContent = message || "";
  node.hidden = !message;
}

// ---- formatting ------------------------------------------------------------------------------------------

const short = (id) => (id ? String(id).slice(0, 12) : "");
const num = (v, digits = 2) => (typeof v === "number" && Number.isFinite(v) ? v.toFixed(digits) : "–");
const ms = (s) => (typeof s === "number" ? `${(s * 1000).toFixed(s >= 0.1 ? 0 : 1)} ms` : "–");
const pct = (v) => (typeof v === "number" ? `${(v * 100).toFixed(0)}%` : "–");
const gib = (b) => (b / 2 ** 30).toFixed(1);
const clock = (t) => (typeof t === "number" ? new Date(t * 1000).toLocaleTimeString() : "–");

function nodeCell(id) {
  return el("td", { class: "mono", title: id, "data-testid": "node-id" }, short(id));
}

// ---- the admin API --------------------------------------------------------------------------------------

/** Call the admin API with the token: GET by default; `body` (any JSON value) is sent as JSON. */
async function api(path, { method = "GET", body } = {}) {
  const headers = { Authorization: `Bearer ${token}` };
  const init = { method, headers, cache: "no-store" };
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const resp = await fetch(path, init);
  let answer = null;
  try {
    answer = await resp.json();
  } catch (_) {
    answer = null;
  }
  const error = answer && answer.error ? answer.error : null;
  const message = error && error.message ? error.message : `HTTP ${resp.status}`;
  if (resp.status === 401) throw new AuthError(message);
  if (!resp.ok) throw new ApiError(resp.status, message, error ? error.param : null);
  return answer;
}

// ---- nodes ------------------------------------------------------------------------------------------------

function memoryText(tel) {
  if (!tel || !tel.memory_total_bytes) return "–";
  return `${gib(tel.memory_used_bytes)} / ${gib(tel.memory_total_bytes)} GiB`;
}

function thermalText(tel) {
  if (!tel) return "–";
  const temp = typeof tel.temperature_c === "number" ? `${tel.temperature_c.toFixed(0)} °C` : "–";
  const ratio = typeof tel.clock_ratio === "number" ? tel.clock_ratio : null;
  const throttled = ratio !== null && ratio < 0.8;
  return `${temp} / ${ratio === null ? "–" : pct(ratio)}${throttled ? " throttled" : ""}`;
}

function hardwareText(node) {
  const hw = node.hardware || {};
  const gpus = (hw.gpus || []).map((g) => g.name).join(", ");
  return gpus ? `${hw.accelerator} (${gpus})` : hw.accelerator || "–";
}

function nodeRow(node) {
  const tel = node.telemetry;
  const rel = node.reliability || {};
  const models = (node.models || []).map((m) => m.name).join(", ");
  return el(
    "tr",
    { "data-testid": "node-row", "data-node-id": node.node_id },
    nodeCell(node.node_id),
    el("td", {}, node.engine),
    el("td", { "data-testid": "node-hardware" }, hardwareText(node)),
    el("td", { "data-testid": "node-emulated" }, node.emulated ? "emulated" : "real"),
    el("td", {}, models),
    el("td", { "data-testid": "node-state", class: `state-${node.state}` }, node.state),
    el("td", { "data-testid": "node-reliability", class: `state-${rel.state}`, title: rel.reason || "" }, rel.state),
    el("td", { "data-testid": "node-score" }, num(rel.score, 3)),
    el("td", {}, tel ? pct(tel.utilization) : "–"),
    el("td", {}, memoryText(tel)),
    el("td", {}, thermalText(tel)),
    el("td", {}, tel ? `${tel.queue_depth} queued, ${tel.active_requests} active` : "–"),
    el("td", {}, node.outstanding),
    el("td", {}, `${num(node.heartbeat_age_s, 1)} s`),
    el("td", {}, node.rtt_ms === null ? "–" : `${num(node.rtt_ms, 1)} ms`),
  );
}

async function refreshNodes() {
  const found = await api("/admin/nodes");
  byTestId("nodes-body").replaceChildren(...found.nodes.map(nodeRow));
  byTestId("nodes-count").textContent = `${found.nodes.length}`;
}

// ---- traffic charts (inline SVG) ----------------------------------------------------------------------------

const CHART = { width: 320, height: 120, left: 52, right: 8, top: 10, bottom: 18 };

function chart(kind, title, buckets, lines, format) {
  const { width, height, left, right, top, bottom } = CHART;
  const values = lines.flatMap((line) => buckets.map((b) => b[line.key])).filter((v) => typeof v === "number");
  const max = Math.max(...values, 0) || 1;
  const x = (i) => left + ((width - left - right) * i) / Math.max(1, buckets.length - 1);
  const y = (v) => top + (height - top - bottom) * (1 - v / max);
  const root = svg("svg", { viewBox: `0 0 ${width} ${height}`, class: "chart", "data-testid": `chart-${kind}` });
  const heading = el("div", { class: "chart-title" }, title);
  root.append(svg("line", { x1: left, y1: y(0), x2: width - right, y2: y(0), class: "axis" }));
  root.append(svg("line", { x1: left, y1: top, x2: left, y2: y(0), class: "axis" }));
  const label = (text, attrs) => {
    const node = svg("text", attrs);
    node.textContent = text;
    root.append(node);
  };
  label(format(max), { x: left - 4, y: top + 8, class: "tick", "text-anchor": "end" });
  label(format(0), { x: left - 4, y: y(0), class: "tick", "text-anchor": "end" });
  label(clock(buckets[0] && buckets[0].t), { x: left, y: height - 4, class: "tick" });
  label("now", { x: width - right, y: height - 4, class: "tick", "text-anchor": "end" });
  for (const line of lines) {
    let d = "";
    let pen = false;
    buckets.forEach((b, i) => {
      const v = b[line.key];
      if (typeof v !== "number") {
        pen = false;
        return;
      }
      d += `${pen ? "L" : "M"}${x(i).toFixed(1)},${y(v).toFixed(1)} `;
      pen = true;
      const point = svg("circle", {
        cx: x(i).toFixed(1), cy: y(v).toFixed(1), r: 2, class: `point ${line.cls}`,
        "data-testid": "point", "data-metric": line.key, "data-value": v,
      });
      const tip = svg("title", {});
      tip.textContent = `${line.key} ${format(v)} at ${clock(b.t)} (${b.requests} requests, ${b.errors} errors)`;
      point.append(tip);
      root.append(point);
    });
    if (d) root.insertBefore(svg("path", { d: d.trim(), class: `line ${line.cls}` }), root.firstChild);
  }
  buckets.forEach((b, i) => {
    if (b.errors > 0) root.append(svg("circle", { cx: x(i), cy: top, r: 3, class: "error-mark", "data-testid": "error-mark" }));
  });
  return el("div", { class: "chart-box" }, heading, root);
}

function seriesPanel(s) {
  const title = `${s.model} · ${s.hardware} (${s.hw_class}) · ${s.requests} requests`;
  return el(
    "div",
    { class: "series", "data-testid": "series", "data-model": s.model, "data-hardware": s.hardware },
    el("h3", {}, title),
    el(
      "div",
      { class: "charts" },
      chart("rate", "request rate (req/s)", s.buckets, [{ key: "rate", cls: "p50" }], (v) => v.toFixed(2)),
      chart("ttft", "TTFT p50 / p95", s.buckets, [{ key: "ttft_p50_s", cls: "p50" }, { key: "ttft_p95_s", cls: "p95" }], ms),
      chart("itl", "ITL p50 / p95", s.buckets, [{ key: "itl_p50_s", cls: "p50" }, { key: "itl_p95_s", cls: "p95" }], ms),
    ),
  );
}

async function refreshTraffic() {
  const found = await api(`/admin/series?window_s=${WINDOW_S}&bucket_s=${BUCKET_S}`);
  const panels = found.series.map(seriesPanel);
  byTestId("traffic").replaceChildren(...(panels.length ? panels : [el("p", { class: "empty" }, "no requests in the window")]));
  byTestId("traffic-window").textContent = `last ${found.window_s / 60} min, ${found.bucket_s} s buckets`;
}

// ---- incidents --------------------------------------------------------------------------------------------

async function refreshIncidents() {
  const found = await api("/admin/incidents?limit=100");
  const rows = [
    ...found.incidents.map((e) => ({ at: e.at, node: e.node_id, what: `incident (${e.severity})`, detail: e.detail, kind: "incident" })),
    ...found.transitions.map((t) => ({ at: t.at, node: t.node_id, what: `${t.old} → ${t.new}`, detail: t.reason, kind: "transition" })),
  ].sort((a, b) => b.at - a.at);
  const body = byTestId("incidents-body");
  if (!rows.length) {
    body.replaceChildren(el("tr", {}, el("td", { colspan: 4, class: "empty" }, "no incidents")));
    return;
  }
  body.replaceChildren(
    ...rows.map((r) =>
      el(
        "tr",
        { "data-testid": "incident-row", "data-node-id": r.node, "data-kind": r.kind },
        el("td", {}, clock(r.at)),
        nodeCell(r.node),
        el("td", { "data-testid": "incident-what" }, r.what),
        el("td", { "data-testid": "incident-detail" }, r.detail),
      ),
    ),
  );
}

// ---- doctor -----------------------------------------------------------------------------------------------

async function refreshDoctor() {
  const found = await api("/admin/doctor?window_s=120");
  byTestId("doctor-body").replaceChildren(
    ...found.nodes.map((n) =>
      el(
        "tr",
        { "data-testid": "doctor-row", "data-node-id": n.node_id },
        nodeCell(n.node_id),
        el("td", {}, n.model),
        el("td", {}, n.state),
        el("td", { "data-testid": "doctor-verdict", class: `cause-${n.diagnosis.cause}` }, n.diagnosis.cause),
        el("td", {}, n.diagnosis.summary),
        el("td", {}, el("ul", {}, ...n.diagnosis.evidence.map((e) => el("li", {}, e)))),
        el("td", {}, n.diagnosis.next_check),
        el("td", {}, n.latency.requests),
        el("td", {}, ms(n.latency.ttft_p50_s)),
        el("td", {}, ms(n.latency.itl_p50_s)),
      ),
    ),
  );
}

// ---- API keys -------------------------------------------------------------------------------------------

function limitText(used, limit) {
  return limit == null ? `${used}` : `${used} / ${limit}`;
}

function keyRow(k) {
  const here = k.served_here || { requests: 0, prompt_tokens: 0, completion_tokens: 0, spent_usd: 0, errors: 0, refused: {} };
  const grid = k.cluster || { requests_this_minute: 0, tokens_this_minute: 0, spent_usd: 0, inflight: 0 };
  const refused = Object.entries(here.refused).map(([code, n]) => `${code}: ${n}`).join(", ") || "0";
  const spend = `$${here.spent_usd.toFixed(6)}` + (k.budget_usd == null ? "" : ` (grid $${grid.spent_usd.toFixed(6)} of $${k.budget_usd})`);
  return el(
    "tr",
    { "data-testid": "key-row", "data-key-id": k.id },
    el("td", {}, `${k.name || k.id} (${k.id})`),
    el("td", {}, k.priority || "standard"),
    el("td", { "data-testid": "key-requests" }, `${here.requests}`),
    el("td", {}, `${here.prompt_tokens + here.completion_tokens}`),
    el("td", {}, spend),
    el("td", {}, `${here.errors}`),
    el("td", { "data-testid": "key-refused" }, refused),
    el("td", {}, ms(here.ttft_p50_s)),
    el("td", {}, ms(here.ttft_p99_s)),
    el("td", {}, `${limitText(grid.requests_this_minute, k.rpm)} req, ${limitText(grid.tokens_this_minute, k.tpm)} tok`),
    el("td", {}, limitText(grid.inflight, k.max_concurrency)),
  );
}

async function refreshKeys() {
  const found = await api("/admin/usage");
  const rows = found.keys.map(keyRow);
  byTestId("keys-body").replaceChildren(...(rows.length ? rows : [el("tr", {}, el("td", { colspan: 11, class: "empty" }, "no key has been used yet"))]));
}

// ---- issued keys: create, list, rotate, revoke -------------------------------------------------------------

const INTEGER_FIELDS = ["rpm", "tpm", "max_concurrency"];
const LIST_FIELDS = ["models", "tiers"];
const KEY_SECTIONS = [
  ["issued-error", refreshIssued],
  ["keys-error", refreshKeys],
];

let issuedAsked = 0; // /admin/keys calls made, and the number of the one drawn last: an older answer is not drawn
let issuedDrawn = 0;
let issuedSeen = null; // that answer, as JSON: the table is redrawn only when it changes (buttons keep their state)

class FormError extends Error {
  constructor(param, message) {
    super(message);
    this.param = param;
  }
}

const when = (t) => (typeof t === "number" ? new Date(t * 1000).toLocaleString() : "–");
const limit = (v) => (v === null || v === undefined ? "no limit" : String(v));
const anyOf = (list) => (list === null || list === undefined ? "any" : list.length ? list.join(", ") : "none");

function button(testid, label, onClick, cls) {
  const node = el("button", { type: "button", "data-testid": testid, class: cls }, label);
  node.addEventListener("click", () => onClick(node));
  return node;
}

function issuedRow(k) {
  const active = k.status === "active";
  const actions = active
    ? [button("key-rotate", "Rotate", (b) => rotateKey(k, b)), button("key-revoke", "Revoke", (b) => revokeKey(k, b), "danger")]
    : [];
  return el(
    "tr",
    { "data-testid": "issued-row", "data-key-id": k.id, class: active ? null : "revoked" },
    el("td", { "data-testid": "issued-name" }, `${k.name} (${k.id})`),
    el("td", { "data-testid": "issued-state", class: `state-${k.status}`, title: active ? null : `revoked ${when(k.revoked_at)}` }, k.status),
    el("td", { "data-testid": "issued-priority" }, k.priority),
    el("td", { "data-testid": "issued-rpm" }, limit(k.rpm)),
    el("td", { "data-testid": "issued-tpm" }, limit(k.tpm)),
    el("td", { "data-testid": "issued-max-concurrency" }, limit(k.max_concurrency)),
    el("td", { "data-testid": "issued-budget" }, k.budget_usd == null ? "no limit" : `$${k.budget_usd}`),
    el("td", { "data-testid": "issued-models" }, anyOf(k.models)),
    el("td", { "data-testid": "issued-tiers" }, anyOf(k.tiers)),
    el("td", {}, when(k.created_at)),
    el("td", { class: "actions" }, ...actions),
  );
}

async function refreshIssued() {
  const asked = ++issuedAsked;
  const found = await api("/admin/keys");
  const seen = JSON.stringify(found.keys);
  if (asked < issuedDrawn || seen === issuedSeen) return;
  issuedDrawn = asked;
  issuedSeen = seen;
  const rows = [...found.keys].reverse().map(issuedRow); // newest first
  byTestId("issued-body").replaceChildren(
    ...(rows.length ? rows : [el("tr", {}, el("td", { colspan: 11, class: "empty" }, "no key has been issued yet"))]),
  );
}

/** Redraw the key tables now (after a change), as a poll would. */
function refreshKeySections() {
  return refreshSections(KEY_SECTIONS).catch((err) => signOut(`The admin token was refused: ${err.message}`));
}

function showNewKey(made, verb) {
  byTestId("new-key-title").textContent = `New key ${verb} for ${made.name} (${made.id}):`;
  byTestId("new-key-value").textContent = made.key;
  byTestId("new-key-copied").textContent = "";
  byTestId("new-key").hidden = false;
}

function clearNewKey() {
  const selection = window.getSelection();
  if (selection && selection.containsNode(byTestId("new-key"), true)) selection.removeAllRanges();
  byTestId("new-key-value").textContent = "";
  byTestId("new-key-title").textContent = "";
  byTestId("new-key-copied").textContent = "";
  byTestId("new-key").hidden = true;
}

async function copyNewKey() {
  const value = byTestId("new-key-value");
  const note = byTestId("new-key-copied");
  if (!value.textContent) return;
  try {
    if (!navigator.clipboard || !window.isSecureContext) throw new Error("no clipboard here");
    await navigator.clipboard.writeText(value.textContent);
    note.textContent = "Copied to the clipboard.";
  } catch (_) {
    window.getSelection().selectAllChildren(value);
    note.textContent = "The browser gives this page no clipboard: the key is selected, copy it with Ctrl+C (⌘C).";
  }
}

/** The body of POST /admin/keys from the form: a field left empty is not sent. */
function keyBody(form) {
  const field = (name) => form.elements.namedItem(name);
  const body = { name: field("name").value.trim(), priority: field("priority").value };
  for (const name of [...INTEGER_FIELDS, "budget_usd"]) {
    const input = field(name);
    const text = input.value.trim();
    if (input.validity.badInput) throw new FormError(name, `${name}: not a number`);
    if (text === "") continue;
    const value = Number(text);
    if (!Number.isFinite(value)) throw new FormError(name, `${name}: not a finite number`);
    body[name] = value;
  }
  for (const name of LIST_FIELDS) {
    const items = field(name).value.split(",").map((s) => s.trim()).filter(Boolean);
    if (items.length) body[name] = items;
  }
  return body;
}

function formError(form, param, message) {
  const input = param ? form.elements.namedItem(String(param).split(".")[0]) : null;
  if (input && input.setAttribute) input.setAttribute("aria-invalid", "true");
  showError("key-form-error", message);
}

async function createKey(event) {
  event.preventDefault();
  const form = event.currentTarget;
  const submit = byTestId("key-create");
  showError("key-form-error", "");
  for (const input of form.querySelectorAll("[aria-invalid]")) input.removeAttribute("aria-invalid");
  let body;
  try {
    body = keyBody(form);
  } catch (err) {
    return formError(form, err.param, err.message);
  }
  submit.disabled = true;
  try {
    const made = await api("/admin/keys", { method: "POST", body });
    form.reset();
    showNewKey(made, "created");
  } catch (err) {
    if (err instanceof AuthError) return signOut(`The admin token was refused: ${err.message}`);
    return formError(form, err.param, err instanceof ApiError ? err.detail : `could not create the key: ${err.message}`);
  } finally {
    submit.disabled = false;
  }
  await refreshKeySections();
}

async function keyAction(node, action) {
  showError("issued-error", "");
  node.disabled = true;
  try {
    await action();
  } catch (err) {
    if (err instanceof AuthError) return signOut(`The admin token was refused: ${err.message}`);
    showError("issued-error", err.message);
  } finally {
    node.disabled = false;
  }
  await refreshKeySections();
}

function rotateKey(k, node) {
  const ask = `Rotate the key ${k.name} (${k.id})?\n\nIt gets a new secret, shown once; the current one is refused at once (on every gateway within a second). Its limits and usage stay.`;
  if (!window.confirm(ask)) return;
  return keyAction(node, async () => {
    showNewKey(await api(`/admin/keys/${encodeURIComponent(k.id)}/rotate`, { method: "POST" }), "rotated");
  });
}

function revokeKey(k, node) {
  const ask = `Revoke the key ${k.name} (${k.id})?\n\nRequests with it are refused at once (on every gateway within a second). This cannot be undone.`;
  if (!window.confirm(ask)) return;
  return keyAction(node, () => api(`/admin/keys/${encodeURIComponent(k.id)}`, { method: "DELETE" }));
}

// ---- decision explorer ----------------------------------------------------------------------------------

function table(testid, headers, rows) {
  return el(
    "table",
    { "data-testid": testid },
    el("thead", {}, el("tr", {}, ...headers.map((h) => el("th", {}, h)))),
    el("tbody", {}, ...rows),
  );
}

function show(value) {
  if (value === null || value === undefined) return "–";
  return typeof value === "object" ? JSON.stringify(value) : String(value);
}

function summaryList(d) {
  const items = [
    ["decision", d.decision_id, "decision-id"],
    ["model", d.model, null],
    ["profile", d.profile, null],
    ["winner", d.chosen, "decision-winner"],
    ["served by", d.served_by, "decision-served-by"],
    ["margin", typeof d.margin === "number" ? d.margin.toFixed(4) : "–", "decision-margin"],
    ["picked by", d.picked_by, null],
    ["status", d.status, "decision-status"],
    ["route", d.route, null],
    ["failovers", d.failovers, null],
    ["explanation", d.explanation, "decision-explanation"],
  ];
  return el(
    "dl",
    { class: "summary" },
    ...items.flatMap(([key, value, testid]) => [el("dt", {}, key), el("dd", { "data-testid": testid, class: "mono" }, show(value))]),
  );
}

function scoreList(scores) {
  return el(
    "ul",
    { class: "scores" },
    ...scores.map((s) =>
      el("li", {}, `${s.scorer}: ${num(s.raw, 4)} ${s.unit} → ${num(s.normalized, 3)} × ${num(s.weight, 2)} = ${num(s.contribution, 3)}`),
    ),
  );
}

function renderDecision(d) {
  const requirements = Object.entries(d.requirements || {}).map(([k, v]) => el("tr", {}, el("td", {}, k), el("td", {}, show(v))));
  const candidates = (d.candidates || []).map((c) =>
    el(
      "tr",
      { "data-testid": "decision-candidate", "data-node-id": c.node_id, class: c.node_id === d.chosen ? "winner" : null },
      el("td", {}, c.rank),
      el("td", { class: "mono", title: c.node_id }, c.node_id),
      el("td", {}, num(c.score, 4)),
      el("td", {}, `${ms(c.predicted_ttft_s)} / ${ms(c.predicted_itl_s)}`),
      el("td", {}, num(c.price_per_mtok, 3)),
      el("td", {}, scoreList(c.scores || [])),
    ),
  );
  const verdicts = (d.nodes || []).map((v) =>
    el(
      "tr",
      { "data-testid": "decision-verdict", "data-node-id": v.node_id, class: v.eligible ? "eligible" : "rejected" },
      el("td", { class: "mono", title: v.node_id }, v.node_id),
      el("td", { "data-testid": "verdict" }, v.eligible ? "eligible" : "rejected"),
      el("td", {}, v.filter),
      el("td", { "data-testid": "verdict-reason" }, v.reason),
    ),
  );
  byTestId("decision-result").replaceChildren(
    summaryList(d),
    el("h3", {}, "requirements"),
    table("decision-requirements", ["requirement", "value"], requirements),
    el("h3", {}, "eligible nodes, best first"),
    table("decision-candidates", ["rank", "node", "score", "predicted TTFT / ITL", "price $/Mtok", "signals"], candidates),
    el("h3", {}, "every node's verdict"),
    table("decision-verdicts", ["node", "verdict", "filter", "reason"], verdicts),
  );
}

async function explain(event) {
  event.preventDefault();
  const id = document.getElementById("decision-id").value.trim();
  showError("decision-error", "");
  byTestId("decision-result").replaceChildren();
  if (!id) return showError("decision-error", "Paste a decision id first.");
  try {
    renderDecision(await api(`/v1/decisions/${encodeURIComponent(id)}`));
  } catch (err) {
    if (err instanceof AuthError) return signOut(`The admin token was refused: ${err.message}`);
    showError("decision-error", err.message);
  }
}

// ---- polling, sign-in -----------------------------------------------------------------------------------

const SECTIONS = [
  ["nodes-error", refreshNodes],
  ["traffic-error", refreshTraffic],
  ["incidents-error", refreshIncidents],
  ["doctor-error", refreshDoctor],
  ...KEY_SECTIONS,
];

/** Refresh the `sections` ([error element's test id, refresh function]); throws the AuthError of a refused token. */
async function refreshSections(sections) {
  const results = await Promise.allSettled(sections.map(([, fn]) => fn()));
  let refused = null;
  results.forEach((r, i) => {
    const failed = r.status === "rejected" ? r.reason : null;
    if (failed instanceof AuthError) refused = failed;
    showError(sections[i][0], failed ? `could not refresh: ${failed.message}` : "");
  });
  if (refused) throw refused;
}

async function refreshAll() {
  await refreshSections(SECTIONS);
  byTestId("status").textContent = `updated ${new Date().toLocaleTimeString()}`;
}

async function poll() {
  try {
    await refreshAll();
    timer = setTimeout(poll, POLL_MS);
  } catch (err) {
    signOut(`The admin token was refused: ${err.message}`);
  }
}

function signOut(message) {
  clearTimeout(timer);
  token = null;
  sessionStorage.removeItem(TOKEN_KEY);
  clearNewKey();
  const keyForm = document.getElementById("key-form");
  keyForm.reset();
  for (const input of keyForm.querySelectorAll("[aria-invalid]")) input.removeAttribute("aria-invalid");
  showError("key-form-error", "");
  showError("issued-error", "");
  issuedSeen = null;
  document.getElementById("main").hidden = true;
  document.getElementById("signout").hidden = true;
  document.getElementById("login").hidden = false;
  byTestId("status").textContent = "";
  showError("login-error", message);
}

async function signIn(candidate) {
  token = candidate;
  try {
    await api("/admin/nodes");
  } catch (err) {
    return signOut(err instanceof AuthError ? `The admin token was refused: ${err.message}` : `Gateway error: ${err.message}`);
  }
  sessionStorage.setItem(TOKEN_KEY, candidate);
  showError("login-error", "");
  document.getElementById("login").hidden = true;
  document.getElementById("main").hidden = false;
  document.getElementById("signout").hidden = false;
  poll();
}

document.addEventListener("DOMContentLoaded", () => {
  document.getElementById("login-form").addEventListener("submit", (event) => {
    event.preventDefault();
    signIn(document.getElementById("token").value.trim());
  });
  document.getElementById("decision-form").addEventListener("submit", explain);
  document.getElementById("key-form").addEventListener("submit", createKey);
  byTestId("new-key-copy").addEventListener("click", copyNewKey);
  byTestId("new-key-dismiss").addEventListener("click", clearNewKey);
  document.getElementById("signout").addEventListener("click", () => signOut(""));
  const saved = sessionStorage.getItem(TOKEN_KEY);
  if (saved) signIn(saved);
});
