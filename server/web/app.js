// docqa support desk: plain JavaScript, no framework, no network beyond this server.
// Every API call goes through api(): JSON bodies with Content-Type: application/json,
// uploads as multipart, and the API key (when the server wants one) as a Bearer header.
"use strict";

const $ = (sel, root = document) => root.querySelector(sel);
const KEY = "docqa.apiKey";
const cfg = { auth: false, max_upload_bytes: 5 * 1024 * 1024, rag_model: "docqa",
  document_types: [], ticket_types: [] };

// ---------------------------------------------------------------- helpers
function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") e.className = v;
    else if (k === "text") e.textContent = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) if (c !== null && c !== undefined) e.append(c);
  return e;
}
function show(node, on = true) { node.hidden = !on; }
function setError(node, msg) { node.textContent = msg || ""; show(node, !!msg); }
function bytes(n) {
  return n < 1024 ? `${n} B` : n < 1048576 ? `${(n / 1024).toFixed(1)} KiB` : `${(n / 1048576).toFixed(1)} MiB`;
}
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

class ApiError extends Error {
  constructor(status, message, code, retryAfter) {
    super(message); this.status = status; this.code = code; this.retryAfter = retryAfter;
  }
}

// ---------------------------------------------------------------- API key
function storedKey() { return sessionStorage.getItem(KEY) || localStorage.getItem(KEY) || ""; }
function forgetKey() { sessionStorage.removeItem(KEY); localStorage.removeItem(KEY); }
let keyWaiters = null;

function askKey(message) {
  // Opens the key dialog (once); resolves when a key the server accepts is stored.
  if (!keyWaiters) {
    keyWaiters = [];
    const dlg = $("#key-dialog");
    $("#key-error").textContent = message || "";
    $("#key-input").value = "";
    if (!dlg.open) dlg.showModal();
    $("#key-input").focus();
  } else if (message) {
    $("#key-error").textContent = message;
  }
  return new Promise((resolve) => keyWaiters.push(resolve));
}

async function submitKey(ev) {
  ev.preventDefault();
  const key = $("#key-input").value.trim();
  if (!key) { $("#key-error").textContent = "Enter the API key."; return; }
  $("#key-submit").disabled = true;
  try {
    const res = await fetch("/v1/models", { headers: { Authorization: "Bearer " + key } });
    if (res.status === 401) {
      $("#key-error").textContent = "The server refused this key. Check it and try again.";
      $("#key-input").select();
      return;
    }
    forgetKey();
    ($("#key-remember").checked ? localStorage : sessionStorage).setItem(KEY, key);
    $("#key-dialog").close();
    show($("#forget-key"), true);
    const waiters = keyWaiters || [];
    keyWaiters = null;
    waiters.forEach((w) => w());
  } catch (e) {
    $("#key-error").textContent = "Cannot reach the server: " + e.message;
  } finally {
    $("#key-submit").disabled = false;
  }
}

// ---------------------------------------------------------------- API calls
async function api(path, { method, json, form, signal, raw } = {}) {
  for (;;) {
    if (cfg.auth && !storedKey()) await askKey();
    const headers = {};
    const key = storedKey();
    if (key) headers.Authorization = "Bearer " + key;
    let body;
    if (json !== undefined) { headers["Content-Type"] = "application/json"; body = JSON.stringify(json); }
    else if (form) body = form; // the browser sets multipart/form-data with its boundary
    const res = await fetch(path, { method: method || (body ? "POST" : "GET"), headers, body, signal });
    if (res.status === 401) {
      forgetKey();
      await askKey(key ? "The server refused the stored key; enter it again." : "");
      continue; // retry with the new key
    }
    if (!res.ok) {
      let msg = `${res.status} ${res.statusText}`, code = null;
      try {
        const e = (await res.json()).error || {};
        msg = e.message || msg; code = e.code || null;
      } catch (_) { /* not JSON */ }
      throw new ApiError(res.status, msg, code, Number(res.headers.get("Retry-After")) || 0);
    }
    return raw ? res : res.json();
  }
}

// ---------------------------------------------------------------- views
const VIEWS = ["ask", "tickets", "documents"];
let currentView = null;

