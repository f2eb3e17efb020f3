// Checkout Guard live dashboard: polls /api/* and draws every chart as plain SVG (no libraries, no CDN).
"use strict";

const COLORS = {
  APPROVE: "#2e9e6b", REVIEW: "#e0a526", BLOCK: "#d64541",
  MATCHED: "#7b5cd6", NO_MATCH: "#9fb4c8", NO_FACE: "#d5dde6", UNAVAILABLE: "#f0c7c5",
  revenue: "#2f6fde", prevented: "#d64541", p50: "#2e9e6b", p95: "#e0a526", p99: "#d64541",
};
const OUTCOMES = ["APPROVE", "REVIEW", "BLOCK"];
const FACE_STATUSES = ["MATCHED", "NO_MATCH", "NO_FACE", "UNAVAILABLE"];
const SVG_NS = "http://www.w3.org/2000/svg";
const state = { minutes: 60, store: "", anchor: false, refreshMs: 3000, timer: null, renders: 0, seq: 0 };

// ------------------------------------------------------------------ formatting

const num = new Intl.NumberFormat(undefined, { maximumFractionDigits: 0 });
const money = new Intl.NumberFormat(undefined, { maximumFractionDigits: 0 });
const fmtPct = (x) => `${(100 * (x || 0)).toFixed(1)} %`;
const fmtMs = (x) => (x === null || x === undefined ? "–" : num.format(x));
function fmtTime(t, intervalS) {
  const d = new Date(t);
  if (intervalS >= 86400) return d.toISOString().slice(5, 10);
  if (intervalS >= 3600) return `${d.toISOString().slice(5, 10)} ${d.toISOString().slice(11, 13)}h`;
  return d.toISOString().slice(11, intervalS < 60 ? 19 : 16);
}
function compact(v) {
  const a = Math.abs(v);
  if (a >= 1e6) return `${(v / 1e6).toFixed(1)}M`;
  if (a >= 1e3) return `${(v / 1e3).toFixed(a >= 1e4 ? 0 : 1)}k`;
  return `${Math.round(v * 10) / 10}`;
}

// ------------------------------------------------------------------ tiny SVG toolkit

function el(tag, attrs = {}, text) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}
function titled(node, text) { node.appendChild(el("title", {}, text)); return node; }

function frame(container, minHeight = 160) {
  container.innerHTML = "";
  const w = Math.max(container.clientWidth, 240), h = Math.max(container.clientHeight, minHeight);
  const svg = el("svg", { viewBox: `0 0 ${w} ${h}`, preserveAspectRatio: "none", role: "img" });
  container.appendChild(svg);
  return { svg, w, h, m: { l: 44, r: 8, t: 8, b: 22 } };
}

function niceMax(v) {
  if (v <= 0) return 1;
  const p = 10 ** Math.floor(Math.log10(v)), f = v / p;
  return (f <= 1 ? 1 : f <= 2 ? 2 : f <= 5 ? 5 : 10) * p;
}

function axes(f, maxY, labels) {
  const { svg, w, h, m } = f;
  for (let i = 0; i <= 4; i++) {
    const y = m.t + (h - m.t - m.b) * (1 - i / 4);
    svg.appendChild(el("line", { class: "axis", x1: m.l, x2: w - m.r, y1: y, y2: y }));
    svg.appendChild(el("text", { class: "tick", x: m.l - 4, y: y + 3, "text-anchor": "end" }, compact(maxY * i / 4)));
  }
  const step = Math.max(1, Math.ceil(labels.length / 6));
  labels.forEach((label, i) => {
    if (i % step) return;
    const x = m.l + (w - m.l - m.r) * (i + 0.5) / labels.length;
    svg.appendChild(el("text", { class: "tick", x, y: h - 6, "text-anchor": "middle" }, label));
  });
}

function empty(f, text = "no data in this window") {
  f.svg.appendChild(el("text", { class: "empty", x: f.w / 2, y: f.h / 2, "text-anchor": "middle" }, text));
}

function legend(container, keys) {
  const div = document.createElement("div");
  div.className = "legend";
  for (const k of keys) {
    const span = document.createElement("span");
    span.innerHTML = `<i style="background:${COLORS[k] || "#999"}"></i>${k.replace("_", " ").toLowerCase()}`;
    div.appendChild(span);
  }
  container.appendChild(div);
}

