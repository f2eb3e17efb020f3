// Checkout Guard pipeline-health page: what Prometheus says about the running processes. Polls
// /api/pipeline; when Prometheus cannot be reached the answer carries `error` and the page says so.
"use strict";

const params = new URLSearchParams(location.search);
const state = {
  minutes: Number(params.get("minutes") || 60), store: params.get("store") || "", anchor: params.get("anchor") === "latest",
  refreshMs: 5000, minRefreshMs: 5000, timer: null, renders: 0, seq: 0, failures: 0, note: "",
};
// After a 5xx or no answer the page asks again after common.js's retryWait (the refresh interval, then twice as long
// each time in a row, up to 30 s); after a 4xx (a 401 once the login expired) it stops: asked again, it gets the same.
const fmtRate = (x) => (x === null || x === undefined ? "–" : x >= 100 ? num.format(x) : x.toFixed(2));
const fmtSeconds = (s) => (s === null || s === undefined ? "–" : s >= 1 ? `${s.toFixed(2)} s` : `${(s * 1000).toFixed(1)} ms`);

// A bar as wide as `value` is of `max`, drawn in the table's last column.
function meter(value, max, cls = "") {
  const pct = max > 0 && value ? Math.max(1, Math.round(100 * value / max)) : 0;
  return `<td class="meter-cell"><span class="meter ${cls}" style="width:${pct}%"></span></td>`;
}

// Rows into a table's body; without rows, the table's "none" line (or, when Prometheus could not be
// asked, a line saying the figures are unknown rather than zero).
function fill(tableId, noneId, rows, render, unknown) {
  const body = document.querySelector(`#${tableId} tbody`);
  body.innerHTML = "";
  for (const row of rows) body.insertAdjacentHTML("beforeend", render(row));
  const none = document.getElementById(noneId);
  none.dataset.text ??= none.textContent;
  none.textContent = unknown ? "Unknown: Prometheus did not answer." : none.dataset.text;
  none.hidden = rows.length > 0;
}

function render(p) {
  const s = p.summary;
  const unknown = Boolean(p.error) && !s.targets;  // Prometheus unreachable: nothing is known, not zero
  setKpi("kpi-targets", s.targets ? `${s.targets_up} / ${s.targets}` : "–");
  document.getElementById("kpi-targets").className = `kpi ${!s.targets ? "" : s.targets_up < s.targets ? "warn" : "good"}`;
  setKpi("kpi-records", unknown ? "–" : fmtRate(s.records_in_per_s));
  setKpi("kpi-decisions", fmtRate(s.decisions_per_s));
  setKpi("kpi-lag", unknown ? "–" : num.format(s.lag));
  setKpi("kpi-dead", unknown ? "–" : fmtRate(s.dead_letters_per_s));
  document.getElementById("kpi-dead").className = `kpi ${s.dead_letters_per_s > 0 ? "warn" : "good"}`;

  fill("targets-table", "targets-none", p.targets, (t) =>
    `<tr data-process="${escapeHtml(t.process)}" class="${t.up ? "" : "down"}"><td>${escapeHtml(t.process)}</td>` +
    `<td class="instance">${escapeHtml(t.instance)}</td><td class="state"><span class="state ${t.up ? "up" : "down"}">${t.up ? "up" : "down"}</span></td></tr>`, unknown);

  const most = Math.max(0, ...p.throughput.flatMap((r) => [r.in_per_s || 0, r.out_per_s || 0]));
  document.getElementById("throughput-hint").textContent = `(records per second over the last ${p.window}; the scoring job counts its decisions)`;
  fill("throughput-table", "throughput-none", p.throughput, (r) =>
    `<tr data-stage="${escapeHtml(r.stage)}"><td>${escapeHtml(r.stage)}</td><td class="in">${fmtRate(r.in_per_s)}</td>` +
    `<td class="out">${fmtRate(r.out_per_s)}</td>${meter(Math.max(r.in_per_s || 0, r.out_per_s || 0), most)}</tr>`, unknown);

  const deepest = Math.max(0, ...p.lag.map((r) => r.lag || 0));
  fill("lag-table", "lag-none", p.lag, (r) =>
    `<tr data-group="${escapeHtml(r.group)}"><td class="group">${escapeHtml(r.group)}</td>` +
    `<td class="lag">${r.lag === null ? "–" : num.format(r.lag)}</td>${meter(r.lag, deepest, "lag")}</tr>`, unknown);

  const slowest = Math.max(0, ...p.latency.map((r) => r.p99_s || 0));
  fill("latency-table", "latency-none", p.latency, (r) =>
    `<tr data-stage="${escapeHtml(r.stage)}"><td>${escapeHtml(r.stage)}</td><td class="p99">${fmtSeconds(r.p99_s)}</td>${meter(r.p99_s, slowest, "slow")}</tr>`, unknown);

  fill("dead-table", "dead-none", p.dead_letters, (r) =>
    `<tr data-stage="${escapeHtml(r.stage)}" class="${r.per_s ? "alerting" : ""}"><td>${escapeHtml(r.stage)}</td><td>${fmtRate(r.per_s)}</td></tr>`, unknown);

  fill("deliveries-table", "deliveries-none", p.deliveries, (r) =>
    `<tr data-channel="${escapeHtml(r.channel)}" class="${r.per_s && ["failed", "dead_lettered"].includes(r.result) ? "alerting" : ""}"><td>${escapeHtml(r.channel)}</td><td>${escapeHtml(r.result)}</td><td>${fmtRate(r.per_s)}</td></tr>`, unknown);

  const banner = document.getElementById("pipeline-error");
  banner.hidden = !p.error;
  banner.textContent = p.error
    ? (s.targets ? `Some figures are missing: ${p.error}` : `${p.error}. Is Prometheus running? make up starts the local one, make status shows its state.`)
    : "";
  document.getElementById("source").textContent = `Prometheus ${p.source}`;
}

async function refresh() {
  clearTimeout(state.timer);
  const seq = ++state.seq;
  const status = document.getElementById("status");
  try {
    const answer = await askJson("/api/pipeline");  // a proxy's error page is not JSON: its status is shown
    if (!answer.ok) throw Object.assign(new Error(answer.body.error || `/api/pipeline: ${answer.reason}`), { status: answer.status });
    const body = answer.body;
    if (seq !== state.seq) return;
    render(body);
    state.renders += 1;
    document.body.dataset.renders = String(state.renders);
    status.className = body.error ? "status error" : "status";
    status.textContent = withNote(state, `${body.error ? "Prometheus unavailable · " : ""}updated ${new Date().toLocaleTimeString()}`);
    state.failures = 0;
    state.timer = setTimeout(refresh, state.refreshMs);
  } catch (err) {
    if (seq !== state.seq) return;
    readFailed(state, status, err, refresh);
  }
}

// The refresh interval from /api/config by common.js's readConfig: a 401 or 403 says to log in again and asks
// nothing more; another failure keeps the default, said in the status line.
async function start() {
  const { cfg, refused, note } = await readConfig();
  if (refused) {
    const status = document.getElementById("status");
    status.className = "status error";
    status.textContent = refused;
    return;
  }
  state.note = note;
  state.refreshMs = Math.max(setting(cfg, "refresh_ms", state.refreshMs), state.minRefreshMs);
  syncNav(state);
  refresh();
}

start();