function route(focus = true) {
  const name = VIEWS.includes(location.hash.slice(1)) ? location.hash.slice(1) : "ask";
  for (const v of VIEWS) {
    show($(`#view-${v}`), v === name);
    const link = $(`#nav-${v}`);
    if (v === name) link.setAttribute("aria-current", "page"); else link.removeAttribute("aria-current");
  }
  document.title = `docqa · ${name[0].toUpperCase() + name.slice(1)}`;
  const changed = currentView !== name;
  currentView = name;
  if (changed && focus) $(`#h-${name}`).focus();
  if (name === "tickets") loadQueue();
  if (name === "documents") loadDocuments();
}

// ---------------------------------------------------------------- Ask
let askController = null;
let lastAnswer = null;

function codepoints(s) { return Array.from(s); }

function excerptNode(src) {
  // The excerpt with its evidence lines in <mark>; offsets count code points (Python str).
  const pre = el("div", { class: "excerpt", tabindex: "0", role: "region",
    "aria-label": `Excerpt ${src.index}: ${src.path}` });
  const cps = codepoints(src.text || "");
  let pos = 0;
  const spans = (src.evidence || []).filter((e) => e.end > e.start).sort((a, b) => a.start - b.start);
  for (const e of spans) {
    const start = Math.max(e.start, pos);
    if (start >= e.end) continue;
    pre.append(cps.slice(pos, start).join(""));
    pre.append(el("mark", { title: "evidence line" }, cps.slice(start, e.end).join("")));
    pos = e.end;
  }
  pre.append(cps.slice(pos).join(""));
  return pre;
}

function renderSources(sources) {
  const list = $("#sources");
  list.replaceChildren();
  show($("#sources-empty"), sources.length === 0);
  const anyCited = sources.some((s) => s.cited);
  sources.forEach((s, i) => {
    const ev = (s.evidence || []).length;
    const det = el("details", { id: `src-${s.index}`, open: i === 0 || null },
      el("summary", {},
        el("span", { class: "n", text: `[${s.index}]` }),
        el("span", { class: "path", text: s.path }),
        el("span", { class: "heading", text: s.heading || "" }),
        el("span", { class: "badge muted", text: ev ? `${ev} evidence line${ev > 1 ? "s" : ""}` : "" }),
        el("span", { class: "badge muted", text: s.cited === false && anyCited ? "holds the answer, not cited" : "" })),
      excerptNode(s));
    list.append(el("li", {}, det));
  });
}

function renderUnsupported(names) {
  // What the answer names that none of its sources holds: made up, or from elsewhere.
  const note = $("#unsupported");
  note.replaceChildren();
  if (names.length) {
    note.append("Not in its sources: ");
    names.forEach((n, i) => { if (i) note.append(", "); note.append(el("code", { text: n })); });
    note.append(". Check these before relying on them.");
  }
  show(note, names.length > 0);
}

function renderAnswerText(text, sources) {
  // The answer with its [n] citations linked to the sources they name.
  const node = $("#answer");
  node.replaceChildren();
  const known = new Set(sources.map((s) => String(s.index)));
  let last = 0;
  for (const m of text.matchAll(/\[(\d{1,3})\]/g)) {
    if (!known.has(m[1])) continue;
    node.append(text.slice(last, m.index));
    node.append(el("a", { href: `#src-${m[1]}`, class: "cite", "data-src": m[1],
      "aria-label": `source ${m[1]}`, text: m[0] }));
    last = m.index + m[0].length;
  }
  node.append(text.slice(last));
}

function openSource(n) {
  const det = document.getElementById(`src-${n}`);
  if (!det) return;
  det.open = true;
  det.querySelector("summary").focus();
  det.scrollIntoView({ block: "nearest" });
}

function toMarkdown(a) {
  const lines = [`**Question:** ${a.question}`, ""];
  if (a.abstained) lines.push(`_Not in the documentation._ ${a.text}`);
  else lines.push(a.text);
  if (a.sources.length) {
    lines.push("", "**Sources**", "");
    for (const s of a.sources) {
      lines.push(`[${s.index}] \`${s.path}\`${s.heading ? ` — ${s.heading}` : ""}`);
      for (const e of s.evidence || []) lines.push(`    > ${e.text.replace(/\s*\n\s*/g, " ")}`);
    }
  }
  return lines.join("\n") + "\n";
}

