// The page alert messages link to: one alert, its snapshot and the decision on its transaction.
"use strict";

// The alert's time as its message gave it, in its store's zone (the server's local_time), else as UTC text.
const alertTime = (a) => storeTime(a.local_time, a.event_time);

// Asking for the alert again: only after a 5xx or no answer, 3 s then twice as long each time in a row (common.js's
// readFailed); a 4xx stops it with the reason shown, since asked again it gets the same answer.
const reading = { refreshMs: 3000, failures: 0, timer: null, stopped: false };

function rows(tbody, pairs) {
  tbody.innerHTML = "";
  for (const [label, value] of pairs) {
    if (value === null || value === undefined || value === "") continue;
    if (typeof value === "object" && !Object.keys(value).length) continue;  // [] and {}
    const shown = Array.isArray(value) ? value.join(", ") : typeof value === "object"
      ? Object.entries(value).map(([k, v]) => `${k} ${Math.round(v * 100) / 100}`).join(", ") : value;
    tbody.insertAdjacentHTML("beforeend", `<tr><th>${escapeHtml(label)}</th><td data-field="${escapeHtml(label)}">${escapeHtml(shown)}</td></tr>`);
  }
}

// The id in the page's address; null where it is not valid URL encoding (a link cut short at a "%" escape, say):
// decodeURIComponent throws on it, and the page sat at "loading…" with no word.
function pathId() {
  try {
    return decodeURIComponent(location.pathname.split("/").pop());
  } catch (e) {
    return null;
  }
}

async function load() {
  const id = pathId();
  const status = document.getElementById("status");
  if (id === null) {
    status.className = "status error";
    status.textContent = "This address does not name an alert: its id has a malformed % escape (a link cut short or mangled?). Open the alert from its message again.";
    return;
  }
  const answer = await askJson(`/api/alerts/${encodeURIComponent(id)}`);
  if (!answer.ok) {
    // a 401 or 403 (the login expired or was changed) says to log in again, which only a reload of the page does
    readFailed(reading, status, { status: answer.status, message: `${id}: ${answer.reason}` }, load);
    return;
  }
  reading.failures = 0;
  const body = answer.body;
  const a = body.alert, t = body.transaction;
  document.title = `Checkout Guard — ${a.kind} ${a.alert_id}`;
  document.getElementById("alert-title").textContent = `${a.kind.replace(/_/g, " ")} · ${a.severity}`;
  rows(document.querySelector("#alert-facts tbody"), [
    ["alert", a.alert_id], ["time", alertTime(a)], ["store", a.store_id], ["lane", a.lane_id],
    ["transaction", a.transaction_id], ["amount", fmtPrice(a.amount, a.currency)],
    ["risk score", a.risk_score], ["reasons", a.reasons], ["subject", a.subject_id], ["category", a.category],
    ["similarity", a.similarity], ["match threshold", a.match_threshold], ["summary", a.summary],
  ]);
  rows(document.querySelector("#tx-facts tbody"), t ? [
    ["outcome", t.outcome], ["risk score", t.risk_score], ["reasons", t.reasons], ["indicators", t.indicators],
    ["model score", t.model_score], ["model", t.model_version],
    ["challenger score", t.challenger_score], ["challenger", t.challenger_version], ["rules", t.rules_version],
    ["face", t.face_status], ["face subject", t.face_subject_id], ["face category", t.face_category],
    ["face similarity", t.face_similarity], ["kind", t.kind], ["original transaction", t.original_transaction_id],
    ["items", t.item_count], ["category", t.product_category], ["cashier", t.cashier_id],
    ["decided in (ms)", t.ttdf_ms],
  ] : [["", "no decision stored for this alert's transaction"]]);
  // A similarity on this page is a face match: evidence for a person, as the alert message and the case page say.
  const matched = (v) => v !== null && v !== undefined;
  document.getElementById("face-caveat").hidden = !(matched(a.similarity) || (t && matched(t.face_similarity)));
  const snap = document.getElementById("snapshot");
  snap.innerHTML = a.thumbnail
    ? `<img class="snapshot" alt="checkout snapshot" src="${escapeHtml(a.thumbnail)}?size=large">`
    : '<p class="none">No snapshot for this alert.</p>';
  const img = snap.querySelector("img");
  if (img) img.addEventListener("error", () => { snap.innerHTML = '<p class="none">Snapshot purged.</p>'; });
  status.className = "status";
  status.textContent = `loaded ${new Date().toLocaleTimeString()}`;
  document.body.dataset.loaded = "1";
}

load();
