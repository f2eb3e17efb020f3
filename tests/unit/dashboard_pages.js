// The dashboard's page scripts run in Node as a browser runs them (each a classic script of one global scope, in the
// order its HTML loads them) over a fake DOM, canned answers and a clock of the harness's own, so a test sees in
// milliseconds what the page asks, when, and what it shows. Driven by dashboard_pages.py, which sends the settings
// as JSON on stdin; the last line printed is the JSON of { result, thrown }.
"use strict";
const fs = require("fs");
const vm = require("vm");

const config = JSON.parse(fs.readFileSync(0, "utf8"));
const thrown = [];  // what the page threw, or a promise of it rejected with nobody waiting
process.on("unhandledRejection", (e) => thrown.push(String(e)));

// ------------------------------------------------------------------ the DOM

// Every element the page asks for by id or selector is one of these, made on first use and kept in `nodes`.
function made(id) {
  return {
    id, className: "", textContent: "", innerHTML: "", value: "", checked: false, hidden: false, disabled: false,
    maxLength: -1, dataset: {}, style: {}, options: [], children: [], handlers: {}, clientWidth: 600, clientHeight: 200,
    appendChild(child) { this.children.push(child); return child; },
    add(option) { this.options.push(option); },
    addEventListener(name, fn) { this.handlers[name] = fn; },
    insertAdjacentHTML(_where, html) { this.innerHTML += html; },
    setAttribute() {}, getAttribute: () => "", querySelector: () => null, querySelectorAll: () => [], replaceWith() {},
  };
}
const nodes = {};
const node = (id) => (nodes[id] ||= made(id));
const created = [];  // elements the page made itself (document.createElement)
const create = () => { const e = made(); created.push(e); return e; };
// The case page's verdict buttons, one per verb given.
const buttons = config.buttons.map((verb) => Object.assign(node(`button ${verb}`), { dataset: { verb } }));
globalThis.document = {
  title: "", body: { dataset: {} }, getElementById: node, querySelector: node, createElement: create,
  createElementNS: create, querySelectorAll: (selector) => (selector === "#verdict button" ? buttons : []),
};
globalThis.window = { handlers: {}, addEventListener(name, fn) { this.handlers[name] = fn; } };
globalThis.location = { pathname: config.path, search: config.search };
globalThis.history = { replaceState(_state, _title, url) { this.url = url; } };
globalThis.Option = function Option(text, value) { this.text = text; this.value = value; };

// ------------------------------------------------------------------ the clock

// The page's waits (and intervals) run when the test says, in the order they fall due, the clock set to each.
const flush = async () => { for (let i = 0; i < 3; i++) await new Promise((done) => setImmediate(done)); };
let now = 0;
let ids = 0;
const timers = new Map();
const later = (fn, ms, extra = {}) => { timers.set(++ids, { fn, ms, due: now + (Number(ms) || 0), ...extra }); return ids; };
globalThis.setTimeout = (fn, ms) => later(fn, ms);
globalThis.setInterval = (fn, ms) => later(fn, ms, { every: Number(ms) || 1 });
globalThis.clearTimeout = globalThis.clearInterval = (id) => { timers.delete(id); };
const waits = [];  // the ms of each of the page's waits run
const seen = [];  // the status line before each of them
const statusText = () => (nodes.status ? nodes.status.textContent : undefined);

// Runs the waits due first, at most `runs` of the page's own (an answer's time to come is not counted, nor recorded)
// and none due after `until` ms; `record`: their ms into waits, the status line before each into seen.
async function run({ runs = Infinity, until = Infinity, record = true } = {}) {
  for (let done = 0; ;) {
    await flush();  // what the page does at once (a click's request) comes first
    let next = null;
    for (const entry of timers) if (!next || entry[1].due < next[1].due) next = entry;
    if (!next || next[1].due > until) return;
    const [id, timer] = next;
    if (!timer.answer) {
      if (done >= runs) return;
      done += 1;
      if (record) { seen.push(statusText()); waits.push(timer.ms); }
    }
    now = timer.due;
    if (timer.every) timer.due += timer.every; else timers.delete(id);
    timer.fn();
    await flush();
  }
}
// Lets `ms` pass: the waits due by then run, not recorded (the 200 ms after a resize, say).
const advance = (ms) => run({ until: now + ms, record: false });