async function copyMarkdown() {
  if (!lastAnswer) return;
  const md = toMarkdown(lastAnswer);
  let ok = false;
  try {
    if (navigator.clipboard && window.isSecureContext) { await navigator.clipboard.writeText(md); ok = true; }
  } catch (_) { /* fall back below */ }
  if (!ok) { // plain http on another host: the old way
    const ta = el("textarea", { class: "offscreen", "aria-hidden": "true" });
    ta.value = md; ta.style.position = "fixed"; ta.style.left = "-9999px";
    document.body.append(ta); ta.select();
    try { ok = document.execCommand("copy"); } catch (_) { ok = false; }
    ta.remove();
    $("#copy-md").focus();
  }
  $("#copy-status").textContent = ok ? "Copied as Markdown." : "Copy failed; select the answer instead.";
  $("#copy-md").dataset.markdown = md;
}

let askSeq = 0; // the newest question's number: an older one that ends late draws nothing

async function ask(question) {
  if (askController) askController.abort();
  const mine = ++askSeq;
  const ctl = new AbortController();
  askController = ctl;
  const box = $("#answer-box"), answer = $("#answer"), kind = $("#answer-kind");
  setError($("#ask-error"), "");
  show(box, true); show($("#sources-box"), false);
  box.classList.remove("abstained", "answered");
  kind.textContent = ""; kind.className = "badge";
  answer.textContent = ""; answer.setAttribute("aria-busy", "true"); renderUnsupported([]);
  $("#copy-md").disabled = true; $("#copy-status").textContent = "";
  $("#ask-btn").disabled = true; $("#stop-btn").disabled = false;
  let text = "", sources = null, finish = null, unsupported = [];
  try {
    const res = await api("/v1/chat/completions", { raw: true, signal: ctl.signal, json: {
      model: cfg.rag_model, stream: true, temperature: 0,
      messages: [{ role: "user", content: question }] } });
    const reader = res.body.getReader();
    const dec = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += dec.decode(value, { stream: true });
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {
        const event = buf.slice(0, cut); buf = buf.slice(cut + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data:")) continue;
          const data = line.slice(5).trim();
          if (data === "[DONE]") continue;
          const obj = JSON.parse(data);
          if (obj.error) throw new ApiError(500, obj.error.message, obj.error.code);
          const ch = (obj.choices || [])[0];
          if (ch && ch.delta && ch.delta.content) { text += ch.delta.content; answer.textContent = text; }
          if (ch && ch.finish_reason) finish = ch.finish_reason;
          if (Array.isArray(obj.sources)) sources = obj.sources;
          if (Array.isArray(obj.unsupported)) unsupported = obj.unsupported;
        }
      }
    }
  } catch (e) {
    if (e.name === "AbortError") { finish = finish || "stopped"; }
    else setError($("#ask-error"), e.status === 503
      ? `The server is busy (${e.message}); try again in a moment.` : `Could not answer: ${e.message}`);
  } finally {
    if (askController === ctl) askController = null;
  }
  // replaced by a newer question (asked while this one streamed): that one owns the screen
  if (mine !== askSeq) return;
  answer.setAttribute("aria-busy", "false");
  $("#ask-btn").disabled = false; $("#stop-btn").disabled = true;
  const abstained = Array.isArray(sources) && sources.length === 0;
  sources = sources || [];
  text = text.trim();
  lastAnswer = { question, text, sources, abstained };
  if (abstained) {
    box.classList.add("abstained");
    kind.textContent = "Not in the documentation"; kind.classList.add("warn");
  } else if (sources.length) {
    box.classList.add("answered");
    kind.textContent = `Grounded in ${sources.length} source${sources.length > 1 ? "s" : ""}`;
    kind.classList.add("ok");
  }
  if (finish === "length") kind.textContent += " · cut at the length limit";
  if (finish === "stopped") kind.textContent += " · stopped";
  renderAnswerText(text, sources);
  renderUnsupported(abstained ? [] : unsupported);
  renderSources(sources);
  show($("#sources-box"), text !== "" || sources.length > 0);
  $("#copy-md").disabled = !text;
}

