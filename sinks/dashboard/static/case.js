// The case page alert messages link to: the live snapshot beside the enrolled reference, the case and its
// transaction, the notes, and the verdict buttons. A verdict is posted as JSON; the case service applies or refuses
// it, so the page asks what became of that command (by its id) and says so: applied, with the case's new state, or
// refused and why.
"use strict";

// A time of the case (opened_at, ...) as its alert's message gives it, in its store's zone (the server's
// local_times), else as UTC text (common.js's storeTime).
const when = (c, field) => storeTime((c.local_times || {})[field], c[field]);
// The id in the page's address; null where it is not valid URL encoding (a link cut short at a "%" escape, say):
// decodeURIComponent threw on it, and the page sat at "loading…" with no word.
function pathId() {
  try {
    return decodeURIComponent(location.pathname.split("/").pop());
  } catch (e) {
    return null;
  }
}
const caseId = pathId();
const PENDING = new Set(["open", "escalated"]);
let current = null;
let you = null;
// A verdict on its way (sent, or waiting for the case's next version): the buttons stay off, so a double click
// sends nothing twice.
let busy = false;
// The submission a send went unanswered for (the network dropped it): sending the same again reuses its id.
let unanswered = null;
// The verdict last sent and what became of it: { verb, id (its command id), before (the case's version then),
// outcome (the answer of /commands/<id> once it is not "pending"), failed (the last ask of it failed), awaiting (applied,
// but its wait ended before the case's new version was read: the page's next read that shows it tells it) }.
let watched = null;
// After a verdict is sent its outcome (and the case) is asked every second for ANSWER_TRIES s, the buttons off; with no
// answer by then the buttons come back on and the outcome is asked every LATER_MS for at most LATER_TRIES times more
// (the case service down for a while answers when it is back: the verdict applied, or refused as too old).
const ANSWER_TRIES = 30;
const LATER_MS = 10000;
const LATER_TRIES = 360;
// An undecided case is read again every POLL_MS, the next read set once the last one is answered (a slow answer
// never overlaps the next). After a 5xx or no answer (the dashboard or OpenSearch away for a while) the case is asked
// again after 3 s, then twice as long each time up to 30 s (common.js's readFailed). A 4xx says the request itself is
// wrong (a malformed id, a login that may not read it): asked again it gets the same answer, so the page stops asking
// (reading.stopped), shows the reason and turns the buttons off.
const POLL_MS = 10000;
const reading = { refreshMs: 3000, failures: 0, timer: null, stopped: false };

