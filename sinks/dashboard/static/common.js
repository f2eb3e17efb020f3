// Shared by the dashboard's pages: colours, formatting, a tiny SVG chart toolkit (no libraries, no CDN),
// and the window / store / "follow latest event" controls every page has.
"use strict";

const COLORS = {
  champion: "#2f6fde", challenger: "#e07b26", stable: "#2e9e6b", moderate: "#e0a526", significant: "#d64541",
  APPROVE: "#2e9e6b", REVIEW: "#e0a526", BLOCK: "#d64541",
  MATCHED: "#7b5cd6", NO_MATCH: "#9fb4c8", NO_FACE: "#d5dde6", UNAVAILABLE: "#f0c7c5",
  revenue: "#2f6fde", prevented: "#d64541", p50: "#2e9e6b", p95: "#e0a526", p99: "#d64541",
};
const SVG_NS = "http://www.w3.org/2000/svg";

// ------------------------------------------------------------------ formatting

const num = new Intl.NumberFormat(undefined, { maximumFractionDigits: 0 });
// An amount in its currency's minor units, as the browser's ISO 4217 table has them (0.40 USD, 1,200 JPY,
// 0.125 KWD; two decimals for a code it does not know): whole units showed 0.40 USD as "0 USD".
const moneyFormats = new Map();
function fmtAmount(value, currency) {
  if (!moneyFormats.has(currency)) {
    let digits = 2;
    try {
      digits = new Intl.NumberFormat("en", { style: "currency", currency }).resolvedOptions().maximumFractionDigits;
    } catch (e) { /* not a well-formed currency code: two decimals */ }
    moneyFormats.set(currency, new Intl.NumberFormat(undefined, { minimumFractionDigits: digits, maximumFractionDigits: digits }));
  }
  return moneyFormats.get(currency).format(value);
}
// One amount with its currency code as text ("0.40 USD"; "" without an amount), for textContent or a caller that
// escapes: the alert and case pages show the amount of one transaction.
function fmtPrice(value, currency) {
  if (value === null || value === undefined) return "";
  return currency ? `${fmtAmount(value, currency)} ${currency}` : fmtAmount(value, "");
}
// Money is per currency ({USD: 1200, EUR: 80}, the window's most used currency first), never one sum:
// "1,200.00 USD · 80.00 EUR" (currencies with nothing left out; "0" when there is nothing at all). HTML-escaped: the
// currency codes come from the indexed documents and the store table puts this into innerHTML.
function fmtMoney(amounts) {
  const parts = Object.entries(amounts || {}).filter(([, v]) => v).map(([c, v]) => `${fmtAmount(v, c)} ${escapeHtml(c)}`);
  return parts.length ? parts.join(" · ") : "0";
}
const fmtPct = (x) => `${(100 * (x || 0)).toFixed(1)} %`;
const fmtMs = (x) => (x === null || x === undefined ? "–" : num.format(x));
// A time in epoch milliseconds as "YYYY-MM-DD hh:mm:ss" (UTC); null where it is no time a Date holds (out of range,
// not a number): toISOString throws on it, and took the whole render of the page with it. Null too outside the
// years 0000-9999, which toISOString writes with six digits and a sign ("+010000-01-01"), cut short by the slice.
function isoUtc(ms) {
  const d = new Date(ms);
  if (Number.isNaN(d.getTime())) return null;
  const year = d.getUTCFullYear();
  return year < 0 || year > 9999 ? null : d.toISOString().replace("T", " ").slice(0, 19);
}
// A time of an alert or case as its alert message gives it: the server's text in its store's zone (local_time,
// local_times: CG_ALERTS__STORE_TIMEZONES, else CG_ALERTS__TIMEZONE, zone named), else, for an answer without it, UTC
// text labelled "UTC"; a stored value that is no time (out of range) as it came, for its row only; no time, "".
function storeTime(local, ms) {
  if (local) return local;
  if (!ms) return "";
  const iso = isoUtc(ms);
  return iso ? `${iso} UTC` : String(ms);
}
// A time in epoch milliseconds as "YYYY-MM-DD hh:mm:ss" in the viewer's own zone (HERE_ZONE); null where isoUtc
// gives none.
function isoHere(ms) {
  if (isoUtc(ms) === null) return null;
  const d = new Date(ms), two = (n) => String(n).padStart(2, "0");
  const year = d.getFullYear();
  if (year < 0 || year > 9999) return null;
  return `${String(year).padStart(4, "0")}-${two(d.getMonth() + 1)}-${two(d.getDate())} ` +
    `${two(d.getHours())}:${two(d.getMinutes())}:${two(d.getSeconds())}`;
}
// The viewer's browser zone as IANA names it ("Australia/Adelaide"), "" where the browser does not say; sent with the
// live and models pages' reads (getJson) so the server starts the charts' buckets on it where no store's clock is
// theirs (a chain across zones, no store chosen): before, those started on UTC's hours, 04:30 and 10:30 in Adelaide.
const VIEWER_ZONE = (() => {
  try { return Intl.DateTimeFormat().resolvedOptions().timeZone || ""; } catch (e) { return ""; }
})();
const HERE_ZONE = VIEWER_ZONE || "your browser's zone";
// A time on the clock of the live and models pages, "YYYY-MM-DD hh:mm:ss": `local`, the time as the server gave it on
// the store's clock ("2027-01-15 03:00:00 EST", where the page has one: one store, or one zone for the chain), else
// the viewer's own zone (the status line names the clock, chartClock); null where no date holds the time.
function clockText(local, ms) {
  return (typeof local === "string" && local) || isoHere(ms);
}
// A chart's tick or tip for a point's time on that clock (clockText), shorter as the interval grows; before, always
// UTC. The server starts the buckets at the whole hours of a store's clock, or of the viewer's (VIEWER_ZONE); where
// it does not know the viewer's zone they start at UTC's, and minutes are kept for an hour's bucket that starts off
// the hour there (a zone 30 or 45 minutes off UTC). A time no date can hold is shown as it came (the charts put it in
// as text): it threw before, and no chart was drawn.
function fmtTime(t, intervalS, local) {
  const text = clockText(local, t);
  if (text === null) return String(t);
  const day = text.slice(5, 10), minute = text.slice(11, 16);
  const hour = minute.endsWith(":00") ? `${minute.slice(0, 2)}h` : minute;
  if (intervalS >= 86400) return minute === "00:00" ? day : `${day} ${hour}`;
  if (intervalS >= 3600) return `${day} ${hour}`;
  return text.slice(11, intervalS < 60 ? 19 : 16);
}
// The clock of the live and models pages, for their status lines: the window's end on it, named ("03:01:00 EST", the
// server's local_end), else on the viewer's own ("09:01:00 your time, Europe/Paris"); a time no date holds as it came.
function chartClock(w) {
  if (typeof w.local_end === "string" && w.local_end) return w.local_end.slice(11);
  const here = isoHere(w.end);
  return here === null ? String(w.end) : `${here.slice(11, 19)} your time, ${HERE_ZONE}`;
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
    span.innerHTML = `<i style="background:${COLORS[k] || "#999"}"></i>${escapeHtml(k.replace("_", " ").toLowerCase())}`;
    div.appendChild(span);
  }
  container.appendChild(div);
}