// ---------------------------------------------------------------- Tickets
let queueItems = [];
const drafts = new Map(); // item id -> {text, version} the agent typed and has not saved
let drafting = false;
let pollTimer = null;

function confidenceBadge(d) {
  if (!d || d.confidence === undefined || d.confidence === null) return null;
  const pct = Math.round(d.confidence * 100);
  return el("span", { class: `badge ${pct >= 50 ? "ok" : "warn"}`, text: `confidence ${pct}%` });
}

const STATUS_TEXT = { new: "new · waiting for a draft", drafting: "drafting…", review: "to review",
  approved: "approved", escalated: "escalated" };

function queueCard(it) {
  const t = it.ticket || {}, d = it.draft || {};
  const label = `ticket ${t.id}`;
  const editable = it.status !== "drafting";
  const pending = drafts.get(it.id);
  const ta = el("textarea", { id: `reply-${it.id}`, rows: "6", disabled: !editable || null });
  ta.value = pending ? pending.text : it.reply;
  ta.addEventListener("input", () => drafts.set(it.id, { text: ta.value, version: (drafts.get(it.id) || {}).version || it.version }));
  const note = el("input", { id: `note-${it.id}`, value: it.note || "", autocomplete: "off" });
  const msg = el("p", { class: "conflict", role: "status" });
  if (pending && pending.version !== it.version) {
    msg.textContent = `Another window changed this ticket (now ${it.status}) while you were editing; your text is kept here. Save again to replace theirs, or Refresh to drop yours.`;
  }
  const act = (status) => () => saveItem(it, ta, note, status, msg);
  const buttons = [];
  if (it.status === "new") buttons.push(el("button", { type: "button", class: "quiet", onclick: () => draftOne(it.id, true), text: "Draft now" }));
  if (editable) {
    buttons.push(el("button", { type: "button", class: "quiet", onclick: act(null), text: "Save edit" }));
    if (it.status !== "approved") buttons.push(el("button", { type: "button", class: "ok", onclick: act("approved"), text: "Approve", "aria-label": `Approve ${label}` }));
    if (it.status !== "escalated") buttons.push(el("button", { type: "button", class: "warn", onclick: act("escalated"), text: "Escalate", "aria-label": `Escalate ${label}` }));
    if (it.status === "approved" || it.status === "escalated") buttons.push(el("button", { type: "button", class: "quiet", onclick: act("review"), text: "Reopen" }));
  }
  const decision = d.decision ? el("span", { class: `badge ${d.decision === "auto" ? "ok" : "warn"}`, text: `decision: ${d.decision}` }) : null;
  const srcs = (d.sources || []).length
    ? el("ul", { class: "srcs", "aria-label": "Sources of the draft" }, d.sources.map((s) => el("li", {}, el("code", { text: s.path }), s.heading ? ` — ${s.heading}` : "")))
    : null;
  return el("li", { class: `qitem status-${it.status}`, id: `q-${it.id}`, "data-version": it.version, "data-status": it.status },
    el("h3", {}, el("span", { text: `#${it.id} · ${t.id}` }), el("span", { text: t.subject || "(no subject)" }),
      el("span", { class: "badge muted", text: STATUS_TEXT[it.status] || it.status })),
    el("div", {},
      el("p", { class: "meta", text: `from ${it.origin || "?"} · updated ${it.updated.replace("T", " ").replace("+00:00", " UTC")}` }),
      el("div", { class: "ticket-text", tabindex: "0", role: "region", "aria-label": `Message of ${label}`, text: t.body || "" }),
      el("div", { class: "buttons" }, decision, confidenceBadge(d)),
      d.reason ? el("p", { class: "reason" }, el("strong", { text: "Why: " }), d.reason) : null,
      d.error ? el("p", { class: "error", text: `Draft failed: ${d.error}` }) : null,
      srcs),
    el("div", {},
      el("label", { for: `reply-${it.id}`, text: `Reply to ${label}` }), ta,
      el("label", { for: `note-${it.id}`, text: "Note (why escalated)" }), note,
      el("div", { class: "buttons" }, buttons), msg));
}