// A new submission's id (32 random hex digits): the dashboard makes the command id from it, and the case service
// applies a command id once, so a send repeated (a double click, a resend after a lost answer) is one command.
function newRequestId() {
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

function setButtons() {
  for (const button of document.querySelectorAll("#verdict button")) {
    const verb = button.dataset.verb;
    // "Confirm as fraud" labels the case's transaction: a case without one would only be refused
    button.disabled = reading.stopped || busy || !current || !you || (!PENDING.has(current.state) && verb !== "note") || (button.dataset.fraud === "1" && !current.transaction_id);
  }
}

// Text escaped, then its line breaks shown as breaks (a note or a dismissal reason written on several lines).
const multiline = (text) => escapeHtml(text).replace(/\r\n?|\n/g, "<br>");

function rows(tbody, pairs) {
  tbody.innerHTML = "";
  for (const [label, value] of pairs) {
    if (value === null || value === undefined || value === "" || (Array.isArray(value) && !value.length)) continue;
    const shown = Array.isArray(value) ? value.join(", ") : value;
    tbody.insertAdjacentHTML("beforeend", `<tr><th>${escapeHtml(label)}</th><td data-field="${escapeHtml(label)}">${multiline(shown)}</td></tr>`);
  }
}

function image(id, url, missing) {
  const box = document.getElementById(id);
  box.innerHTML = url ? `<img class="snapshot" alt="${escapeHtml(missing)}" src="${escapeHtml(url)}">` : `<p class="none">${escapeHtml(missing)}</p>`;
  const img = box.querySelector("img");
  if (img) img.addEventListener("error", () => { box.innerHTML = '<p class="none">Image purged.</p>'; });
}

function render(body) {
  const c = body.case, t = body.transaction;
  current = c;
  document.title = `Checkout Guard — ${c.case_id} (${c.state})`;
  document.body.dataset.state = c.state;
  document.body.dataset.version = c.version;
  document.getElementById("case-title").textContent = `${c.kind.replace(/_/g, " ")} · ${c.state}`;
  rows(document.querySelector("#case-facts tbody"), [
    ["case", c.case_id], ["state", c.state], ["verdict", c.verdict], ["reason", c.verdict_reason], ["owner", c.owner],
    ["opened", when(c, "opened_at")], ["decided", when(c, "decided_at")], ["expires", PENDING.has(c.state) ? when(c, "expires_at") : null],
    ["last change by", c.updated_by], ["store", c.store_id], ["lane", c.lane_id], ["transaction", c.transaction_id],
    ["subject", c.subject_id], ["category", c.category], ["similarity", c.similarity],
    ["subject's dismissed matches", c.subject_false_matches || null], ["fraud label", c.fraud_label], ["summary", c.summary],
    ["alert", c.alert_id], ["version", c.version],
  ]);
  rows(document.querySelector("#tx-facts tbody"), t ? [
    ["outcome", t.outcome], ["risk score", t.risk_score], ["reasons", t.reasons], ["amount", fmtPrice(t.amount, t.currency)],
    ["model score", t.model_score], ["face", t.face_status], ["face similarity", t.face_similarity], ["cashier", t.cashier_id],
  ] : [["", "no decision stored for this case's transaction"]]);
  if (!document.querySelector("#img-live img, #img-live p")) {
    image("img-live", c.images.live, "No live snapshot for this case.");
    image("img-reference", c.images.reference, "No reference image (not a face case, or the entry was forgotten).");
  }
  // [ms, the time as shown, who, what]: sorted by ms, shown as the case's other times are
  const trail = [[c.opened_at, when(c, "opened_at"), "case service", `opened (${c.kind})`], ...(c.notes || []).map((n) => [n.at, storeTime(n.local_time, n.at), n.actor, n.text])];
  if (c.decided_at) trail.push([c.decided_at, when(c, "decided_at"), c.decided_by || c.updated_by, `${c.state}${c.verdict_reason ? `: ${c.verdict_reason}` : ""}`]);
  trail.sort((a, b) => a[0] - b[0]);
  document.getElementById("trail").innerHTML = trail.map(([, at, actor, text]) => `<li><time>${escapeHtml(at)}</time> <b>${escapeHtml(actor)}</b> ${multiline(text)}</li>`).join("");
  // the box takes what the case service keeps: the limit comes with the case, so the two cannot differ
  if (Number.isInteger(body.max_text)) {
    document.getElementById("v-text").maxLength = body.max_text;
    document.getElementById("v-limit").textContent = `(at most ${body.max_text} characters)`;
  }
  const decider = document.getElementById("decider");
  decider.textContent = body.you ? `Deciding as ${body.you}.` : "You cannot decide cases from this login.";
  you = body.you;
  setButtons();
}

async function load() {
  const status = document.getElementById("status");
  if (caseId === null) {
    status.className = "status error";
    status.textContent = "This address does not name a case: its id has a malformed % escape (a link cut short or mangled?). Open the case from its alert or the case queue again.";
    for (const button of document.querySelectorAll("#verdict button")) button.disabled = true;
    return null;
  }
  if (reading.stopped) return null;
  clearTimeout(reading.timer);
  reading.timer = null;
  const answer = await askJson(`/api/cases/${encodeURIComponent(caseId)}`);
  if (!answer.ok) {
    // a 401 or 403 (the login expired or was changed) says to log in again, which only a reload of the page does
    readFailed(reading, status, { status: answer.status, message: `${caseId}: ${answer.reason}` }, load);
    if (reading.stopped) setButtons();
    return null;
  }
  reading.failures = 0;
  render(answer.body);
  // a verdict applied whose case version was not on screen when its wait ended: told (and marked) once a read shows it
  if (watched && watched.awaiting && current.version > watched.before) {
    watched.awaiting = false;
    told(watched, document.getElementById("v-result"), true);
  }
  status.className = "status";
  status.textContent = `loaded ${new Date().toLocaleTimeString()}`;
  document.body.dataset.loaded = "1";
  if (PENDING.has(answer.body.case.state)) {
    // the one next read of the case (a read answered while another was on its way leaves one, not two)
    clearTimeout(reading.timer);
    reading.timer = setTimeout(load, POLL_MS);
  }
  return answer.body.case;
}

async function decide(verb, fraud) {
  if (busy) return;
  busy = true;
  setButtons();
  try {
    await send(verb, fraud);
  } finally {
    busy = false;
    setButtons();
  }
}

async function send(verb, fraud) {
  const result = document.getElementById("v-result");
  const text = verb === "assign" ? document.getElementById("v-person").value : document.getElementById("v-text").value;
  const before = current ? current.version : 0;
  const key = JSON.stringify([verb, text, fraud]);
  const request_id = unanswered && unanswered.key === key ? unanswered.id : newRequestId();
  unanswered = { key, id: request_id };
  watched = null;  // the verdict sent before is no longer followed: this one's answer is what the line says
  delete document.body.dataset.refused;
  result.className = "status";
  result.textContent = `sending ${verb}…`;
  const answer = await askJson(`/api/cases/${encodeURIComponent(caseId)}/verdict`, {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ verb, text, fraud, request_id }),
  });
  if (!answer.ok) {
    result.className = "status error";
    // No answer, a 5xx or a page that is not JSON (a proxy's): the verdict may have gone through, so the same
    // submission sent again keeps its request_id. The dashboard's own refusal (a 4xx) was not recorded.
    if (worthRetrying(answer.status)) {
      result.textContent = `${verb} may not have been sent (${answer.reason}): press it again, it will not be recorded twice.`;
    } else {
      unanswered = null;
      result.textContent = answer.status === 401 || answer.status === 403
        ? `${answer.reason} — ${verb} was not recorded: log in again (reload the page)`
        : answer.reason;
    }
    return;
  }
  unanswered = null;
  const w = { verb, id: answer.body.command_id, before, outcome: null, failed: false, awaiting: false };
  watched = w;
  result.textContent = `${verb} sent (${w.id}); waiting for the case service's answer…`;
  for (let i = 0; i < ANSWER_TRIES; i++) {
    await new Promise((ok) => setTimeout(ok, 1000));
    if (!w.outcome) await askOutcome(w);
    // read every second, but after a failed read by the growing wait only: its next read updates `current`
    if (!reading.failures && !(current && current.version > before)) await load();
    if (reading.stopped) {
      result.className = "status error";
      result.textContent = `${verb} was sent, but the case can no longer be read: see above.`;
      return;
    }
    if (told(w, result, false)) return;
  }
  if (told(w, result, true)) return;
  result.className = "status error";
  result.textContent = `${verb} was sent, but the case service has not answered in 30 s: is it running? This page keeps asking and says what it answers.`;
  setTimeout(() => later(w, 1), LATER_MS);
}