// Stacked bars over time: one <rect class="bar"> per non-zero segment.
function stackedBars(container, series, keys, intervalS) {
  const f = frame(container);
  const totals = series.map((p) => keys.reduce((s, k) => s + (p[k] || 0), 0));
  const max = niceMax(Math.max(0, ...totals));
  axes(f, max, series.map((p) => fmtTime(p.t, intervalS, p.local)));
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
      }), `${fmtTime(p.t, intervalS, p.local)} ${k}: ${num.format(v)}`));
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
  axes(f, max, series.map((p) => fmtTime(p.t, intervalS, p.local)));
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
        `${fmtTime(p.t, intervalS, p.local)} ${k}: ${compact(p[k])}${unit}`));
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


// Grouped bars over categories: for every label, one <rect class="bar"> per series with a non-zero value.
// series: [{ key, name, values }]; values are plotted as given (e.g. shares), tips say what they are.
function groupedBars(container, labels, series, { tip = (s, i) => `${s.name} ${labels[i]}: ${series[0].values[i]}`, yFormat = compact } = {}) {
  const f = frame(container);
  const all = series.flatMap((s) => s.values);
  const max = niceMax(Math.max(0, ...all));
  axes(f, max, labels);
  if (yFormat !== compact) {
    f.svg.querySelectorAll("text.tick[text-anchor='end']").forEach((t, i) => { t.textContent = yFormat(max * i / 4); });
  }
  if (!all.some((v) => v > 0)) empty(f);
  const { svg, w, h, m } = f;
  const slot = (w - m.l - m.r) / Math.max(labels.length, 1);
  const bw = slot * 0.8 / Math.max(series.length, 1);
  const plotH = h - m.t - m.b;
  let drawn = 0;
  series.forEach((s, k) => {
    s.values.forEach((v, i) => {
      if (!v) return;
      const bh = plotH * v / max;
      svg.appendChild(titled(el("rect", {
        class: "bar", "data-series": s.key, x: m.l + i * slot + slot * 0.1 + k * bw, y: h - m.b - bh,
        width: Math.max(bw - 1, 1), height: bh, fill: COLORS[s.key] || "#999",
      }), tip(s, i)));
      drawn += 1;
    });
  });
  const div = document.createElement("div");
  div.className = "legend";
  for (const s of series) {
    const span = document.createElement("span");
    span.innerHTML = `<i style="background:${COLORS[s.key] || "#999"}"></i>${escapeHtml(s.name)}`;
    div.appendChild(span);
  }
  container.appendChild(div);
  return drawn;
}