// ------------------------------------------------------------------ the server

// Per request: a path's answers in order ({ "/api/config": [...] }, "POST /api/..." for another method), or one list
// for every request; the last one repeated. An answer is [status, body, ms it takes to come] (a string body is not
// JSON), null for no answer at all, or "held": answered when the test says (release).
const requests = [];  // { url, method, body, at }
const asked = {};
const held = [];
let waiting = 0;
let mostWaiting = 0;  // requests on their way at once, at most
const STATUS_TEXT = { 500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable", 504: "Gateway Timeout" };
function respond(answer) {
  if (answer === null) throw new TypeError("Failed to fetch");
  const [status, body] = answer;
  return {
    ok: status < 300, status, statusText: STATUS_TEXT[status] || "",
    json: async () => (typeof body === "string" ? JSON.parse(body) : body),
  };
}
globalThis.fetch = (url, init = {}) => {
  const method = init.method || "GET";
  const key = method === "GET" ? url.split("?")[0] : `${method} ${url.split("?")[0]}`;
  requests.push({ url, method, body: init.body ?? null, at: now });
  asked[key] = (asked[key] || 0) + 1;
  const list = Array.isArray(config.answers) ? config.answers : config.answers[key];
  if (!list) return Promise.reject(new TypeError(`no answer for ${key}`));
  const answer = list[Math.min((Array.isArray(config.answers) ? requests.length : asked[key]) - 1, list.length - 1)];
  mostWaiting = Math.max(mostWaiting, ++waiting);
  const settle = (resolve, reject) => { waiting -= 1; try { resolve(respond(answer)); } catch (e) { reject(e); } };
  if (answer === "held") return new Promise((resolve, reject) => held.push({ url, resolve, reject }));
  const ms = (answer && answer[2]) || 0;
  if (!ms) return new Promise(settle);
  return new Promise((resolve, reject) => later(() => settle(resolve, reject), ms, { answer: true }));
};
// Answers the i-th request held.
function release(i, answer) {
  waiting -= 1;
  try { held[i].resolve(respond(answer)); } catch (e) { held[i].reject(e); }
}

// ------------------------------------------------------------------ the run

const plain = (n) => n && {
  id: n.id, className: n.className, textContent: n.textContent, innerHTML: n.innerHTML, value: n.value,
  hidden: n.hidden, disabled: n.disabled, children: n.children.map((c) => c.innerHTML),
};
// What a test usually looks at once the page has run.
const summary = () => ({
  asked, fetched: requests.length, requests, mostWaiting, waits, seen: [...seen, statusText()], status: plain(nodes.status),
  loaded: document.body.dataset.loaded === "1", renders: document.body.dataset.renders || "0", title: document.title,
  disabled: buttons.every((b) => b.disabled), nodes: Object.fromEntries(Object.entries(nodes).map(([k, n]) => [k, plain(n)])),
  created: created.map((e) => e.innerHTML), shared, redeclared: shared.filter((name) => globalThis[name] !== first[name]),
});
// The functions the first script (common.js) declares, for every page script: none may be declared again.
let shared = [];
let first = {};
const h = { nodes, node, buttons, created, requests, held, release, run, advance, flush, summary, now: () => now };

(async () => {
  let result;
  try {
    for (const [name, text] of config.scripts) {
      const before = new Set(Object.keys(globalThis));
      vm.runInThisContext(text, { filename: name });
      if (name === config.scripts[0][0]) {
        shared = Object.keys(globalThis).filter((k) => !before.has(k) && typeof globalThis[k] === "function");
        first = Object.fromEntries(shared.map((k) => [k, globalThis[k]]));
      }
    }
    await flush();
    result = await new (async () => {}).constructor("h", config.scenario)(h);
  } catch (e) {
    thrown.push(String(e && e.stack ? e.stack : e));
  }
  await flush();
  console.log(JSON.stringify({ result: result ?? null, thrown }));
  process.exit(0);
})();