// Asks what became of `w`'s command; an answer other than "pending" is kept. A failed ask (the dashboard cannot read
// the case service's answers: 503, or no answer) is remembered: the case's next version is then the sign left.
async function askOutcome(w) {
  const answer = await askJson(`/api/cases/${encodeURIComponent(caseId)}/commands/${encodeURIComponent(w.id)}`);
  w.failed = !answer.ok;
  if (answer.ok && answer.body.outcome && answer.body.outcome !== "pending") w.outcome = answer.body;
}

// Says what became of `w`, where its outcome (or, its outcome unreadable or `final`, the case's next version) tells;
// whether it did. Text only (textContent): the reason is the case service's words.
function told(w, result, final) {
  const o = w.outcome, c = current;
  const newer = c && c.version > w.before;
  if (o && o.outcome === "refused") {
    result.className = "status error";
    result.textContent = `${w.verb} was refused: ${o.reason}`;
    document.body.dataset.refused = w.verb;
    return true;
  }
  if (o && o.outcome === "unchanged") {
    result.className = "status";
    result.textContent = `${w.verb}: nothing changed (${o.reason}).`;
    document.body.dataset.decided = w.verb;
    return true;
  }
  if (o && o.outcome === "applied") {
    if (newer) {
      result.className = "status";
      result.textContent = `${w.verb} applied: the case is now ${c.state} (version ${c.version}).`;
      document.body.dataset.decided = w.verb;
      return true;
    }
    result.textContent = final
      ? `${w.verb} applied, but the case's new version is not shown yet (is the OpenSearch sink running?): it shows once it is.`
      : `${w.verb} applied; waiting for the case's new version…`;
    w.awaiting = final;  // the case's own reads go on while it is undecided: the one that shows the version tells it
    return final;
  }
  if (newer && (w.failed || final)) {
    result.className = "status";
    result.textContent = `${w.verb}: the case is now ${c.state} (version ${c.version}).`;
    document.body.dataset.decided = w.verb;
    return true;
  }
  return false;
}

// The outcome of `w` asked again, the `n`-th time since the first 30 s, until it is told or another verdict is sent.
async function later(w, n) {
  if (watched !== w) return;
  await askOutcome(w);
  if (watched !== w) return;
  const result = document.getElementById("v-result");
  if (told(w, result, true)) return;
  if (n < LATER_TRIES) setTimeout(() => later(w, n + 1), LATER_MS);
  else result.textContent = `${w.verb} was sent, but the case service has not answered in an hour: the case above is as it stands.`;
}

document.getElementById("verdict").addEventListener("click", (e) => {
  const button = e.target.closest("button[data-verb]");
  if (button) decide(button.dataset.verb, button.dataset.fraud === "1");
});
load();