// Stacked bars over time: one <rect class="bar"> per non-zero segment.
function stackedBars(container, series, keys, intervalS) {
  const f = frame(container);
  const totals = series.map((p) => keys.reduce((s, k) => s + (p[k] || 0), 0));
  const max = niceMax(Math.max(0, ...totals));
  axes(f, max, series.map((p) => fmtTime(p.t, intervalS)));
  if (!totals.some((t) => t > 0)) empty(f);
  const { svg, w, h, m } = f;
  const bw = (w - m.l - m.r) / Math.max(series.length, 1);
  const plotH = h - m.t - m.b;
  series.forEach((p, i) => {
    let y = h - m.b;
    for (const k of keys) {
      const v = p[k] || 0;
      if (!v) continue;
      const bh = plotH * v / max;
      y -= bh;
      svg.appendChild(titled(el("rect", {
        class: "bar", x: m.l + i * bw + bw * 0.1, y, width: Math.max(bw * 0.8, 1), height: bh, fill: COLORS[k],
      }), `${fmtTime(p.t, intervalS)} ${k}: ${num.format(v)}`));
    }
  });
  legend(container, keys);
  return totals.filter((t) => t > 0).length;
}

// Lines over time: one <path class="line"> per key that has at least one value.
function lines(container, series, keys, intervalS, unit = "") {
  const f = frame(container);
  const values = series.flatMap((p) => keys.map((k) => p[k]).filter((v) => v !== null && v !== undefined));
  const max = niceMax(Math.max(0, ...values));
  axes(f, max, series.map((p) => fmtTime(p.t, intervalS)));
  if (!values.some((v) => v > 0)) empty(f);
  const { svg, w, h, m } = f;
  const x = (i) => m.l + (w - m.l - m.r) * (i + 0.5) / Math.max(series.length, 1);
  const y = (v) => h - m.b - (h - m.t - m.b) * v / max;
  let drawn = 0;
  for (const k of keys) {
    let d = "", pen = "M";
    series.forEach((p, i) => {
      const v = p[k];
      if (v === null || v === undefined) { pen = "M"; return; }
      d += `${pen}${x(i).toFixed(1)},${y(v).toFixed(1)} `;
      pen = "L";
    });
    if (!d) continue;
    svg.appendChild(titled(el("path", { class: "line", d, fill: "none", stroke: COLORS[k], "stroke-width": 2 }), k));
    series.forEach((p, i) => {
      if (p[k] === null || p[k] === undefined) return;
      svg.appendChild(titled(el("circle", { class: "dot", cx: x(i), cy: y(p[k]), r: 2.2, fill: COLORS[k] }),
        `${fmtTime(p.t, intervalS)} ${k}: ${compact(p[k])}${unit}`));
    });
    drawn += 1;
  }
  legend(container, keys);
  return drawn;
}

// Donut of counts: one <path class="slice"> per non-zero key.
function donut(container, counts, keys) {
  const f = frame(container);
  const total = keys.reduce((s, k) => s + (counts[k] || 0), 0);
  const { svg, w, h } = f;
  const cx = w / 2, cy = h / 2, r = Math.min(w, h) / 2 - 8, r0 = r * 0.58;
  if (!total) { empty(f); return 0; }
  let a0 = -Math.PI / 2, slices = 0;
  for (const k of keys) {
    const v = counts[k] || 0;
    if (!v) continue;
    const a1 = a0 + 2 * Math.PI * v / total - (v === total ? 1e-6 : 0);
    const big = a1 - a0 > Math.PI ? 1 : 0;
    const p = (rad, a) => `${(cx + rad * Math.cos(a)).toFixed(2)},${(cy + rad * Math.sin(a)).toFixed(2)}`;
    const d = `M${p(r, a0)} A${r},${r} 0 ${big} 1 ${p(r, a1)} L${p(r0, a1)} A${r0},${r0} 0 ${big} 0 ${p(r0, a0)} Z`;
    svg.appendChild(titled(el("path", { class: "slice", d, fill: COLORS[k] }),
      `${k}: ${num.format(v)} (${(100 * v / total).toFixed(1)} %)`));
    a0 = a1;
    slices += 1;
  }
  svg.appendChild(el("text", { x: cx, y: cy - 2, "text-anchor": "middle", "font-size": 20, "font-weight": 600 },
    num.format(total)));
  svg.appendChild(el("text", { class: "tick", x: cx, y: cy + 14, "text-anchor": "middle" }, "decisions"));
  legend(container, keys);
  return slices;
}

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

// ------------------------------------------------------------------ page

function setKpi(id, text) { document.querySelector(`#${id} .value`).textContent = text; }

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
  setKpi("kpi-revenue", money.format(t.revenue));
  setKpi("kpi-prevented", money.format(t.value_prevented));
  setKpi("kpi-latency", fmtMs(o.latency.ttdf_ms.p99));
  stackedBars(document.getElementById("chart-outcomes"), o.series, OUTCOMES, interval);
  donut(document.getElementById("chart-donut"), o.outcomes, OUTCOMES);
  lines(document.getElementById("chart-sales"), o.series, ["revenue", "prevented"], interval);
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
      `<td>${num.format(s.REVIEW)}</td><td>${num.format(s.BLOCK)}</td><td>${money.format(s.revenue)}</td>` +
      `<td>${money.format(s.prevented)}</td><td>${fmtMs(s.ttdf_p99)}</td>`;
    tr.addEventListener("click", () => focusStore(s.store_id));
    body.appendChild(tr);
  }
  const select = document.getElementById("store");
  const known = new Set([...select.options].map((opt) => opt.value));
  for (const id of o.all_stores) {
    if (!known.has(id)) select.add(new Option(id, id));
  }
  select.value = state.store;
}

