// The case queue: every alert a person must verify, newest first, with the filters and the figures
// (open cases by age, time to verdict, confirmed vs dismissed per kind and store). Polls both endpoints.
// Loaded after common.js: indexed values are escaped by its escapeHtml, as on every other page.
"use strict";

// When a case was opened, as its alert's message gives it, in its store's zone (the server's local_times), else as
// UTC text labelled so (common.js's storeTime); before, UTC to the minute, unlabelled.
const opened = (c) => storeTime((c.local_times || {}).opened_at, c.opened_at);
const duration = (s) => (s === null || s === undefined ? "–" : s < 90 ? `${Math.round(s)} s` : s < 5400 ? `${Math.round(s / 60)} min` : `${(s / 3600).toFixed(1)} h`);
const share = (x) => (x === null || x === undefined ? "–" : `${(100 * x).toFixed(0)} %`);
const params = new URLSearchParams(location.search);
// By default every case still waiting for a verdict: open and escalated ("undecided"), as the open-cases figure counts.
const filters = { state: params.get("state") || "undecided", kind: params.get("kind") || "", store: params.get("store") || "" };
// Read every refreshMs; after a 5xx or no answer the next try waits twice as long each time in a row, up to 30 s
// (common.js's readFailed). A 4xx (a filter from the address the API refuses, a login that may not read) gets the same
// answer however often it is asked, so the page stops asking until a filter changes.
const reading = { refreshMs: 5000, failures: 0, timer: null, stopped: false };
// Each refresh's number: an answer to an older one (asked before a filter changed) is dropped, as on the live page.
let seq = 0;

function options(id, counts, current) {
  const select = document.getElementById(id);
  const keep = new Set([...Object.keys(counts), current].filter(Boolean));
  const have = new Set([...select.options].map((o) => o.value));
  for (const key of [...keep].sort()) if (!have.has(key)) select.add(new Option(key, key));
  select.value = current;
}

function table(id, rows, render) {
  const body = document.querySelector(`#${id} tbody`);
  body.innerHTML = rows.map(render).join("");
}

async function refresh() {
  clearTimeout(reading.timer);
  reading.timer = null;
  const mine = ++seq;
  const status = document.getElementById("status");
  const q = new URLSearchParams(Object.entries(filters).filter(([, v]) => v));
  try {
    // common.js's askJson, as the other pages read: no answer, or one that is not JSON (a proxy's sign-in page with a
    // 200), is a failure with its reason, not a TypeError from drawing an empty answer.
    const answers = await Promise.all([
      askJson(`/api/cases?${q}`), askJson(`/api/cases/figures?${filters.store ? `store=${encodeURIComponent(filters.store)}` : ""}`),
    ]);
    const failed = answers.find((answer) => !answer.ok);
    if (failed) throw Object.assign(new Error(failed.reason), { status: failed.status });
    if (mine !== seq) return;
    const [queue, figures] = answers.map((answer) => answer.body);
    options("f-state", { undecided: 0, open: 0, escalated: 0, confirmed: 0, dismissed: 0, expired: 0 }, filters.state);
    options("f-kind", queue.kinds, filters.kind);
    options("f-store", queue.stores, filters.store);
    table("queue-table", queue.cases, (c) => `<tr data-case="${escapeHtml(c.case_id)}" class="state-${escapeHtml(c.state)}">
      <td><a href="/cases/${encodeURIComponent(c.case_id)}">${escapeHtml(c.case_id)}</a></td><td>${escapeHtml(opened(c))}</td>
      <td>${escapeHtml(c.state)}</td><td>${escapeHtml(c.kind)}</td><td>${escapeHtml(c.store_id)}</td><td>${escapeHtml(c.lane_id)}</td>
      <td>${escapeHtml(c.owner)}</td><td>${escapeHtml(c.summary)}</td></tr>`);
    document.getElementById("queue-none").hidden = queue.cases.length > 0;
    document.getElementById("queue-hint").textContent = `(${queue.total} matching, newest first)`;
    document.querySelector("#kpi-open .value").textContent = figures.open;
    document.querySelector("#kpi-p50 .value").textContent = duration(figures.time_to_verdict_s.p50);
    document.querySelector("#kpi-p95 .value").textContent = duration(figures.time_to_verdict_s.p95);
    document.querySelector("#kpi-decided .value").textContent = figures.time_to_verdict_s.decided;
    const most = Math.max(1, ...figures.open_by_age.map((r) => r.cases));
    table("age-table", figures.open_by_age, (r) => `<tr><td>${escapeHtml(r.age)}</td><td>${r.cases}</td>
      <td class="meter-cell"><span class="meter" style="width:${Math.round(100 * r.cases / most)}%"></span></td></tr>`);
    const shares = (r) => `<tr><td>${escapeHtml(r.key)}</td><td>${r.confirmed}</td><td>${r.dismissed}</td><td>${r.expired}</td><td>${share(r.confirmed_share)}</td></tr>`;
    table("kind-table", figures.by_kind, shares);
    table("store-table", figures.by_store, shares);
    status.className = "status";
    status.textContent = `updated ${new Date().toLocaleTimeString()}${figures.truncated ? " (figures over the newest cases only)" : ""}`;
    document.body.dataset.loaded = "1";
    reading.failures = 0;
    reading.stopped = false;
    clearTimeout(reading.timer);
    reading.timer = setTimeout(refresh, reading.refreshMs);
  } catch (err) {
    if (mine !== seq) return;
    // a 401 or 403 (the login expired or was changed) says to log in again: no filter change helps there
    readFailed(reading, status, { status: err.status, message: String(err.message || err) }, refresh, "a filter changes");
  }
}

for (const name of ["state", "kind", "store"]) {
  document.getElementById(`f-${name}`).addEventListener("change", (e) => {
    filters[name] = e.target.value;
    const q = new URLSearchParams(Object.entries(filters).filter(([, v]) => v));
    history.replaceState(null, "", `/cases?${q}`);
    refresh();
  });
}
refresh();
