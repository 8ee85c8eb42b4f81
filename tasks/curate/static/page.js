// The curation page: a grid driven from the keyboard. Every decision is POSTed in order (one
// queue per tab) and shown as done only when the server answers that it is on disk; until then
// the card says "saving". Other tabs' decisions arrive by polling /api/changes.
"use strict";

const S = {
  view: "candidates", items: [], shown: [], sel: 0, seq: 0, set: "", filter: "all",
  undo: [],            // this tab's decisions, newest last: {item, seq (null while in flight)}
  pending: new Map(),  // item -> count of decisions in flight
  errors: new Map(),   // item -> why the last one failed
  queue: Promise.resolve(),
  client: Math.random().toString(36).slice(2, 10),
  editing: false,
};
const FILTERS = ["all", "new", "keep", "reject"];
const FILTER_NAMES = {all: "all", new: "undecided", keep: "kept", reject: "rejected"};
const $ = (id) => document.getElementById(id);
const esc = (s) => String(s ?? "").replace(/[&<>"']/g, (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c]));
const enc = (p) => p.split("/").map(encodeURIComponent).join("/");

async function load(view) {
  S.view = view;
  const r = await fetch(`/api/items?view=${view}`);
  const data = await r.json();
  S.items = data.items; S.set = data.set; S.seq = Math.max(S.seq, data.seq);
  $(`n-${view}`).textContent = `(${data.items.length})`;
  $("set").textContent = `kept → data/raw/${data.set}/`;
  for (const b of document.querySelectorAll(".tab")) b.classList.toggle("active", b.dataset.view === view);
  S.sel = 0;
  render();
  if (data.stats) showStats(data.stats.overall); else stats();
}

function visible(it) { return S.filter === "all" || it.status === S.filter; }

function cardHTML(it, i) {
  const pend = S.pending.get(it.item), err = S.errors.get(it.item);
  const status = pend ? "pending" : it.status;
  const badge = err ? `<span class="badge error" title="${esc(err)}">not saved</span>`
    : pend ? '<span class="badge pending">saving</span>'
    : it.status === "keep" ? '<span class="badge keep">kept</span>'
    : it.status === "reject" ? '<span class="badge reject">rejected</span>' : "";
  const q = it.reason ? `<div class="quarantine" title="${esc(it.detail)}">${esc(it.reason)}</div>` : "";
  const line = it.view === "candidates" ? `${esc(it.word || "")} · seed ${it.seed}` : esc(it.path);
  return `<div class="card ${status}${i === S.sel ? " selected" : ""}" data-i="${i}" data-item="${esc(it.item)}" ` +
    `data-status="${esc(it.status)}"><img loading="lazy" decoding="async" alt="" src="/thumb/${enc(it.file)}?w=256" ` +
    // A quarantined file that is not an image: its reason shows instead.
    `onerror="this.style.visibility='hidden'">` +
    `${badge}${q}<div class="line">${line}</div></div>`;
}

function render() {
  S.shown = S.items.filter(visible);
  S.sel = Math.max(0, Math.min(S.sel, S.shown.length - 1));
  const grid = $("grid");
  grid.innerHTML = S.shown.length ? S.shown.map(cardHTML).join("")
    : `<div class="empty">${S.view === "candidates" ? "No candidates: run <code>dvc repro candidates</code> (or the generate-candidates flow)." : "No images under data/raw."}</div>`;
  $("filter").textContent = `showing: ${FILTER_NAMES[S.filter]}`;
  side();
  window.__gridReady = performance.now();
}

function redraw(i) {
  const it = S.shown[i], old = $("grid").querySelector(`.card[data-i="${i}"]`);
  if (!it || !old) return;
  const tmp = document.createElement("div");
  tmp.innerHTML = cardHTML(it, i);
  const img = old.querySelector("img"), fresh = tmp.firstChild;
  if (img && fresh.querySelector("img").getAttribute("src") === img.getAttribute("src")) fresh.replaceChild(img, fresh.querySelector("img"));
  old.replaceWith(fresh);
}

function side() {
  const it = S.shown[S.sel];
  if (!it) { $("meta").innerHTML = ""; $("status").textContent = ""; $("preview").removeAttribute("src"); return; }
  $("preview").src = `/thumb/${enc(it.file)}?w=720`;
  const err = S.errors.get(it.item);
  $("status").textContent = err ? `not saved: ${err}` : S.pending.get(it.item) ? "saving…"
    : {keep: `kept (data/raw/${it.set || S.set}/)`, reject: "rejected", new: "undecided"}[it.status] || it.status;
  const rows = it.view === "candidates"
    ? [["prompt", it.prompt], ["seed", it.seed], ["word", it.word], ["template", it.template],
       ["source", `${it.generator} · ${it.checkpoint}`], ["size", it.width ? `${it.width}×${it.height}` : ""]]
    : [["path", it.path], ["split", it.split || (it.ingested ? "" : "not ingested yet")],
       ["quarantine", it.reason ? `${it.reason}: ${it.detail}` : ""], ["prompt", it.prompt], ["source", it.generator]];
  $("meta").innerHTML = rows.filter(([, v]) => v !== null && v !== undefined && v !== "")
    .map(([k, v]) => `<dt>${k}</dt><dd>${esc(v)}</dd>`).join("");
  if (!S.editing) $("caption").value = it.caption || "";
  if (!$("zoom").hidden) $("zoom-img").src = `/files/${enc(it.file)}`;
}

function select(i) {
  if (!S.shown.length) return;
  const prev = S.sel;
  S.sel = Math.max(0, Math.min(i, S.shown.length - 1));
  redraw(prev); redraw(S.sel);
  const card = $("grid").querySelector(`.card[data-i="${S.sel}"]`);
  if (card) card.scrollIntoView({block: "nearest"});
  side();
}

function columns() {
  const cards = $("grid").querySelectorAll(".card");
  if (cards.length < 2) return 1;
  const top = cards[0].offsetTop;
  let n = 0;
  for (const c of cards) { if (c.offsetTop !== top) break; n++; }
  return Math.max(1, n);
}

function apply(u) {
  for (const it of S.items) {
    if (it.item !== u.item) continue;
    it.status = u.status; it.set = u.set; it.caption = u.caption;
    if (it.view === "dataset" && u.path) { it.path = u.path; it.file = u.path; }
  }
}

function indexOf(item) { return S.shown.findIndex((x) => x.item === item); }

function post(body, entry = null) {
  const item = body.item;
  S.pending.set(item, (S.pending.get(item) || 0) + 1);
  S.errors.delete(item);
  redraw(indexOf(item)); if (S.shown[S.sel]?.item === item) side();
  // Undo is pressed against the last decision PRESSED, which may still be in flight: its entry
  // is on the stack at once and learns its number when the server answers.
  const mine = body.action === "undo" ? null : {item, seq: null};
  if (mine) S.undo.push(mine);
  // One queue per tab: a keep and its undo reach the server in the order they were pressed.
  S.queue = S.queue.then(async () => {
    let res;
    try {
      if (entry) {
        if (entry.seq === null) throw new Error("the decision to undo was not saved");
        body.undoes = entry.seq;
      }
      const r = await fetch("/api/decide", {method: "POST", headers: {"Content-Type": "application/json"},
                                            body: JSON.stringify({...body, client: S.client})});
      res = await r.json();
      if (!r.ok) throw new Error(res.error || `HTTP ${r.status}`);
      apply(res.update);
      if (mine) mine.seq = res.seq;
      if (res.error) S.errors.set(item, res.error);
      $("net").textContent = ""; $("net").classList.remove("bad");
    } catch (e) {
      if (mine) S.undo.splice(S.undo.indexOf(mine), 1);
      S.errors.set(item, String(e.message || e));
      $("net").textContent = "a decision was not saved"; $("net").classList.add("bad");
    } finally {
      const n = (S.pending.get(item) || 1) - 1;
      n ? S.pending.set(item, n) : S.pending.delete(item);
      const i = indexOf(item);
      if (i >= 0) redraw(i);
      if (S.shown[S.sel]?.item === item) side();
      if (!S.pending.size) stats();  // once a burst has landed, not once per key
    }
    return res;
  });
  return S.queue;
}

function decide(action) {
  const it = S.shown[S.sel];
  if (!it) return;
  post({item: it.item, action, set: S.set});
  if (S.sel < S.shown.length - 1) select(S.sel + 1);
}

function undo() {
  const last = S.undo.pop();
  if (last) post({item: last.item, action: "undo"}, last);
}

function saveCaption() {
  const it = S.shown[S.sel];
  S.editing = false;
  $("caption").blur();
  if (it && $("caption").value !== (it.caption || "")) post({item: it.item, action: "caption", caption: $("caption").value});
  $("caption-state").textContent = "";
}

async function poll() {
  try {
    const r = await fetch(`/api/changes?since=${S.seq}`);
    const data = await r.json();
    if (data.updates.length) {
      for (const u of data.updates) if (!S.pending.get(u.item)) apply(u);
      for (const u of data.updates) { const i = indexOf(u.item); if (i >= 0) redraw(i); }
      side(); stats();
    }
    S.seq = Math.max(S.seq, data.seq);
    if ($("net").textContent === "server unreachable") { $("net").textContent = ""; $("net").classList.remove("bad"); }
  } catch (e) {
    $("net").textContent = "server unreachable"; $("net").classList.add("bad");
  }
  setTimeout(poll, 1000);
}

function showStats(o) {
  $("hit").textContent = `kept ${o.kept} of ${o.seen} seen` + (o.hit_rate === null ? "" : ` (${Math.round(o.hit_rate * 100)}%)`);
}

async function stats() {
  try {
    showStats((await (await fetch("/api/stats")).json()).overall);
  } catch (e) { /* the poll reports the server's absence */ }
}

function zoom(on) {
  $("zoom").hidden = !on;
  side();
}

document.addEventListener("keydown", (e) => {
  if (e.target === $("caption")) {
    if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); saveCaption(); }
    else if (e.key === "Escape") { S.editing = false; $("caption").blur(); side(); }
    return;
  }
  if (e.ctrlKey || e.metaKey || e.altKey) return;
  const k = e.key;
  if (!$("help").hidden && k !== "?") { $("help").hidden = true; if (k === "Escape") return; }
  if (!$("zoom").hidden && (k === "Escape" || k === "z" || k === " ")) { e.preventDefault(); zoom(false); return; }
  const moves = {ArrowRight: 1, l: 1, ArrowLeft: -1, h: -1};
  if (k in moves) { e.preventDefault(); select(S.sel + moves[k]); }
  else if (k === "ArrowDown" || k === "ArrowUp") { e.preventDefault(); select(S.sel + (k === "ArrowDown" ? 1 : -1) * columns()); }
  else if (k === "k") decide("keep");
  else if (k === "x" || k === "r") decide("reject");
  else if (k === "u") undo();
  else if (k === "z" || k === " ") { e.preventDefault(); zoom(true); }
  else if (k === "c" || k === "e") { e.preventDefault(); S.editing = true; const t = $("caption"); t.focus(); t.setSelectionRange(t.value.length, t.value.length); $("caption-state").textContent = "editing"; }
  else if (k === "d") load(S.view === "candidates" ? "dataset" : "candidates");
  else if (k === "f") { S.filter = FILTERS[(FILTERS.indexOf(S.filter) + 1) % FILTERS.length]; S.sel = 0; render(); }
  else if (k === "?") $("help").hidden = !$("help").hidden;
});

$("grid").addEventListener("click", (e) => { const c = e.target.closest(".card"); if (c) select(+c.dataset.i); });
$("grid").addEventListener("dblclick", () => zoom(true));
$("zoom").addEventListener("click", () => zoom(false));
$("caption").addEventListener("focus", () => { S.editing = true; });
$("caption").addEventListener("blur", () => { if (S.editing) saveCaption(); });
for (const b of document.querySelectorAll(".tab")) b.addEventListener("click", () => load(b.dataset.view));
$("help-button").addEventListener("click", () => { $("help").hidden = !$("help").hidden; });

load("candidates").then(() => setTimeout(poll, 1000));