function renderFaces(f, intervalS) {
  setKpi("kpi-faces", num.format(f.statuses.MATCHED || 0));
  stackedBars(document.getElementById("chart-faces"), f.series, FACE_STATUSES, intervalS);
}

function escapeHtml(s) {
  return String(s ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
}

function renderAlerts(a) {
  setKpi("kpi-alerts", num.format(a.total));
  const box = document.getElementById("alerts");
  box.innerHTML = a.alerts.length ? "" : '<p class="none">No alerts in this window.</p>';
  for (const x of a.alerts) {
    const card = document.createElement("a");  // the same page alert messages link to
    card.className = `alert ${x.kind}`;
    card.href = `/alerts/${encodeURIComponent(x.alert_id)}`;
    const when = new Date(x.event_time).toISOString().replace("T", " ").slice(0, 19);
    const amount = x.amount != null ? ` · ${money.format(x.amount)} ${escapeHtml(x.currency || "")}` : "";
    const img = x.thumbnail
      ? `<img class="thumb" alt="snapshot" loading="lazy" src="${escapeHtml(x.thumbnail)}">`
      : '<div class="noimg">no snapshot</div>';
    card.innerHTML = `${img}<div><div class="kind">${escapeHtml(x.kind.replace(/_/g, " "))} · ${escapeHtml(x.severity)}</div>` +
      `<div class="meta">${when} UTC · store ${escapeHtml(x.store_id)}${x.lane_id ? ` lane ${escapeHtml(x.lane_id)}` : ""}${amount}</div>` +
      `<div class="summary">${escapeHtml(x.summary)}</div></div>`;
    const image = card.querySelector("img");
    if (image) image.addEventListener("error", () => image.replaceWith(Object.assign(document.createElement("div"), { className: "noimg", textContent: "snapshot purged" })));
    box.appendChild(card);
  }
}

async function getJson(path) {
  const q = new URLSearchParams({ minutes: state.minutes, anchor: state.anchor ? "latest" : "now" });
  if (state.store) q.set("store", state.store);
  const r = await fetch(`${path}?${q}`, { cache: "no-store" });
  const body = await r.json();
  if (!r.ok) throw new Error(body.error || `${path}: HTTP ${r.status}`);
  return body;
}

async function refresh() {
  clearTimeout(state.timer);
  const seq = ++state.seq;  // an answer to an older request (e.g. before a store was chosen) is dropped
  const status = document.getElementById("status");
  try {
    const [overview, alerts, faces] = await Promise.all([getJson("/api/overview"), getJson("/api/alerts"), getJson("/api/faces")]);
    if (seq !== state.seq) return;
    renderOverview(overview);
    renderAlerts(alerts);
    renderFaces(faces, overview.window.interval_s);
    state.renders += 1;
    document.body.dataset.renders = String(state.renders);
    status.className = "status";
    const end = new Date(overview.window.end).toISOString().slice(11, 19);
    status.textContent = `${overview.window.store ? `store ${overview.window.store} · ` : ""}window ends ${end} UTC · updated ${new Date().toLocaleTimeString()}`;
  } catch (err) {
    if (seq !== state.seq) return;
    status.className = "status error";
    status.textContent = `${err.message} — retrying`;
  } finally {
    if (seq === state.seq) state.timer = setTimeout(refresh, state.refreshMs);
  }
}

async function start() {
  const params = new URLSearchParams(location.search);
  try {
    const cfg = await (await fetch("/api/config")).json();
    state.refreshMs = cfg.refresh_ms;
    state.minutes = cfg.window_minutes;
  } catch (err) { /* defaults */ }
  state.minutes = Number(params.get("minutes") || state.minutes);
  state.store = params.get("store") || "";
  state.anchor = params.get("anchor") === "latest";
  const win = document.getElementById("window");
  if (![...win.options].some((o) => Number(o.value) === state.minutes)) win.add(new Option(`${state.minutes} min`, state.minutes));
  win.value = String(state.minutes);
  document.getElementById("anchor").checked = state.anchor;
  win.addEventListener("change", () => { state.minutes = Number(win.value); refresh(); });
  document.getElementById("store").addEventListener("change", (e) => { state.store = e.target.value; refresh(); });
  document.getElementById("anchor").addEventListener("change", (e) => { state.anchor = e.target.checked; refresh(); });
  let resizeTimer;
  window.addEventListener("resize", () => { clearTimeout(resizeTimer); resizeTimer = setTimeout(refresh, 200); });
  refresh();
}

start();