function renderQueue(force = null) {
  const filter = $("#queue-filter").value;
  const shown = queueItems.filter((it) => filter === "" ? true
    : filter === "open" ? ["new", "drafting", "review"].includes(it.status) : it.status === filter);
  const list = $("#queue");
  // keep the agent's place: re-render only the cards that changed
  const active = document.activeElement && document.activeElement.closest(".qitem");
  const byId = new Map([...list.children].map((li) => [li.id, li]));
  const keep = [];
  for (const it of shown) {
    const old = byId.get(`q-${it.id}`);
    if (old && old.dataset.version === String(it.version)) { keep.push(old); continue; }
    if (old && old === active && force !== it.id) { // do not pull the card out from under the agent's cursor
      const m = old.querySelector(".conflict");
      if (m) m.textContent = "This ticket changed in another window; save or reload to see it.";
      keep.push(old); continue;
    }
    keep.push(queueCard(it));
  }
  list.replaceChildren(...keep);
  const counts = {};
  for (const it of queueItems) counts[it.status] = (counts[it.status] || 0) + 1;
  $("#queue-status").textContent = `${queueItems.length} tickets: ` +
    ["new", "drafting", "review", "approved", "escalated"].filter((s) => counts[s]).map((s) => `${counts[s]} ${s}`).join(", ");
  if (!shown.length) list.append(el("li", { class: "hint", text: queueItems.length ? "Nothing in this filter." : "The queue is empty: paste or upload tickets above." }));
}

async function loadQueue() {
  try {
    queueItems = (await api("/v1/tickets/queue")).data;
    setError($("#queue-error"), "");
    renderQueue();
    if (queueItems.some((it) => it.status === "new")) draftPending();
  } catch (e) {
    setError($("#queue-error"), `Cannot load the queue: ${e.message}`);
  }
}

function replaceItem(item) {
  const i = queueItems.findIndex((x) => x.id === item.id);
  if (i >= 0) queueItems[i] = item; else queueItems.push(item);
  renderQueue(item.id);
}

async function draftOne(id, manual = false) {
  // -> "done", "retry" (the server was busy: 503, after its Retry-After) or "skip" (another
  // window claimed it: 409, or it failed)
  try {
    replaceItem({ ...queueItems.find((x) => x.id === id), status: "drafting", version: -1 });
    replaceItem(await api(`/v1/tickets/queue/${id}/draft`, { json: {} }));
    return "done";
  } catch (e) {
    if (e.status === 503) {
      if (manual) setError($("#queue-error"), `The server is busy; #${id} will be drafted when it can (${e.message}).`);
      await sleep(1000 * (e.retryAfter || 2));
    } else if (e.status !== 409 || manual) setError($("#queue-error"), `Draft of #${id} failed: ${e.message}`);
    await loadQueueQuiet();
    if (e.status === 503 && manual) draftPending();
    return e.status === 503 ? "retry" : "skip";
  }
}

async function loadQueueQuiet() {
  try { queueItems = (await api("/v1/tickets/queue")).data; renderQueue(); } catch (_) { /* shown elsewhere */ }
}

async function draftPending() {
  // Drafts new items one at a time (another window may claim some: 409, skipped; a busy
  // server, 503, is asked again after its Retry-After).
  if (drafting) return;
  drafting = true;
  try {
    const skip = new Set();
    for (;;) {
      const next = queueItems.find((it) => it.status === "new" && !skip.has(it.id));
      if (!next) break;
      if ((await draftOne(next.id)) === "skip") skip.add(next.id);
    }
  } finally {
    drafting = false;
  }
}

async function saveItem(it, ta, note, status, msg) {
  const pending = drafts.get(it.id);
  const body = { reply: ta.value, note: note.value, version: pending ? pending.version : it.version };
  if (status) body.status = status;
  try {
    const item = await api(`/v1/tickets/queue/${it.id}`, { method: "PATCH", json: body });
    drafts.delete(it.id);
    replaceItem(item);
    $("#queue-status").textContent = `#${it.id} ${status ? status : "saved"}.`;
    const card = document.getElementById(`q-${it.id}`);
    if (card) (card.querySelector("textarea") || card).focus();
  } catch (e) {
    if (e.code === "version_conflict") {
      msg.textContent = "Another window changed this ticket first; your text is kept in the box. Save again to replace theirs.";
      await loadQueueQuiet();
      const fresh = queueItems.find((x) => x.id === it.id);
      if (fresh) drafts.set(it.id, { text: ta.value, version: fresh.version });
      renderQueue();
    } else {
      msg.textContent = e.message;
    }
  }
}

