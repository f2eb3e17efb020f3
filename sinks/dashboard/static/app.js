// Checkout Guard live dashboard: polls /api/* and draws every chart as plain SVG (common.js).
"use strict";

const OUTCOMES = ["APPROVE", "REVIEW", "BLOCK"];
const FACE_STATUSES = ["MATCHED", "NO_MATCH", "NO_FACE", "UNAVAILABLE"];
// failures: failed reads in a row. After a 5xx or no answer the page asks again after common.js's retryWait (the
// refresh interval, then twice as long each time, up to 30 s); after a 4xx (a 401 once the login expired) it stops:
// asked again, it gets the same answer (stopped, until a read succeeds again after a window or store change).
const state = {
  minutes: 60, store: "", anchor: false, refreshMs: 3000, timer: null, renders: 0, seq: 0, failures: 0, stopped: false,
  note: "",
};

// Horizontal stacked bars per store: <rect class="bar"> per segment; clicking a store focuses on it.
function storeBars(container, stores) {
  container.innerHTML = "";
  const h = Math.max(60, 26 * stores.length + 10);
  container.style.height = `${Math.min(h, 320)}px`;
  const f = frame(container, 40);
  if (!stores.length) { empty(f); return 0; }
  const { svg, w } = f;
  const max = niceMax(Math.max(...stores.map((s) => s.count)));
  const left = 70, bh = Math.min(18, (f.h - 10) / stores.length - 6);
  stores.forEach((s, i) => {
    const y = 5 + i * (f.h - 10) / stores.length;
    svg.appendChild(el("text", { class: "tick", x: left - 6, y: y + bh * 0.75, "text-anchor": "end" }, s.store_id));
    let x = left;
    for (const k of OUTCOMES) {
      const bw = (w - left - 50) * (s[k] || 0) / max;
      if (!bw) continue;
      const rect = titled(el("rect", { class: "bar", x, y, width: bw, height: bh, fill: COLORS[k] }),
        `${s.store_id} ${k}: ${num.format(s[k])}`);
      rect.addEventListener("click", () => focusStore(s.store_id));
      svg.appendChild(rect);
      x += bw;
    }
    svg.appendChild(el("text", { class: "tick", x: x + 4, y: y + bh * 0.75 }, num.format(s.count)));
  });
  return stores.length;
}

// A money KPI: the window's most used currency as the value, the others listed under it (never one sum).
function moneyKpi(id, amounts, currencies) {
  const [first, ...others] = currencies.length ? currencies : Object.keys(amounts);
  setKpi(id, first ? fmtPrice(amounts[first] || 0, first) : "0");
  const rest = Object.fromEntries(others.map((c) => [c, amounts[c] || 0]));
  document.querySelector(`#${id} .more`).textContent = Object.values(rest).some((v) => v) ? `+ ${fmtMoney(rest)}` : "";
}

// Sales and value prevented over time: one line per currency each ("revenue USD", "prevented EUR").
const REVENUE_SHADES = ["#2f6fde", "#6f9be8", "#a9c3f1", "#1c4494"];
const PREVENTED_SHADES = ["#d64541", "#e5817e", "#f0b6b4", "#8f2a27"];
function salesSeries(series, currencies) {
  const keys = [];
  currencies.forEach((c, i) => {
    for (const [name, shades] of [["revenue", REVENUE_SHADES], ["prevented", PREVENTED_SHADES]]) {
      const key = `${name} ${c}`;
      COLORS[key] = shades[i % shades.length];
      keys.push(key);
    }
  });
  const points = series.map((p) => {
    const q = { t: p.t, local: p.local };  // the point's time on the store's clock, where the server gave it
    for (const c of currencies) { q[`revenue ${c}`] = p.revenue[c] || 0; q[`prevented ${c}`] = p.prevented[c] || 0; }
    return q;
  });
  return { series: points, keys };
}

// ------------------------------------------------------------------ page

function focusStore(store) {
  state.store = state.store === store ? "" : store;
  document.getElementById("store").value = state.store;
  refresh();
}