function escapeHtml(s) {
  return String(s ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
}

// ------------------------------------------------------------------ controls shared by the pages

function setKpi(id, text) { document.querySelector(`#${id} .value`).textContent = text; }

function pageQuery(state) {
  const q = new URLSearchParams({ minutes: state.minutes, anchor: state.anchor ? "latest" : "now" });
  if (state.store) q.set("store", state.store);
  return q;
}

// ------------------------------------------------------------------ reading the API

// A page that asks again after a failed read waits twice as long each time in a row, at most this long.
const RETRY_MAX_MS = 30000;
// The wait before the next try after `failures` failed reads in a row, the first try after `firstMs`.
const retryWait = (firstMs, failures) => Math.min(firstMs * 2 ** failures, RETRY_MAX_MS);
// Whether a failed read is worth asking again: a 4xx says the request itself is wrong (a malformed id, a login that
// may not read it, a filter the API refuses) and asked again gets the same answer; a 5xx, no answer at all (status 0)
// or an answer that is not JSON may pass (the dashboard, OpenSearch or a proxy away for a while).
const worthRetrying = (status) => !(status >= 400 && status < 500);
// What a page that stopped asking after a 4xx says: a 401 or 403 (the login expired or was changed, or may not read
// this) asks the person to log in again, which only a reload of the page does; another 4xx (a 400: a window the API
// refuses) shows its reason and when the page asks again.
function refusedText(status, reason, until = "the page is reloaded") {
  return status === 401 || status === 403
    ? `${reason} — not refreshed again: log in again (reload the page)`
    : `${reason} — not refreshed again until ${until}`;
}

// A page's failed read `err` ({ status, message }: every page's, state.refreshMs its first wait, state.failures the
// failed reads in a row, state.timer its next read), shown in `status`: after a 4xx the page stops asking
// (refusedText, `until` saying what asks again) and state.stopped says so, for what else would ask again (a resize,
// the case page's verdict), else it asks again by `refresh` after retryWait, the status line saying when. One next
// read only: one set before (by a read answered while this one was on its way) is dropped.
function readFailed(state, status, err, refresh, until) {
  status.className = "status error";
  if (!worthRetrying(err.status)) {
    state.stopped = true;
    status.textContent = refusedText(err.status, err.message, until);
    return;
  }
  const wait = retryWait(state.refreshMs, state.failures);
  state.failures += 1;
  status.textContent = `${err.message}; asking again in ${Math.round(wait / 1000)} s`;
  clearTimeout(state.timer);
  state.timer = setTimeout(refresh, wait);
}

// One request for JSON: { ok, status, body, reason }. status is 0 where nothing answered; body is {} where the
// answer is not JSON (a proxy's HTML error page), which is then not ok even with a 2xx; reason is the answer's
// `error`, or what happened ("HTTP 502 Bad Gateway"), for the page to show.
async function askJson(url, init = {}) {
  let r;
  try {
    r = await fetch(url, { cache: "no-store", ...init });
  } catch (e) {
    return { ok: false, status: 0, body: {}, reason: `the dashboard did not answer (${e.message})` };
  }
  const body = await r.json().catch(() => null);
  const reason = (body && body.error) || `HTTP ${r.status} ${r.statusText || ""}`.trim() + (body || !r.ok ? "" : ": the answer is not JSON");
  return { ok: r.ok && body !== null, status: r.status, body: body || {}, reason };
}

// The live and models pages' read of `path` for the page's window and store, and the viewer's zone for the charts'
// buckets (VIEWER_ZONE; not in the links between pages, which another viewer may open); a failure throws with the
// answer's `error` or its status ("/api/overview: HTTP 502 Bad Gateway" for a proxy's page that is not JSON), and the
// status as `status` (0 where nothing answered) for the page to choose between asking again and stopping.
async function getJson(state, path) {
  const query = pageQuery(state);
  if (VIEWER_ZONE) query.set("viewer_zone", VIEWER_ZONE);
  const answer = await askJson(`${path}?${query}`);
  if (!answer.ok) throw Object.assign(new Error(answer.body.error || `${path}: ${answer.reason}`), { status: answer.status });
  return answer.body;
}

// The page's settings from /api/config, read through askJson: { cfg, refused, note }. A 401 or 403 (the login expired
// or was changed) is `refused`, the log-in-again text for the status line, and the page asks nothing more; any other
// failure keeps the page's defaults and `note` says so, for the status line: a bare fetch took both for the defaults
// without a word, and a page with an expired login went on asking.
async function readConfig() {
  const answer = await askJson("/api/config");
  if (answer.ok) return { cfg: answer.body, refused: null, note: "" };
  const reason = `/api/config: ${answer.reason}`;
  if (answer.status === 401 || answer.status === 403) return { cfg: null, refused: refusedText(answer.status, reason), note: "" };
  return { cfg: null, refused: null, note: `settings not read (${reason}): default refresh and window` };
}

// A number setting of /api/config (refresh_ms, window_minutes), or `fallback`, the page's default, where the answer
// has none or no positive number there (a proxy's {} or an older dashboard's answer): the page took the missing
// refresh_ms for its interval, NaN, and asked again at once, over and over.
const setting = (cfg, key, fallback) => (cfg && Number.isFinite(cfg[key]) && cfg[key] > 0 ? cfg[key] : fallback);

// The status line's text after a good refresh, with the note of settings not read, if any.
const withNote = (state, text) => (state.note ? `${text} · ${state.note}` : text);

// The links between the pages carry the window, store and anchor along.
function syncNav(state) {
  document.querySelectorAll("nav.pages a").forEach((a) => {
    a.href = `${a.getAttribute("data-path")}?${pageQuery(state)}`;
  });
}

// Reads ?minutes=&store=&anchor= and the config, wires the controls; refresh() redraws the page. False where the
// config was refused (a 401 or 403): the status line says to log in again and the page must not start refreshing.
async function initControls(state, refresh) {
  const params = new URLSearchParams(location.search);
  const { cfg, refused, note } = await readConfig();
  if (refused) {
    const status = document.getElementById("status");
    status.className = "status error";
    status.textContent = refused;
    return false;
  }
  state.note = note;
  state.refreshMs = Math.max(setting(cfg, "refresh_ms", state.refreshMs), state.minRefreshMs || 0);
  state.minutes = setting(cfg, "window_minutes", state.minutes);
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
  // A resize redraws by reading again, but only a page that is refreshing as usual: one stopped by a 4xx would ask
  // what it was refused (only a window or store change, or a reload, asks again), and one waiting out a failure
  // would ask ahead of its growing wait.
  let resizeTimer;
  const redraw = () => { if (!state.stopped && !state.failures) refresh(); };
  window.addEventListener("resize", () => { clearTimeout(resizeTimer); resizeTimer = setTimeout(redraw, 200); });
  return true;
}

// Adds stores to the store picker as they appear, and shows the one chosen (also one the picker could not list,
// chosen by ?store=). `more`: stores past the picker's size, said in a last, disabled entry.
function fillStores(state, ids, more = 0) {
  const select = document.getElementById("store");
  const known = new Set([...select.options].map((opt) => opt.value));
  for (const id of [...ids, state.store].filter(Boolean)) {
    if (!known.has(id)) { select.add(new Option(id, id)); known.add(id); }
  }
  let note = select.querySelector("option.more");
  if (more > 0 && !note) { note = Object.assign(new Option("", ""), { className: "more", disabled: true }); select.add(note); }
  if (note) {
    note.textContent = more > 0 ? `+ ${num.format(more)} more stores (?store=<id> in the URL)` : "";
    note.hidden = !(more > 0);
    select.appendChild(note);  // stays last
  }
  select.value = state.store;
}