async function addTickets(body, form, label, resultNode) {
  const res = await api("/v1/tickets/queue", form ? { form } : { json: body });
  queueItems.push(...res.data);
  renderQueue();
  if (resultNode) {
    const errs = res.errors || [];
    resultNode.className = errs.length ? "warn" : "ok";
    resultNode.replaceChildren(el("span", { class: "name", text: label }),
      ` — ${res.data.length} ticket${res.data.length === 1 ? "" : "s"} added`,
      errs.length ? el("ul", {}, errs.map((e) => el("li", { text: `line ${e.line}: ${e.message}` }))) : "");
  }
  draftPending();
  return res;
}

function checkFile(f) {
  if (f.size > cfg.max_upload_bytes) return `too large: ${bytes(f.size)}, the limit is ${bytes(cfg.max_upload_bytes)}`;
  return null;
}

async function uploadFiles(input, resultsList, send) {
  // One result line per file, next to its name; a bad file never stops the others.
  const files = [...input.files];
  resultsList.replaceChildren();
  if (!files.length) { resultsList.append(el("li", { class: "err", text: "Choose one or more files first." })); return; }
  for (const f of files) {
    const li = el("li", {}, el("span", { class: "name", text: f.name }), " — uploading…");
    li.dataset.file = f.name;
    resultsList.append(li);
    const bad = checkFile(f);
    if (bad) { li.className = "err"; li.replaceChildren(el("span", { class: "name", text: f.name }), ` — ${bad}`); continue; }
    try {
      await send(f, li);
    } catch (e) {
      li.className = "err";
      li.replaceChildren(el("span", { class: "name", text: f.name }), ` — ${e.message}`);
    }
  }
  input.value = "";
}

// ---------------------------------------------------------------- Documents
async function loadDocuments() {
  const tbody = $("#doc-table tbody");
  try {
    const docs = (await api("/v1/documents")).data;
    setError($("#doc-error"), "");
    tbody.replaceChildren(...docs.map((d) => {
      const del = el("button", { type: "button", class: "quiet", "aria-label": `Delete ${d.path}`, text: "Delete" });
      let armed = null;
      del.addEventListener("click", async () => {
        if (!armed) { // two steps, no pop-up: click again to confirm
          del.textContent = "Confirm delete"; del.className = "danger";
          del.setAttribute("aria-label", `Confirm delete ${d.path}`);
          armed = setTimeout(() => { armed = null; del.textContent = "Delete"; del.className = "quiet"; del.setAttribute("aria-label", `Delete ${d.path}`); }, 6000);
          return;
        }
        clearTimeout(armed); del.disabled = true;
        try {
          await api(`/v1/documents/${encodeURIComponent(d.id)}`, { method: "DELETE" });
          $("#doc-status").textContent = `Deleted ${d.path}.`;
          await loadDocuments();
          $("#doc-files").focus();
        } catch (e) { setError($("#doc-error"), `Could not delete ${d.path}: ${e.message}`); del.disabled = false; }
      });
      return el("tr", { "data-path": d.path }, el("td", { class: "path", text: d.path }),
        el("td", { class: "num", text: String(d.chunks) }), el("td", {}, del));
    }));
    const chunks = docs.reduce((a, d) => a + d.chunks, 0);
    $("#doc-caption").textContent = `Indexed documents: ${docs.length} (${chunks} chunks)`;
  } catch (e) {
    setError($("#doc-error"), `Cannot list documents: ${e.message}`);
  }
}