function renderOverview(o) {
  const t = o.totals, interval = o.window.interval_s;
  setKpi("kpi-transactions", num.format(t.transactions));
  setKpi("kpi-rate", o.rates.per_minute.toFixed(1));
  setKpi("kpi-block-rate", fmtPct(o.rates.block_rate));
  setKpi("kpi-review-rate", fmtPct(o.rates.review_rate));
  moneyKpi("kpi-revenue", t.revenue, o.currencies);
  moneyKpi("kpi-prevented", t.value_prevented, o.currencies);
  setKpi("kpi-latency", fmtMs(o.latency.ttdf_ms.p99));
  stackedBars(document.getElementById("chart-outcomes"), o.series, OUTCOMES, interval);
  donut(document.getElementById("chart-donut"), o.outcomes, OUTCOMES);
  const sales = salesSeries(o.series, o.currencies);
  lines(document.getElementById("chart-sales"), sales.series, sales.keys, interval);
  lines(document.getElementById("chart-latency"), o.series, ["p50", "p95", "p99"], interval, " ms");
  const lat = document.querySelector("#latency-table tbody");
  lat.innerHTML = "";
  for (const [field, label] of [["ttdf_ms", "event → decision"], ["proc_time_ms", "event → model"], ["model_time_ms", "model call"]]) {
    const p = o.latency[field];
    lat.insertAdjacentHTML("beforeend", `<tr><td>${label}</td><td>${fmtMs(p.p50)}</td><td>${fmtMs(p.p95)}</td><td>${fmtMs(p.p99)}</td></tr>`);
  }
  storeBars(document.getElementById("chart-stores"), o.stores);
  const body = document.querySelector("#store-table tbody");
  body.innerHTML = "";
  for (const s of o.stores) {
    const tr = document.createElement("tr");
    if (s.store_id === state.store) tr.className = "selected";
    tr.innerHTML = `<td>${escapeHtml(s.store_id)}</td><td>${num.format(s.count)}</td><td>${num.format(s.APPROVE)}</td>` +
      `<td>${num.format(s.REVIEW)}</td><td>${num.format(s.BLOCK)}</td><td>${fmtMoney(s.revenue)}</td>` +
      `<td>${fmtMoney(s.prevented)}</td><td>${fmtMs(s.ttdf_p99)}</td>`;
    tr.addEventListener("click", () => focusStore(s.store_id));
    body.appendChild(tr);
  }
  const more = o.stores_more;
  const note = document.getElementById("stores-more");
  note.hidden = !(more.stores > 0);
  note.textContent = more.stores > 0
    ? `${num.format(more.stores)} more stores with ${num.format(more.transactions)} transactions are not listed ` +
      `(the ${num.format(o.stores.length)} busiest are); the totals above include them.`
    : "";
  fillStores(state, o.all_stores, o.all_stores_more);
}

function renderFaces(f, intervalS) {
  setKpi("kpi-faces", num.format(f.statuses.MATCHED || 0));
  stackedBars(document.getElementById("chart-faces"), f.series, FACE_STATUSES, intervalS);
}

function renderAlerts(a) {
  setKpi("kpi-alerts", num.format(a.total));
  const box = document.getElementById("alerts");
  box.innerHTML = a.alerts.length ? "" : '<p class="none">No alerts in this window.</p>';
  for (const x of a.alerts) {
    const card = document.createElement("a");  // the same page alert messages link to
    card.className = `alert ${x.kind}`;
    card.href = `/alerts/${encodeURIComponent(x.alert_id)}`;
    // its time as its message gave it, in its store's zone (the server's local_time), else UTC text labelled so; a
    // time no date can hold (out of range) as it came, escaped, for this alert only: it threw, and nothing was drawn
    const when = escapeHtml(storeTime(x.local_time, x.event_time));
    const amount = x.amount != null ? ` · ${fmtAmount(x.amount, x.currency || "")} ${escapeHtml(x.currency || "")}` : "";
    const img = x.thumbnail
      ? `<img class="thumb" alt="snapshot" loading="lazy" src="${escapeHtml(x.thumbnail)}">`
      : '<div class="noimg">no snapshot</div>';
    card.innerHTML = `${img}<div><div class="kind">${escapeHtml(x.kind.replace(/_/g, " "))} · ${escapeHtml(x.severity)}</div>` +
      `<div class="meta">${when} · store ${escapeHtml(x.store_id)}${x.lane_id ? ` lane ${escapeHtml(x.lane_id)}` : ""}${amount}</div>` +
      `<div class="summary">${escapeHtml(x.summary)}</div></div>`;
    const image = card.querySelector("img");
    if (image) image.addEventListener("error", () => image.replaceWith(Object.assign(document.createElement("div"), { className: "noimg", textContent: "snapshot purged" })));
    box.appendChild(card);
  }
}

async function refresh() {
  clearTimeout(state.timer);
  const seq = ++state.seq;  // an answer to an older request (e.g. before a store was chosen) is dropped
  const status = document.getElementById("status");
  try {
    const [overview, alerts, faces] = await Promise.all(
      ["/api/overview", "/api/alerts", "/api/faces"].map((path) => getJson(state, path)));
    if (seq !== state.seq) return;
    renderOverview(overview);
    renderAlerts(alerts);
    renderFaces(faces, overview.window.interval_s);
    syncNav(state);
    state.renders += 1;
    document.body.dataset.renders = String(state.renders);
    status.className = "status";
    const end = chartClock(overview.window);  // the charts' clock, named: the store's, else the viewer's
    status.textContent = withNote(state, `${overview.window.store ? `store ${overview.window.store} · ` : ""}window ends ${end} · updated ${new Date().toLocaleTimeString()}`);
    state.failures = 0;
    state.stopped = false;
    state.timer = setTimeout(refresh, state.refreshMs);
  } catch (err) {
    if (seq !== state.seq) return;
    readFailed(state, status, err, refresh, "the window or store changes or the page is reloaded");
  }
}

async function start() {
  if (!(await initControls(state, refresh))) return;  // a 401 or 403: the status line says to log in again
  syncNav(state);
  refresh();
}

start();
