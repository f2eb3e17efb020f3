// Checkout Guard models page: champion vs challenger score distributions, their ROC-AUC on field labels,
// and the latest drift report per model. Polls /api/models and /api/drift; charts come from common.js.
"use strict";

const ROLES = ["champion", "challenger"];
// failures: failed reads in a row. After a 5xx or no answer the page asks again after common.js's retryWait (the
// refresh interval, then twice as long each time, up to 30 s); after a 4xx (a 401 once the login expired) it stops:
// asked again, it gets the same answer (stopped, until a read succeeds again after a window or store change).
const state = {
  minutes: 60, store: "", anchor: false, refreshMs: 3000, minRefreshMs: 10000, timer: null, renders: 0, seq: 0, failures: 0,
  stopped: false,
  note: "",  // said in the status line: the settings could not be read, the defaults are in use
};
const fmtAuc = (x) => (x === null || x === undefined ? "–" : x.toFixed(3));
const fmtPsi = (x) => (x === null || x === undefined ? "–" : x.toFixed(3));
// A drift report's hour as "YYYY-MM-DD hh:mm" on the live page's clock (common.js's clockText): the store's, its zone
// named ("2027-01-15 03:00 EST", the server's local_hour), else the viewer's (named in the status line); before, UTC
// whatever the live page showed. HTML-escaped; a time no date can hold (out of range) as it came, for its row only:
// toISOString threw on it, and nothing on the page was drawn.
const hourText = (local, ms) => {
  if (!ms) return "–";
  const text = clockText(local, ms);
  return escapeHtml(text === null ? String(ms) : `${text.slice(0, 16)}${text.slice(19)}`);
};

// Each role's figures are one model's: the model holding the role now, over every row it scored in the
// window as champion, as challenger or as a remote backend's fallback (after a promotion the roles' fields mix
// two models' scores); its fallback answers are counted apart.
const versionText = (r) => r.version || "none";
const withFallback = (n, fallback) => `${num.format(n)}${fallback ? ` (${num.format(fallback)} as fallback)` : ""}`;

function renderDistributions(d) {
  setKpi("kpi-champion", versionText(d.champion));
  setKpi("kpi-challenger", versionText(d.challenger));
  setKpi("kpi-scored", num.format(d.scored));
  // rows with a challenger score in the window, whoever was challenger (not the current one's rows as champion)
  setKpi("kpi-challenged", num.format(Object.values(d.challenger.versions).reduce((a, b) => a + b, 0)));
  document.querySelector("#kpi-champion .value").title = Object.keys(d.champion.versions).join(", ");
  document.querySelector("#kpi-challenger .value").title = Object.keys(d.challenger.versions).join(", ");
  const labels = d.bins.map((b) => String(b));
  const series = ROLES.map((role) => {
    const r = d[role], total = r.counts.reduce((a, b) => a + b, 0);
    return { key: role, name: `${role} ${versionText(r)}`, counts: r.counts, values: r.counts.map((c) => (total ? c / total : 0)) };
  });
  const top = (i) => (i === d.bins.length - 1 ? 1000 : d.bins[i] + d.bin_width - 1); // 1000 is in the last bin
  groupedBars(document.getElementById("chart-scores"), labels, series, {
    tip: (s, i) => `${s.name}, scores ${d.bins[i]}–${top(i)}: ${num.format(s.counts[i])} (${fmtPct(s.values[i])})`,
    yFormat: (v) => `${Math.round(v * 100)}%`,
  });
  const body = document.querySelector("#score-table tbody");
  body.innerHTML = "";
  for (const role of ROLES) {
    const r = d[role];
    const versions = Object.entries(r.versions).map(([v, n]) => `${escapeHtml(v)} (${num.format(n)})`).join(", ") || "–";
    body.insertAdjacentHTML("beforeend", `<tr data-role="${role}"><td><i class="swatch" style="background:${COLORS[role]}"></i>${role}</td>` +
      `<td class="versions">${versions}</td><td>${withFallback(r.rows, r.fallback_rows)}</td><td>${r.mean === null ? "–" : r.mean.toFixed(1)}</td></tr>`);
  }
}