// ---------------------------------------------------------------- start
async function start() {
  $("#key-form").addEventListener("submit", submitKey);
  $("#key-dialog").addEventListener("cancel", (e) => { if (keyWaiters) e.preventDefault(); });
  $("#forget-key").addEventListener("click", () => { forgetKey(); show($("#forget-key"), false); askKey(); });
  window.addEventListener("hashchange", () => route());

  const q = $("#question");
  q.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); $("#ask-form").requestSubmit(); }
  });
  $("#ask-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const text = q.value.trim();
    if (text) ask(text);
  });
  $("#stop-btn").addEventListener("click", () => { if (askController) askController.abort(); q.focus(); });
  $("#copy-md").addEventListener("click", copyMarkdown);
  $("#answer").addEventListener("click", (e) => {
    const a = e.target.closest("a.cite");
    if (a) { e.preventDefault(); openSource(a.dataset.src); }
  });

  $("#paste-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    const t = { subject: $("#paste-subject").value.trim(), body: $("#paste-body").value.trim() };
    const id = $("#paste-id").value.trim();
    if (id) t.id = id;
    if (!t.subject && !t.body) { $("#paste-status").textContent = "Write a subject or a message first."; return; }
    try {
      await addTickets({ tickets: [t] }, null, "pasted", null);
      $("#paste-status").textContent = "Added to the queue; drafting a reply…";
      e.target.reset();
    } catch (err) { $("#paste-status").textContent = err.message; }
  });
  $("#ticket-upload-form").addEventListener("submit", (e) => {
    e.preventDefault();
    uploadFiles($("#ticket-files"), $("#ticket-upload-results"), (f, li) => {
      const form = new FormData(); form.append("file", f, f.name);
      return addTickets(null, form, f.name, li);
    });
  });
  $("#queue-filter").addEventListener("change", () => renderQueue());
  $("#queue-refresh").addEventListener("click", () => { drafts.clear(); loadQueue(); });
  $("#queue-export").addEventListener("click", async () => {
    try {
      const res = await api("/v1/tickets/queue/export", { raw: true });
      const blob = await res.blob();
      const a = el("a", { href: URL.createObjectURL(blob), download: "approved-replies.jsonl" });
      document.body.append(a); a.click(); a.remove();
      setTimeout(() => URL.revokeObjectURL(a.href), 10000);
      const n = (await blob.text()).split("\n").filter(Boolean).length;
      $("#queue-status").textContent = `Exported ${n} approved repl${n === 1 ? "y" : "ies"}.`;
    } catch (err) { setError($("#queue-error"), `Export failed: ${err.message}`); }
  });
  $("#doc-upload-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    await uploadFiles($("#doc-files"), $("#doc-upload-results"), async (f, li) => {
      const form = new FormData(); form.append("file", f, f.name);
      const res = await api("/v1/documents", { form });
      const d = res.data[0];
      li.className = "ok";
      li.replaceChildren(el("span", { class: "name", text: f.name }), ` — indexed as ${d.path}, ${d.chunks} chunk${d.chunks === 1 ? "" : "s"}`);
    });
    loadDocuments();
  });
  // two windows see the same queue: poll it while the Tickets view is shown
  pollTimer = setInterval(() => { if (currentView === "tickets" && !document.hidden) loadQueueQuiet(); }, 3000);
  document.addEventListener("visibilitychange", () => { if (!document.hidden && currentView === "tickets") loadQueueQuiet(); });

  try {
    Object.assign(cfg, await (await fetch("/web/config.json")).json());
  } catch (e) {
    $("#server-status").textContent = "Cannot reach the docqa server.";
  }
  $("#doc-files").setAttribute("accept", cfg.document_types.join(","));
  $("#doc-types").textContent = `(${cfg.document_types.join(" ")}; up to ${bytes(cfg.max_upload_bytes)})`;
  $("#ticket-files").setAttribute("accept", cfg.ticket_types.join(","));
  $("#ticket-types").textContent = `(${cfg.ticket_types.join(" ")}; up to ${bytes(cfg.max_upload_bytes)})`;
  show($("#forget-key"), cfg.auth && !!storedKey());
  route(false);
  if (cfg.auth && !storedKey()) await askKey();
  try {
    const health = await (await fetch("/health")).json();
    $("#server-status").textContent = health.status === "ok" ? `model ${health.model}` : `server ${health.status}`;
  } catch (_) { /* shown above */ }
}

document.addEventListener("DOMContentLoaded", start);
