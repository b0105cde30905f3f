// neuron dashboard: the node's models, live from GET /models/events.
// No library, no build step. Every piece of data reaches the page through textContent,
// never as HTML. With an API key set, the key lives in this tab's sessionStorage only and
// goes out as an Authorization header (fetch, not EventSource, which cannot send one).
"use strict";
(() => {
  const KEY = "neuron.apiKey";
  const SAMPLE_MS = 2000;      // the charts' counters (GET /models/stats); state is pushed
  const POINTS = 90;           // 3 minutes of samples per chart
  const CHART_W = 96;
  const CHART_H = 24;
  const LOG_MAX_CHARS = 400000; // the log view keeps the newest of what it was sent
  const STATUSES = new Set(["loaded", "loading", "downloading", "restarting", "unloading",
    "failed", "unloaded"]);
  const $ = (id) => document.getElementById(id);

  const models = new Map();    // id -> the /models entry, updated by events
  const rows = new Map();      // id -> {tr, detail, cells}
  const series = new Map();    // id -> [{rps, tps}]
  const notices = new Map();   // id -> {text, error}: what the page's own actions said
  let lastSample = null;
  let eventSeq = 0;
  let streamCtl = null;
  let retryMs = 500;
  let logCtl = null;
  let logModel = null;
  let firstRowMarked = false;
  let refreshTimer = 0;
  let readOnly = false;  // a key without the admin role: the page shows, and offers no actions

  // --- talking to the node -----------------------------------------------------------------

  function authHeaders(extra) {
    const headers = Object.assign({}, extra);
    const key = sessionStorage.getItem(KEY);
    if (key) headers.Authorization = "Bearer " + key;
    return headers;
  }

  async function call(path, options) {
    const opts = Object.assign({cache: "no-store"}, options);
    opts.headers = authHeaders(opts.headers);
    const resp = await fetch(path, opts);
    if (resp.status === 401) {
      askForKey(sessionStorage.getItem(KEY) !== null);
      throw new Error("API key required");
    }
    return resp;
  }

  async function errorText(resp) {
    try {
      const body = await resp.json();
      const e = body && body.error;
      if (typeof e === "string") return e;
      if (e && typeof e.message === "string") return e.message;
    } catch (_) { /* not JSON */ }
    return `HTTP ${resp.status}`;
  }

  const modelPath = (id) => id.split("/").map(encodeURIComponent).join("/");

  // --- the event stream --------------------------------------------------------------------

  async function connect() {
    if (streamCtl) streamCtl.abort();
    const ctl = new AbortController();
    streamCtl = ctl;
    setConn("connecting…", "");
    let resp;
    try {
      resp = await fetch("/models/events", {headers: authHeaders(), signal: ctl.signal,
        cache: "no-store"});
    } catch (_) {
      if (!ctl.signal.aborted) reconnect();
      return;
    }
    if (resp.status === 401) {
      askForKey(sessionStorage.getItem(KEY) !== null);
      return;
    }
    if (!resp.ok) {
      setConn(`events: ${await errorText(resp)}`, "down");
      reconnect();
      return;
    }
    showDashboard();
    await whoAmI();
    retryMs = 500;
    const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    try {
      for (;;) {
        const {value, done} = await reader.read();
        if (done) break;
        buffer += value;
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          dispatch(buffer.slice(0, end));
          buffer = buffer.slice(end + 2);
        }
      }
    } catch (_) {
      if (ctl.signal.aborted) return;
    }
    if (ctl.signal.aborted) return;
    setConn("disconnected; reconnecting…", "down");
    reconnect();
  }

  function reconnect() {
    setTimeout(connect, retryMs);
    retryMs = Math.min(retryMs * 2, 10000);
  }

  function dispatch(block) {
    let event = "message";
    const data = [];
    for (const line of block.split("\n")) {
      if (line.startsWith(":")) continue; // keep-alive
      const colon = line.indexOf(":");
      const field = colon < 0 ? line : line.slice(0, colon);
      let value = colon < 0 ? "" : line.slice(colon + 1);
      if (value.startsWith(" ")) value = value.slice(1);
      if (field === "event") event = value;
      else if (field === "data") data.push(value);
    }
    if (!data.length) return;
    let message;
    try { message = JSON.parse(data.join("\n")); } catch (_) { return; }
    if (event === "snapshot") onSnapshot(message.models || []);
    else if (event === "state") onState(message);
    else if (event === "progress") onProgress(message);
  }

  function onSnapshot(list) {
    models.clear();
    for (const m of list) models.set(m.id, m);
    setConn("live", "live");
    renderAll();
    if (!lastSample) sample(); // the first reading, so the charts start one period sooner
    nodeInfo();
  }

  function onState(ev) {
    eventSeq += 1;
    let m = models.get(ev.model);
    if (!m) {
      m = {id: ev.model, devices: [], restarts: 0};
      models.set(ev.model, m);
    }
    m.status = ev.status;
    m.seq = eventSeq;
    if (ev.status === "failed") m.error = ev.reason || m.error;
    else if (ev.status === "loaded") m.error = null;
    if (rows.has(ev.model)) renderRow(ev.model); else renderAll();
    scheduleRefresh();
  }

  function onProgress(ev) {
    const m = models.get(ev.model);
    if (!m) return;
    m.download = ev.download;
    renderRow(ev.model);
  }

  // A state event carries the status; the rest (pid, memory, since, restarts) comes from
  // one GET /models once a burst of events is over: a refresh per change, not a poll.
  function scheduleRefresh() {
    clearTimeout(refreshTimer);
    refreshTimer = setTimeout(refresh, 120);
  }

  async function refresh() {
    const seq = eventSeq;
    let list;
    try {
      const resp = await call("/models");
      if (!resp.ok) return;
      list = await resp.json();
    } catch (_) { return; }
    const seen = new Set();
    let stale = false;
    for (const entry of list) {
      seen.add(entry.id);
      const old = models.get(entry.id);
      if (old && old.seq > seq) { stale = true; continue; } // an event came after it left
      entry.seq = old ? old.seq : 0;
      models.set(entry.id, entry);
    }
    for (const id of [...models.keys()]) {
      if (!seen.has(id) && !(models.get(id).seq > seq)) models.delete(id);
    }
    renderAll();
    if (stale) scheduleRefresh();
  }

  // --- rendering ---------------------------------------------------------------------------

  function el(tag, props, children) {
    const node = document.createElement(tag);
    if (props) for (const [k, v] of Object.entries(props)) node[k] = v;
    if (children) for (const c of children) node.append(c);
    return node;
  }

  const LABELS = ["Model", "Status", "Devices", "Memory", "Context", "Uptime", "Restarts",
    "Queued / in flight", "Until", "Requests/s · tokens/s", "Actions"];

  const CELLS = ["first", "status-cell", "devices", "memory", "ctx num", "uptime",
    "restarts num", "queue", "until", "traffic", "actions"];

  function makeRow(id) {
    const tr = el("tr", {className: "model"});
    tr.dataset.modelId = id;
    const cells = LABELS.map((label, i) => {
      const td = el("td", {className: CELLS[i]});
      td.dataset.label = label;
      tr.append(td);
      return td;
    });
    const name = el("button", {type: "button", className: "model-name", textContent: id,
      title: "Follow this model's log"});
    name.addEventListener("click", () => openLog(id));
    cells[0].append(name);
    const status = el("span", {className: "status"});
    cells[1].append(status);
    const canvas = el("canvas", {className: "spark", width: CHART_W, height: CHART_H});
    canvas.setAttribute("role", "img");
    const rates = el("div", {className: "rates"});
    cells[9].append(el("div", {className: "spark-wrap"}, [canvas, rates]));
    const load = el("button", {type: "button", textContent: "Load"});
    load.addEventListener("click", () => act("load", id));
    const unload = el("button", {type: "button", textContent: "Unload"});
    unload.addEventListener("click", () => act("unload", id));
    cells[10].append(load, unload);
    const detail = el("tr", {className: "detail"});
    detail.dataset.detailFor = id;
    const detailCell = el("td", {colSpan: LABELS.length});
    detail.append(detailCell);
    return {tr, detail, cells, status, canvas, rates, load, unload, detailCell};
  }

  function renderAll() {
    const tbody = $("rows");
    const ids = [...models.keys()];
    for (const [id, row] of rows) {
      if (!models.has(id)) { row.tr.remove(); row.detail.remove(); rows.delete(id); }
    }
    const fragment = document.createDocumentFragment();
    for (const id of ids) {
      if (!rows.has(id)) rows.set(id, makeRow(id));
      const row = rows.get(id);
      fragment.append(row.tr, row.detail);
      renderRow(id);
    }
    tbody.append(fragment); // moves existing rows into the listing's order
    $("empty").hidden = ids.length > 0;
    const options = $("catalogue");
    options.replaceChildren(...ids.map((id) => el("option", {value: id})));
    const counts = {};
    for (const m of models.values()) counts[m.status] = (counts[m.status] || 0) + 1;
    const parts = Object.entries(counts).map(([s, n]) => `${n} ${s}`);
    $("summary").textContent = `${ids.length} model${ids.length === 1 ? "" : "s"}` + (parts.length ? ": " + parts.join(", ") : "");
    if (ids.length && !firstRowMarked) {
      firstRowMarked = true;
      performance.mark("neuron:first-row");
    }
  }

  function renderRow(id) {
    const m = models.get(id);
    const row = rows.get(id);
    if (!m || !row) return;
    const status = STATUSES.has(m.status) ? m.status : "unknown";
    row.tr.className = "model " + status + (id === logModel ? " selected" : "");
    row.status.className = "status status-" + status;
    let statusText = String(m.status);
    if (status === "downloading" && m.download && m.download.total_bytes) {
      statusText += ` ${Math.floor(100 * m.download.done_bytes / m.download.total_bytes)}%`;
    }
    row.status.textContent = statusText;
    const c = row.cells;
    c[2].textContent = devices(m);
    c[3].textContent = memory(m);
    c[4].textContent = m.n_ctx ? String(m.n_ctx) : "–";
    c[5].textContent = uptime(m);
    c[6].textContent = String(m.restarts || 0);
    c[7].textContent = traffic(m);
    c[8].textContent = until(m);
    const busy = ["loading", "downloading", "restarting", "unloading"].includes(status);
    const pending = notices.get(id) && notices.get(id).pending;
    // A failed model outside the catalogue is removed (its row goes) rather than unloaded.
    const removable = status === "failed" && m.catalogue === false;
    row.load.hidden = readOnly || !(status === "unloaded" || status === "failed");
    row.unload.hidden = readOnly || status === "unloaded" ||
      (status === "failed" && !m.pid && !removable);
    row.unload.textContent = removable ? "Remove" : "Unload";
    c[10].hidden = readOnly;
    row.load.disabled = Boolean(pending) || busy;
    // Unloading cancels a download and ends a restart loop (api.md): never disabled then.
    row.unload.disabled = Boolean(pending) || status === "unloading";
    drawChart(id);
    const notice = notices.get(id);
    let text = "";
    let isError = true;
    if (notice) { text = notice.text; isError = notice.error; }
    else if (status === "failed" && m.error) text = `error: ${m.error}`;
    else if (m.warning) text = `warning: ${m.warning}`;
    else if (status === "restarting" && m.last_error) text = `restarting after: ${m.last_error}`;
    else if (m.last_error && status === "loaded") {
      text = `last failure: ${m.last_error}`;
      isError = false;
    }
    row.detailCell.textContent = text;
    row.detail.hidden = !text;
    row.detail.className = "detail" + (isError ? "" : " notice");
  }

  function devices(m) {
    if (m.devices && m.devices.length) return "GPU " + m.devices.join(",");
    if (m.vram_used_mb) return "GPU";
    return m.status === "unloaded" ? "–" : "CPU";
  }

  function bytes(n) {
    if (n === null || n === undefined) return "–";
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
    return `${n < 10 && i ? n.toFixed(1) : Math.round(n)} ${units[i]}`;
  }

  function memory(m) {
    if (m.status === "downloading" && m.download) {
      return `${bytes(m.download.done_bytes)} of ${bytes(m.download.total_bytes)}`;
    }
    const parts = [];
    if (m.rss_bytes !== null && m.rss_bytes !== undefined) parts.push(bytes(m.rss_bytes));
    if (m.vram_used_mb) parts.push(bytes(m.vram_used_mb * 1048576) + " VRAM");
    return parts.join(" · ") || "–";
  }

  function span(s) {
    s = Math.max(0, Math.floor(s));
    if (s < 60) return `${s}s`;
    if (s < 3600) return `${Math.floor(s / 60)}m${String(s % 60).padStart(2, "0")}s`;
    if (s < 86400) return `${Math.floor(s / 3600)}h${String(Math.floor(s / 60) % 60).padStart(2, "0")}m`;
    return `${Math.floor(s / 86400)}d${Math.floor(s / 3600) % 24}h`;
  }

  function uptime(m) {
    if (m.status !== "loaded" || !m.since) return "–";
    return span(Date.now() / 1000 - m.since);
  }

  function traffic(m) {
    if (m.queued === undefined || m.in_flight === undefined) return "–";
    // An unloaded model with nothing waiting: nothing to count (as `neuronctl status`).
    if (m.status === "unloaded" && !m.queued && !m.in_flight) return "–";
    return `${m.queued} / ${m.in_flight}`;
  }

  // A coarse span for a countdown or a TTL, as `neuronctl status` words it (formats.py's
  // fmt_span): `45s`, `5m`, `2h05m`.
  function coarse(seconds) {
    const s = Math.round(Math.max(0, seconds));
    if (s < 100) return `${s}s`;
    if (s < 6000) return `${Math.round(s / 60)}m`;
    return `${Math.floor(s / 3600)}h${String(Math.floor(s % 3600 / 60)).padStart(2, "0")}m`;
  }

  function until(m) {
    if (m.idle_until !== null && m.idle_until !== undefined) {
      return "in " + coarse(m.idle_until - Date.now() / 1000);
    }
    if (m.ttl_s !== null && m.ttl_s !== undefined) return "ttl " + coarse(m.ttl_s);
    return m.pinned ? "pinned" : "–";
  }

  // --- the charts --------------------------------------------------------------------------

  async function sample() {
    if (document.hidden || $("dash").hidden) return;
    let body;
    try {
      const resp = await call("/models/stats");
      if (!resp.ok) return;
      body = await resp.json();
    } catch (_) { return; }
    const prev = lastSample;
    lastSample = body;
    for (const [id, now] of Object.entries(body.models || {})) {
      const m = models.get(id);
      if (m) { m.queued = now.queued; m.in_flight = now.in_flight; }
      const before = prev && prev.models[id];
      const dt = prev ? body.time - prev.time : 0;
      if (!before || dt <= 0) continue;
      const points = series.get(id) || [];
      points.push({
        rps: Math.max(0, (now.requests - before.requests) / dt),
        tps: Math.max(0, (now.tokens - before.tokens) / dt),
      });
      if (points.length > POINTS) points.splice(0, points.length - POINTS);
      series.set(id, points);
      renderRow(id);
    }
  }

  function drawChart(id) {
    const row = rows.get(id);
    const points = series.get(id) || [];
    const canvas = row.canvas;
    const ratio = window.devicePixelRatio || 1;
    const w = CHART_W, h = CHART_H;
    canvas.dataset.points = String(points.length);
    if (canvas.width !== w * ratio) { canvas.width = w * ratio; canvas.height = h * ratio; }
    const ctx = canvas.getContext("2d");
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    ctx.clearRect(0, 0, w, h);
    const style = getComputedStyle(document.documentElement);
    ctx.strokeStyle = style.getPropertyValue("--line");
    ctx.beginPath(); ctx.moveTo(0, h - 0.5); ctx.lineTo(w, h - 0.5); ctx.stroke();
    const lastPoint = points[points.length - 1];
    for (const [field, color] of [["rps", "--req"], ["tps", "--tok"]]) {
      const top = Math.max(...points.map((p) => p[field]), 0);
      if (!top) continue;
      ctx.strokeStyle = style.getPropertyValue(color);
      ctx.lineWidth = 1.5;
      ctx.beginPath();
      // Time runs right to left; a young series spans at least 12 samples' width, a full
      // one the whole chart.
      const step = w / (Math.max(points.length, 12) - 1);
      points.forEach((p, i) => {
        const x = w - (points.length - 1 - i) * step;
        const y = h - 2 - (p[field] / top) * (h - 5);
        if (i) ctx.lineTo(x, y); else ctx.moveTo(x - 2, y); // one point: a short dash
      });
      ctx.stroke();
    }
    const rps = lastPoint ? lastPoint.rps : 0;
    const tps = lastPoint ? lastPoint.tps : 0;
    const r = el("span", {className: "r", textContent: `${rps.toFixed(rps < 10 ? 1 : 0)} req/s`});
    const t = el("span", {className: "t", textContent: `${tps.toFixed(tps < 10 ? 1 : 0)} tok/s`});
    row.rates.replaceChildren(r, t);
    const span = Math.round(points.length * SAMPLE_MS / 1000);
    canvas.setAttribute("aria-label", `${r.textContent}, ${t.textContent}, the last ${span} s`);
  }

  // --- actions -----------------------------------------------------------------------------

  async function act(action, id, errorTarget) {
    notices.set(id, {text: action === "load" ? "loading…" : "unloading…", error: false,
      pending: true});
    renderRow(id);
    let message = null;
    try {
      const resp = await call(`/models/${action}`, {method: "POST",
        headers: {"Content-Type": "application/json"}, body: JSON.stringify({model_id: id})});
      if (!resp.ok) message = await errorText(resp);
    } catch (e) {
      message = String(e.message || e);
    }
    // An error is shown once: in the model's row when it has one, else under the field.
    const inRow = rows.has(id);
    if (message && inRow) notices.set(id, {text: `${action} failed: ${message}`, error: true});
    else notices.delete(id);
    if (errorTarget) {
      errorTarget.textContent = message && !inRow ? `${action} ${id}: ${message}` : "";
    }
    if (rows.has(id)) renderRow(id);
    scheduleRefresh();
  }

  $("load-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const id = $("load-id").value.trim();
    if (!id) return;
    $("load-error").textContent = "";
    act("load", id, $("load-error"));
  });

  // --- the log -----------------------------------------------------------------------------

  async function openLog(id) {
    if (logCtl) logCtl.abort();
    const ctl = new AbortController();
    logCtl = ctl;
    const previousModel = logModel;
    logModel = id;
    for (const other of [previousModel, id]) if (other !== null) renderRow(other);
    $("logs").hidden = false;
    $("logs").scrollIntoView({block: "nearest"});
    $("log-model").textContent = id;
    const pre = $("log-text");
    pre.textContent = "";
    const previous = $("log-previous").checked;
    const state = $("log-state");
    state.textContent = "opening…";
    // The server's default number of lines (100), as `neuronctl logs` shows.
    const query = previous ? "?previous=1" : "?follow=1";
    let resp;
    try {
      resp = await call(`/models/${modelPath(id)}/logs${query}`, {signal: ctl.signal});
    } catch (_) {
      if (!ctl.signal.aborted) state.textContent = "could not be read";
      return;
    }
    if (!resp.ok) {
      state.textContent = await errorText(resp);
      return;
    }
    state.textContent = previous ? "the start before this one" : "following";
    const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
    try {
      for (;;) {
        const {value, done} = await reader.read();
        if (done) break;
        appendLog(pre, value);
      }
      if (!previous) state.textContent = "ended (the node closed the stream)";
    } catch (_) {
      if (!ctl.signal.aborted) state.textContent = "stream broke off";
    }
  }

  function appendLog(pre, text) {
    const atBottom = pre.scrollHeight - pre.scrollTop - pre.clientHeight < 24;
    pre.append(text);
    if (pre.textContent.length > LOG_MAX_CHARS) {
      const kept = pre.textContent.slice(-LOG_MAX_CHARS / 2);
      pre.textContent = kept.slice(kept.indexOf("\n") + 1);
    }
    if (atBottom) pre.scrollTop = pre.scrollHeight;
  }

  function closeLog() {
    if (logCtl) logCtl.abort();
    logCtl = null;
    const was = logModel;
    logModel = null;
    if (was !== null) renderRow(was);
    $("logs").hidden = true;
  }

  $("log-close").addEventListener("click", closeLog);
  $("log-previous").addEventListener("change", () => { if (logModel !== null) openLog(logModel); });
  document.addEventListener("keydown", (e) => {
    if (e.key === "Escape" && !$("logs").hidden) closeLog();
  });

  // --- the key and the page's state --------------------------------------------------------

  // What the key may do (GET /keys/self): without the admin role, loading and unloading
  // would only be refused, so they are not offered.
  async function whoAmI() {
    let roles = ["admin"];
    let name = "";
    try {
      const resp = await fetch("/keys/self", {headers: authHeaders(), cache: "no-store"});
      if (resp.ok) {
        const me = await resp.json();
        if (Array.isArray(me.roles)) roles = me.roles;
        if (typeof me.name === "string") name = me.name;
      }
    } catch (_) { /* an older node: actions offered, as before */ }
    readOnly = !roles.includes("admin");
    for (const node of [$("load-id"), $("load-submit"), $("load-label"), $("actions-head")]) {
      node.hidden = readOnly;
    }
    $("key-name").textContent = readOnly ? `read-only key: ${name}` : "";
    for (const id of rows.keys()) renderRow(id);
  }

  function setConn(text, kind) {
    const conn = $("conn");
    conn.textContent = text;
    conn.className = kind;
  }

  function askForKey(invalid) {
    if (streamCtl) streamCtl.abort();
    closeLog();
    if (invalid) sessionStorage.removeItem(KEY);
    $("dash").hidden = true;
    $("login").hidden = false;
    $("forget").hidden = true;
    $("login-error").textContent = invalid ? "That key was refused (HTTP 401); try again." : "";
    setConn("API key required", "down");
    $("key").focus();
  }

  function showDashboard() {
    $("login").hidden = true;
    $("dash").hidden = false;
    $("forget").hidden = sessionStorage.getItem(KEY) === null;
  }

  $("login-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const key = $("key").value.trim();
    if (!key) return;
    sessionStorage.setItem(KEY, key);
    $("key").value = "";
    connect();
  });

  $("forget").addEventListener("click", () => {
    sessionStorage.removeItem(KEY);
    askForKey(false);
  });

  // The charts' colours are the scheme's: drawn again when it changes.
  matchMedia("(prefers-color-scheme: dark)").addEventListener("change", () => {
    for (const id of rows.keys()) drawChart(id);
  });
  $("node-name").textContent = location.host;

  // The node panel: what GET /health says (version, uptime, each GPU's used and free VRAM),
  // read every 10 s: on a GPU node, free VRAM is the first thing an operator looks for.
  async function nodeInfo() {
    if (document.hidden || $("dash").hidden) return;
    let h;
    try {
      const resp = await call("/health");
      if (!resp.ok) return;
      h = await resp.json();
    } catch (_) { return; }
    const parts = [`neuronctl ${h.version}`, `node ${h.node_id}`, `up ${span(h.uptime_s)}`];
    const gpus = h.gpus || [];
    if (!gpus.length) parts.push("no GPU: CPU only");
    for (const g of gpus) {
      const mib = (n) => (n === null || n === undefined) ? "–" : bytes(n * 1048576);
      parts.push(`GPU ${g.index} ${g.name}: ${mib(g.memory_used_mb)} used, ` +
                 `${mib(g.memory_free_mb)} free of ${mib(g.memory_total_mb)}`);
    }
    $("node").textContent = parts.join(" · ");
  }
  setInterval(nodeInfo, 10000);
  setInterval(() => {  // the clocks: uptime and idle countdowns tick without a request
    for (const [id, m] of models) {
      const row = rows.get(id);
      if (row && (m.since || m.idle_until)) {
        row.cells[5].textContent = uptime(m);
        row.cells[8].textContent = until(m);
      }
    }
  }, 1000);
  setInterval(sample, SAMPLE_MS);
  connect();
})();