// One horizontal bar per model from 0 to its AUC, the 95 % interval as a whisker, chance (0.5) dashed. On the
// rows both models scored when there are any (like for like), else each model's own rows.
function aucFigures(ev) {
  const p = ev.paired;
  if (p.rows && p.champion_auc !== null && p.challenger_auc !== null) {
    const f = (role) => ({ auc: p[`${role}_auc`], auc_low: p[`${role}_auc_low`], auc_high: p[`${role}_auc_high`], rows: p.rows, fraud: p.fraud });
    return { paired: true, champion: f("champion"), challenger: f("challenger") };
  }
  return { paired: false, champion: ev.champion, challenger: ev.challenger };
}

function aucBars(container, ev) {
  const f = frame(container, 110);
  const { svg, w, h } = f;
  const left = 78, right = w - 46, top = 10, rowH = (h - 30) / ROLES.length;
  const x = (v) => left + (right - left) * v;
  for (const v of [0, 0.5, 1]) {
    svg.appendChild(el("line", { class: v === 0.5 ? "chance" : "axis", x1: x(v), x2: x(v), y1: top - 4, y2: h - 18 }));
    svg.appendChild(el("text", { class: "tick", x: x(v), y: h - 6, "text-anchor": "middle" }, v === 0.5 ? "0.5 chance" : String(v)));
  }
  let drawn = 0;
  ROLES.forEach((role, i) => {
    const r = ev[role], y = top + i * rowH, bh = Math.min(22, rowH * 0.55);
    svg.appendChild(el("text", { class: "tick", x: left - 6, y: y + bh * 0.7, "text-anchor": "end" }, role));
    if (r.auc === null) {
      svg.appendChild(el("text", { class: "empty", x: left + 4, y: y + bh * 0.7 },
        r.rows ? "needs fraud and legitimate rows" : "no labelled rows"));
      return;
    }
    svg.appendChild(titled(el("rect", { class: "bar", "data-role": role, x: left, y, width: x(r.auc) - left, height: bh, fill: COLORS[role] }),
      `${role}: ROC-AUC ${fmtAuc(r.auc)} (95 % ${fmtAuc(r.auc_low)}–${fmtAuc(r.auc_high)}) on ${r.rows} rows, ${r.fraud} fraud`));
    const cy = y + bh / 2;
    svg.appendChild(el("line", { class: "whisker", x1: x(r.auc_low), x2: x(r.auc_high), y1: cy, y2: cy }));
    for (const v of [r.auc_low, r.auc_high]) svg.appendChild(el("line", { class: "whisker", x1: x(v), x2: x(v), y1: cy - 5, y2: cy + 5 }));
    svg.appendChild(el("text", { class: "value", x: right + 4, y: y + bh * 0.7 }, fmtAuc(r.auc)));
    drawn += 1;
  });
  return drawn;
}

function renderEvaluation(ev, labels) {
  setKpi("kpi-labelled", `${num.format(ev.labelled)} (${num.format(ev.fraud)})`);
  setKpi("kpi-labels", `${num.format(labels.total)} (${num.format(labels.fraud)})`);
  const shown = aucFigures(ev);
  aucBars(document.getElementById("chart-auc"), shown);
  const c = ev.champion, k = ev.challenger, p = ev.paired;
  const interval = (r) => (r.auc === null ? "–" : `${fmtAuc(r.auc_low)}–${fmtAuc(r.auc_high)}`);
  const both = (role) => ({ auc: p[`${role}_auc`], auc_low: p[`${role}_auc_low`], auc_high: p[`${role}_auc_high`] });
  // null: the model's training rows are not known here (remote backend, or its artifact not visible);
  // no version: there is no such model (no challenger), so nothing to leave out
  const leftOut = (r) => {
    if (!r.version) return "–";
    return r.in_training === null || r.in_training === undefined ? "unknown" : num.format(r.in_training);
  };
  const rows = [
    ["version", versionText(c), versionText(k)],
    ["labelled rows", withFallback(c.rows, c.fallback_rows), withFallback(k.rows, k.fallback_rows)],
    ["fraud rows", num.format(c.fraud), num.format(k.fraud)],
    ["own training rows left out", leftOut(c), leftOut(k)],
    ["ROC-AUC", fmtAuc(c.auc), fmtAuc(k.auc)],
    ["95 % interval", interval(c), interval(k)],
    ["rows both scored (fraud)", `${num.format(p.rows)} (${num.format(p.fraud)})`, `${num.format(p.rows)} (${num.format(p.fraud)})`],
    ["ROC-AUC, rows both scored", fmtAuc(p.champion_auc), fmtAuc(p.challenger_auc)],
    ["95 % interval, rows both scored", interval(both("champion")), interval(both("challenger"))],
  ];
  const body = document.querySelector("#auc-table tbody");
  body.innerHTML = "";
  for (const [name, a, b] of rows) {
    body.insertAdjacentHTML("beforeend", `<tr data-row="${escapeHtml(name)}"><td>${escapeHtml(name)}</td><td data-role="champion">${escapeHtml(a)}</td><td data-role="challenger">${escapeHtml(b)}</td></tr>`);
  }
  const notes = [];
  if (shown.paired) {
    notes.push(`Bars: the ${num.format(p.rows)} labelled rows both models scored and neither was trained on (${num.format(p.fraud)} fraud), like for like.`);
  } else if (c.rows && k.rows) {
    notes.push("Bars: each model on its own rows; no labelled row was scored by both with both classes, so the two figures are not like for like.");
  }
  if (c.in_training || k.in_training) {
    notes.push("A model is not judged on the labelled rows it was trained on: those are left out of its ROC-AUC and of the paired figures.");
  }
  if ((c.rows && c.in_training == null) || (k.rows && k.in_training == null)) {
    notes.push("For a model marked unknown, its training rows are not known here, so its figure may include them.");
  }
  const sources = Object.entries(labels.sources).map(([s, n]) => `${s} ${num.format(n.total)}`).join(", ");
  if (labels.total) notes.push(`Field labels in force: ${num.format(labels.total)} (${sources}).`);
  else notes.push("No field labels yet: ROC-AUC appears once verdicts arrive on the labels topic.");
  if (labels.truncated) notes.push(`Only the ${num.format(labels.read)} most recently decided labels are joined.`);
  if ([c, k, shown.champion].some((r) => r.rows && r.fraud < 10)) notes.push("Few fraud rows: the interval is wide, read the figures as a hint.");
  document.getElementById("auc-note").textContent = notes.join(" ");
}

function renderDrift(dr) {
  const body = document.querySelector("#drift-table tbody");
  body.innerHTML = "";
  document.getElementById("drift-none").hidden = dr.models.length > 0;
  let alerts = 0;
  for (const m of dr.models) {
    alerts += m.alerts_in_window;
    const worst = m.worst.map((f) => `<span class="psi ${f.band}" title="${escapeHtml(f.band)}">${escapeHtml(f.feature)} ${fmtPsi(f.psi)}</span>`).join(" ") || "–";
    const late = m.late_rows ? ` <span class="hint">(+${num.format(m.late_rows)} late)</span>` : "";
    const tr = document.createElement("tr");
    tr.dataset.model = m.model_version;
    if (m.alert) tr.className = "alerting";
    tr.innerHTML = `<td>${escapeHtml(m.model_version)}</td><td>${hourText(m.local_hour, m.hour_start)}</td><td>${num.format(m.rows || 0)}${late}</td>` +
      `<td><span class="psi ${m.score_band}">${fmtPsi(m.score_psi)}</span></td><td class="worst">${worst}</td>` +
      `<td class="flag">${m.alert ? '<span class="badge">ALERT</span>' : "no"}</td>` +
      `<td>${num.format(m.alerts_in_window)} / ${num.format(m.hours_in_window)}</td><td>${num.format(m.reference_rows || 0)}</td>`;
    body.appendChild(tr);
  }
  setKpi("kpi-drift", num.format(alerts));
}

async function refresh() {
  clearTimeout(state.timer);
  const seq = ++state.seq;
  const status = document.getElementById("status");
  try {
    const [models, drift] = await Promise.all([getJson(state, "/api/models"), getJson(state, "/api/drift")]);
    if (seq !== state.seq) return;
    renderDistributions(models.distributions);
    fillStores(state, models.distributions.all_stores, models.distributions.all_stores_more);
    renderEvaluation(models.evaluation, models.labels);
    renderDrift(drift);
    syncNav(state);
    state.renders += 1;
    document.body.dataset.renders = String(state.renders);
    status.className = "status";
    const end = chartClock(models.window);  // the live page's clock, named: the store's, else the viewer's
    status.textContent = withNote(state, `${models.window.store ? `store ${models.window.store} · ` : ""}window ends ${end} · updated ${new Date().toLocaleTimeString()}`);
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
