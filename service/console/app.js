// cdm-serve console: plain JS, no build step, no third-party code.
// Every action is a call to the service's JSON API with the pasted key; the page
// has no power of its own. The key lives in sessionStorage (this tab only).
"use strict";

const KEY = "cdm-console-key";
const SVGNS = "http://www.w3.org/2000/svg";
const state = { me: null, tab: null, timers: new Set() };

// ------------------------------------------------------------------ helpers
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (k === "dataset") Object.assign(node.dataset, v);
    else node.setAttribute(k, v === true ? "" : v);
  }
  append(node, children);
  return node;
}
function append(node, children) {
  for (const c of children.flat()) {
    if (c === undefined || c === null || c === false) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}
function svg(tag, attrs, ...children) {
  const node = document.createElementNS(SVGNS, tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "text") node.textContent = v;
    else node.setAttribute(k, v);
  }
  for (const c of children.flat()) if (c) node.append(c);
  return node;
}
const $ = (sel, root = document) => root.querySelector(sel);
const num = (x, d = 3) => (x === null || x === undefined || Number.isNaN(x) ? "—"
  : Number(x).toLocaleString("en-US", { maximumFractionDigits: d, minimumFractionDigits: 0 }));
const pct = (x) => (x === null || x === undefined ? "—" : (100 * x).toFixed(1) + "%");
function when(t) {
  if (!t) return "—";
  const d = new Date(t * 1000), p = (n) => String(n).padStart(2, "0");
  return `${d.getFullYear()}-${p(d.getMonth() + 1)}-${p(d.getDate())} ` +
    `${p(d.getHours())}:${p(d.getMinutes())}:${p(d.getSeconds())}`;
}
const PALETTE = ["#2f5fd0", "#d0702f", "#1e7d3c", "#b3261e", "#8e3bbd", "#00838f", "#a15c00",
  "#c2185b", "#558b2f", "#5d4037"];
const colors = new Map();
function assignColors(ids) {  // contributors in a stable order: distinct colours
  [...ids].sort().forEach((id) => { if (!colors.has(id)) colors.set(id, PALETTE[colors.size % PALETTE.length]); });
}
function color(id) {
  if (!colors.has(id)) assignColors([id]);
  return colors.get(id);
}
function table(headers, rows, attrs) {
  return el("div", { class: "scroll" }, el("table", attrs || {},
    el("thead", {}, el("tr", {}, headers.flatMap((h) =>
      (Array.isArray(h) && Array.isArray(h[0]) ? h : [h])).map((h) => {
      const [text, cls] = Array.isArray(h) ? h : [h];
      return el("th", { class: cls }, text);
    }))),
    el("tbody", {}, rows)));
}
const td = (v, cls) => el("td", { class: cls }, v);
const numTd = (v, d) => td(num(v, d), "num");

// ---------------------------------------------------------------- the API
class ApiError extends Error {
  constructor(status, message, detail) {
    super(message);
    this.status = status;
    this.detail = detail;
  }
}

async function api(endpoint, body, opts) {
  const key = sessionStorage.getItem(KEY) || "";
  let response;
  try {
    response = await fetch(new URL("../" + endpoint, location.href), {
      method: "POST", cache: "no-store",
      headers: { "Authorization": "Bearer " + key, "Content-Type": "application/json" },
      body: JSON.stringify(body || {}),
    });
  } catch (err) {
    throw new ApiError(0, "cannot reach the service: " + err.message);
  }
  let data = null;
  try { data = await response.json(); } catch (_) { /* not JSON: reported below */ }
  if (!response.ok) {
    const message = data && typeof data.error === "string" ? data.error
      : `HTTP ${response.status} ${response.statusText}`.trim();
    const err = new ApiError(response.status, message, data && data.detail);
    if (response.status === 401 && !(opts && opts.keep401)) signOut(message);
    throw err;
  }
  if (data === null) throw new ApiError(response.status, "the service answered with no JSON");
  return data;
}

function notify(err, kind) {
  const box = $("#notice");
  box.replaceChildren();
  if (!err) { box.hidden = true; return; }
  box.className = "notice" + (kind ? " " + kind : "");
  box.append(el("span", { class: "message" }, typeof err === "string" ? err : err.message));
  if (err.detail && err.detail.length) {
    box.append(el("ul", {}, err.detail.map((d) =>
      el("li", {}, `${(d.loc || []).join(".")}: ${d.msg}`))));
  }
  box.hidden = false;
}

// Runs an action; an error becomes a visible message (never a blank page).
async function guarded(fn, button) {
  if (button) button.disabled = true;
  try {
    notify(null);
    return await fn();
  } catch (err) {
    if (!(err instanceof ApiError && err.status === 401)) notify(err);
    return undefined;
  } finally {
    if (button) button.disabled = false;
  }
}

function every(ms, fn) {
  const id = setInterval(fn, ms);
  state.timers.add(id);
  return () => { clearInterval(id); state.timers.delete(id); };
}
function stopTimers() { for (const id of state.timers) clearInterval(id); state.timers.clear(); }

function ready(view) {  // the page has its data: tests and timings wait for this
  document.body.dataset.ready = view;
  window.cdmReadyAt = performance.now();
}

// ------------------------------------------------------------------ charts
// Horizontal bars: [{label, value, color}], values in [0, max].
function barsChart(items, opts) {
  const o = Object.assign({ width: 260, row: 16, max: null, fmt: pct, labelWidth: 70 }, opts);
  const max = o.max || Math.max(1e-12, ...items.map((i) => Math.abs(i.value)));
  const h = items.length * o.row + 4, plot = o.width - o.labelWidth - 46;
  const chart = svg("svg", { class: "chart bars", viewBox: `0 0 ${o.width} ${h}`,
    role: "img", "aria-label": o.title || "bar chart" });
  chart.style.maxWidth = `${o.width * 1.4}px`;
  items.forEach((it, i) => {
    const y = 2 + i * o.row, w = Math.max(0, (Math.max(0, it.value) / max) * plot);
    chart.append(
      svg("text", { x: o.labelWidth - 4, y: y + o.row * 0.72, "text-anchor": "end",
        text: it.label }),
      svg("rect", { x: o.labelWidth, y: y + 2, width: w.toFixed(2), height: o.row - 5,
        fill: it.color || color(it.label), rx: 2, "data-label": it.label,
        "data-value": String(it.value) }),
      svg("text", { x: o.labelWidth + w + 4, y: y + o.row * 0.72, class: "muted",
        text: o.fmt(it.value) }));
  });
  return chart;
}

// Lines over time: series [{name, color, points: [[t, y], ...]}].
function lineChart(series, opts) {
  const o = Object.assign({ width: 320, height: 170, fmt: (y) => num(y, 2), title: "" }, opts);
  const pts = series.flatMap((s) => s.points);
  const chart = svg("svg", { class: "chart line", viewBox: `0 0 ${o.width} ${o.height}`,
    role: "img", "aria-label": o.title });
  chart.style.maxWidth = `${o.width * 1.4}px`;
  const L = 46, R = 10, T = 18, B = 24, W = o.width - L - R, H = o.height - T - B;
  chart.append(svg("text", { x: 0, y: 11, text: o.title }));
  if (!pts.length) {
    chart.append(svg("text", { x: L, y: T + H / 2, class: "muted", text: "no data yet" }));
    return chart;
  }
  let t0 = Math.min(...pts.map((p) => p[0])), t1 = Math.max(...pts.map((p) => p[0]));
  if (t1 - t0 < 1) { t0 -= 30; t1 += 30; }
  const y1 = Math.max(1e-12, ...pts.map((p) => p[1])) * 1.08, y0 = Math.min(0, ...pts.map((p) => p[1]));
  const X = (t) => L + ((t - t0) / (t1 - t0)) * W, Y = (y) => T + H - ((y - y0) / (y1 - y0)) * H;
  chart.append(
    svg("line", { class: "axis", x1: L, y1: T + H, x2: L + W, y2: T + H }),
    svg("line", { class: "axis", x1: L, y1: T, x2: L, y2: T + H }),
    svg("text", { x: L - 4, y: T + 4, "text-anchor": "end", class: "muted", text: o.fmt(y1 / 1.08) }),
    svg("text", { x: L - 4, y: T + H, "text-anchor": "end", class: "muted", text: o.fmt(y0) }),
    svg("text", { x: L, y: o.height - 6, class: "muted", text: when(t0).slice(5, 16) }),
    svg("text", { x: L + W, y: o.height - 6, "text-anchor": "end", class: "muted",
      text: when(t1).slice(5, 16) }));
  for (const s of series) {
    if (!s.points.length) continue;
    const d = s.points.map((p, i) => `${i ? "L" : "M"}${X(p[0]).toFixed(1)},${Y(p[1]).toFixed(1)}`);
    if (s.points.length > 1) {
      chart.append(svg("path", { d: d.join(" "), fill: "none", stroke: s.color,
        "stroke-width": 2, "data-series": s.name }));
    }
    for (const p of s.points) {
      chart.append(svg("circle", { cx: X(p[0]).toFixed(1), cy: Y(p[1]).toFixed(1), r: 2.6,
        fill: s.color, "data-series": s.name, "data-value": String(p[1]) }));
    }
  }
  return chart;
}

// Grouped bars: groups (contributors) x series (methods); values may be negative.
function groupedBars(groups, series, value, opts) {
  const o = Object.assign({ width: 640, height: 230, title: "" }, opts);
  const vals = groups.flatMap((g) => series.map((s) => value(g, s))).filter((v) => v !== undefined);
  const hi = Math.max(0, ...vals), lo = Math.min(0, ...vals), span = hi - lo || 1;
  const L = 48, R = 8, T = 18, B = 26, W = o.width - L - R, H = o.height - T - B;
  const Y = (v) => T + ((hi - v) / span) * H, gw = W / Math.max(1, groups.length);
  const bw = Math.max(2, (gw * 0.8) / Math.max(1, series.length));
  const chart = svg("svg", { class: "chart grouped", viewBox: `0 0 ${o.width} ${o.height}`,
    role: "img", "aria-label": o.title });
  chart.style.maxWidth = `${o.width * 1.4}px`;
  chart.append(svg("text", { x: 0, y: 11, text: o.title }),
    svg("line", { class: "axis", x1: L, y1: Y(0), x2: L + W, y2: Y(0) }),
    svg("text", { x: L - 4, y: T + 4, "text-anchor": "end", class: "muted", text: num(hi, 3) }),
    svg("text", { x: L - 4, y: T + H, "text-anchor": "end", class: "muted", text: num(lo, 3) }));
  groups.forEach((g, gi) => {
    const x0 = L + gi * gw + gw * 0.1;
    series.forEach((s, si) => {
      const v = value(g, s);
      if (v === undefined) return;
      chart.append(svg("rect", { x: (x0 + si * bw).toFixed(1), y: Math.min(Y(v), Y(0)).toFixed(1),
        width: (bw - 1).toFixed(1), height: Math.abs(Y(v) - Y(0)).toFixed(1), fill: s.color,
        "data-group": g, "data-series": s.name, "data-value": String(v) }));
    });
    chart.append(svg("text", { x: (L + gi * gw + gw / 2).toFixed(1), y: o.height - 8,
      "text-anchor": "middle", text: g }));
  });
  return chart;
}

function scatter(points, opts) {  // points: [{x, y, label}]
  const o = Object.assign({ size: 220, title: "", xname: "x", yname: "y" }, opts);
  const L = 40, T = 18, S = o.size - L - 14;
  const xs = points.map((p) => p.x), ys = points.map((p) => p.y);
  const lo = Math.min(...xs, ...ys), hi = Math.max(...xs, ...ys), span = hi - lo || 1;
  const P = (v) => (v - lo) / span;
  const chart = svg("svg", { class: "chart scatter", viewBox: `0 0 ${o.size} ${o.size + 14}`,
    role: "img", "aria-label": o.title });
  chart.style.maxWidth = `${o.size * 1.3}px`;
  chart.append(svg("text", { x: 0, y: 11, text: o.title }),
    svg("rect", { x: L, y: T, width: S, height: S, fill: "none", class: "axis", stroke: "#dde1e7" }),
    svg("line", { x1: L, y1: T + S, x2: L + S, y2: T, stroke: "#c5cbd3", "stroke-dasharray": "3 3" }),
    svg("text", { x: L + S / 2, y: T + S + 14, "text-anchor": "middle", class: "muted", text: o.xname }),
    svg("text", { x: L - 4, y: T + S / 2, "text-anchor": "end", class: "muted", text: o.yname }));
  for (const p of points) {
    const cx = L + P(p.x) * S, cy = T + S - P(p.y) * S;
    chart.append(svg("circle", { cx: cx.toFixed(1), cy: cy.toFixed(1), r: 3.5, fill: color(p.label),
      "data-label": p.label }, svg("title", { text: `${p.label}: ${num(p.x, 4)}, ${num(p.y, 4)}` })),
    svg("text", { x: (cx + 5).toFixed(1), y: (cy + 3).toFixed(1), class: "muted", text: p.label }));
  }
  return chart;
}

// "beta-shapley (alpha 16, beta 1)": a policy's method with its parameters
function policyMethod(p) {
  const params = p.params ? Object.entries(p.params).map(([k, v]) => `${k} ${v}`).join(", ") : "";
  return params ? `${p.method} (${params})` : p.method;
}

function pearson(a, b) {
  const n = a.length;
  if (n < 2) return null;
  const ma = a.reduce((s, x) => s + x, 0) / n, mb = b.reduce((s, x) => s + x, 0) / n;
  let sab = 0, saa = 0, sbb = 0;
  for (let i = 0; i < n; i++) {
    sab += (a[i] - ma) * (b[i] - mb); saa += (a[i] - ma) ** 2; sbb += (b[i] - mb) ** 2;
  }
  return saa && sbb ? sab / Math.sqrt(saa * sbb) : null;
}

function legend(items) {
  return el("div", { class: "legend" }, items.map((i) => {
    const swatch = el("i");
    swatch.style.background = i.color;
    return el("span", {}, swatch, i.name);
  }));
}

// -------------------------------------------------------------- job panels
const JOB_STEPS = ["queued", "running", "succeeded"];

// Shows a background job until it ends; `onEnd(job)` after. `on401(err)` handles a
// key that stops working meanwhile (a contributor's own purge revokes it).
function jobPanel(jobId, title, opts) {
  const o = opts || {};
  const started = Date.now();
  const box = el("div", { class: "job", dataset: { jobId } },
    el("b", {}, title), " ", el("span", { class: "mono small" }, jobId));
  const steps = el("ul", { class: "steps" });
  const bar = el("div", { class: "bar" }, el("i"));
  const line = el("div", { class: "small muted status" }, "queued");
  const result = el("div", { class: "result" });
  box.append(steps, bar, line, result);
  let last = null, stop = null;
  const render = (job) => {
    const status = job.status;
    steps.replaceChildren(...JOB_STEPS.map((s, i) => {
      const at = JOB_STEPS.indexOf(status === "failed" ? "running" : status);
      let cls = i < at ? "done" : i === at ? "now" : "";
      if (status === "succeeded" && i === at) cls = "done";
      if (status === "failed" && s === "succeeded") return el("li", { class: "failed" }, "failed");
      return el("li", { class: cls }, s);
    }));
    const secs = ((job.finished_at || Date.now() / 1000) - (job.created_at || started / 1000));
    line.textContent = `${status} · ${secs.toFixed(1)} s` +
      (status === "running" || status === "queued" ? " · in progress" : "");
    box.dataset.status = status;
    bar.className = "bar" + (status === "succeeded" ? " done" : status === "failed" ? " failed" : "");
    if (status === "failed") {
      result.replaceChildren(el("p", { class: "err" }, "Failed: " + (job.error || "no reason given")));
    } else if (status === "succeeded") {
      result.replaceChildren(el("details", { open: o.openResult }, el("summary", {}, "result"),
        el("pre", {}, JSON.stringify(job.result, null, 2))));
    }
  };
  const poll = async () => {
    try {
      const job = await api("job", { job_id: jobId }, { keep401: !!o.on401 });
      last = job;
      render(job);
      if (job.status === "succeeded" || job.status === "failed") {
        stop();
        if (o.onEnd) o.onEnd(job);
      }
    } catch (err) {
      if (err.status === 401 && o.on401) { stop(); o.on401(err, last, box); return; }
      stop();
      line.textContent = "could not read the job: " + err.message;
      line.className = "small err status";
    }
  };
  render({ status: "queued", created_at: started / 1000 });
  stop = every(500, poll);
  poll();
  return box;
}

// ----------------------------------------------------------------- shell
function signOut(message) {
  sessionStorage.removeItem(KEY);
  state.me = null;
  stopTimers();
  renderSignIn(message);
}

function setTabs(tabs, current) {
  const nav = $("#tabs");
  nav.replaceChildren(...tabs.map(([id, text]) =>
    el("a", { href: "#" + id, class: id === current ? "active" : "", dataset: { tab: id } }, text)));
  nav.hidden = tabs.length < 2;
}

function renderSignIn(message) {
  $("#who").textContent = "";
  $("#signout").hidden = true;
  $("#tabs").hidden = true;
  notify(message ? "Signed out: " + message : null);
  const input = el("input", { id: "key", name: "key", type: "password", autocomplete: "off",
    spellcheck: "false", placeholder: "cdm_…", required: true });
  const form = el("form", { class: "card signin", id: "signin" },
    el("h2", {}, "Sign in"),
    el("p", { class: "muted small" },
      "Paste an API key (from ", el("span", { class: "mono" }, "cdm keys create"),
      "). It stays in this browser tab only (sessionStorage) and is sent with every call to the API."),
    el("label", {}, "API key", input),
    el("p", {}, el("button", { type: "submit" }, "Sign in")));
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    sessionStorage.setItem(KEY, input.value.trim());
    boot();
  });
  $("#main").replaceChildren(form);
  document.body.dataset.ready = "signin";
  window.cdmReadyAt = performance.now();
  input.focus();
}

async function boot() {
  stopTimers();
  if (!sessionStorage.getItem(KEY)) return renderSignIn();
  $("#main").replaceChildren(el("p", { class: "muted" }, "Loading…"));
  let me;
  try {
    me = await api("whoami", {}, { keep401: true });
  } catch (err) {
    if (err.status === 401) return signOut(err.message);
    $("#main").replaceChildren();
    notify(err);
    return;
  }
  state.me = me;
  $("#who").replaceChildren(me.user + " ", el("span", { class: "tag " + me.role }, me.role),
    me.contributor_id ? ` acts for ${me.contributor_id}` : "");
  $("#signout").hidden = false;
  route();
}

const VIEWS = {
  user: [["generate", "Generate", viewGenerate], ["usage", "History & usage", viewUsage]],
  contributor: [["mine", "My contribution", viewContributor]],
  admin: [["contributors", "Contributors", viewContributors], ["jobs", "Jobs", viewJobs],
          ["audit", "Audit log", viewAudit], ["keys", "Keys", viewKeys],
          ["valuation", "Valuation", viewValuation], ["generate", "Generate", viewGenerate]],
};

async function route() {
  if (!state.me) return;
  const views = VIEWS[state.me.role] || [];
  const want = location.hash.slice(1);
  const [id, , fn] = views.find((v) => v[0] === want) || views[0];
  stopTimers();
  notify(null);
  state.tab = id;
  setTabs(views, id);
  const main = $("#main");
  main.replaceChildren(el("p", { class: "muted" }, "Loading…"));
  delete document.body.dataset.ready;
  try {
    const view = await fn();
    if (state.tab !== id) return;  // the person moved on meanwhile
    main.replaceChildren(view);
    ready(id);
  } catch (err) {
    if (err instanceof ApiError && err.status === 401) return;
    main.replaceChildren(el("p", { class: "muted" }, "This page could not load."));
    notify(err);
    ready(id);
  }
}

// ------------------------------------------------------------ customer
async function viewGenerate() {
  const [{ contributors }] = await Promise.all([api("contributors")]);
  assignColors(contributors.map((c) => c.contributor_id));
  const me = state.me;
  const licensed = (c) => me.license === null || me.license.includes(c);
  const checks = contributors.map((c) => el("label",
    { class: licensed(c.contributor_id) ? "" : "unlicensed" },
    el("input", { type: "checkbox", name: "contributor", value: c.contributor_id,
      checked: licensed(c.contributor_id) }),
    c.contributor_id, licensed(c.contributor_id) ? "" : el("span", { class: "tag" }, "not licensed")));
  const labels = new Map();
  for (const c of contributors) {
    for (const [label, count] of Object.entries(c.labels || {})) {
      labels.set(label, (labels.get(label) || 0) + count);
    }
  }
  const labelSelect = labels.size ? el("select", { id: "label", name: "label" },
    el("option", { value: "" }, "any"),
    [...labels.keys()].sort((a, b) => Number(a) - Number(b)).map((l) =>
      el("option", { value: l }, `${l} (${labels.get(l)} images)`))) : null;
  // a text-conditional store: its contributors hold captions, and generate takes a prompt
  const textStore = contributors.some((c) => c.captions);
  const prompt = textStore ? el("input", { id: "prompt", type: "text", maxlength: 300,
    placeholder: "e.g. red apple (empty: no prompt)" }) : null;
  const guidance = textStore ? el("input", { id: "guidance", type: "number", min: 0, max: 20,
    step: 0.5, value: 1 }) : null;
  const n = el("input", { id: "n", type: "number", min: 1, value: 4 });
  const seed = el("input", { id: "seed", type: "number", min: 0, value: 0 });
  const steps = el("input", { id: "steps", type: "number", min: 1, value: 50 });
  const topk = el("input", { id: "top_k", type: "number", min: 1, value: 3 });
  const topkLabel = el("label", { hidden: true }, "top k", topk);
  const routing = el("select", { id: "routing" },
    el("option", { value: "default" }, "default (top 3, mass 0.9)"),
    el("option", { value: "dense" }, "dense (every shard)"),
    el("option", { value: "topk" }, "top k shards"));
  routing.addEventListener("change", () => { topkLabel.hidden = routing.value !== "topk"; });
  const button = el("button", { type: "submit", id: "generate" }, "Generate");
  const progress = el("div", { class: "progress", hidden: true });
  const out = el("div", { id: "gallery-out" });
  const form = el("form", { class: "card", id: "generate-form" },
    el("h2", {}, "Generate"),
    el("fieldset", {}, el("legend", {}, "Contributors (the API refuses any your key is not licensed for)"),
      el("div", { class: "checks" }, checks.length ? checks : el("span", { class: "muted" }, "no live contributor"))),
    el("div", { class: "form" },
      labelSelect ? el("label", {}, "label", labelSelect) : null,
      prompt ? el("label", { class: "wide" }, "prompt", prompt) : null,
      guidance ? el("label", {}, "guidance", guidance) : null,
      el("label", {}, "n", n), el("label", {}, "seed", seed), el("label", {}, "steps", steps),
      el("label", {}, "routing", routing), topkLabel, button),
    progress);
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const body = {
      contributors: [...form.querySelectorAll("input[name=contributor]:checked")].map((i) => i.value),
      n: Number(n.value), seed: Number(seed.value), steps: Number(steps.value),
    };
    if (!body.contributors.length) delete body.contributors;  // all licensed
    if (labelSelect && labelSelect.value !== "") body.label = Number(labelSelect.value);
    if (prompt && prompt.value.trim()) {
      body.prompt = prompt.value.trim();
      body.guidance = guidance.value === "" ? 1 : Number(guidance.value);
    }
    if (routing.value === "dense") body.mass = 1;
    if (routing.value === "topk") body.top_k = Number(topk.value);
    const t0 = performance.now();
    progress.hidden = false;
    progress.replaceChildren(el("div", { class: "bar" }, el("i")),
      el("span", { class: "small muted" }, `generating ${body.n} image(s)…`));
    const tick = every(200, () => {
      progress.lastChild.textContent =
        `generating ${body.n} image(s)… ${((performance.now() - t0) / 1000).toFixed(1)} s`;
    });
    guarded(async () => {
      try {
        const res = await api("generate", body);
        out.replaceChildren(gallery(res, (performance.now() - t0) / 1000));
      } finally {
        tick();
        progress.hidden = true;
      }
    }, button);
  });
  return el("div", {}, form, out);
}

// the attribution lines the licences of the contributors an image drew from require
function notices(list) {
  const lines = list.filter((n) => n.attribution);
  if (!lines.length) return el("span");
  return el("ul", { class: "notices small muted" }, lines.map((n) =>
    el("li", { title: `${n.contributor}: ${n.licence}, share ${pct(n.share)}` },
      `${n.attribution} (${pct(n.share)})`)));
}

function gallery(res, seconds) {
  const ids = res.contributors;
  const figures = res.images.map((b64, i) => {
    const items = ids.map((c) => ({ label: c, value: res.attribution[c][i] }))
      .sort((a, b) => b.value - a.value);
    return el("figure", { class: "sample", dataset: { index: i } },
      el("img", { src: "data:image/png;base64," + b64, alt: `image ${i + 1}` }),
      el("figcaption", {}, el("div", { class: "muted" }, `#${i + 1}` +
        (res.labels ? ` · label ${res.labels[i]}` : "") +
        (res.prompt ? ` · “${res.prompt}”` : "") + " · attribution"),
        barsChart(items, { max: 1, width: 150, labelWidth: 34, row: 15,
          title: `attribution of image ${i + 1}` }),
        notices((res.notices || [])[i] || [])));
  });
  return el("section", { class: "card", id: "gallery" },
    el("h2", {}, `${res.images.length} image(s)`),
    el("p", { class: "small muted" }, "request ", el("span", { class: "mono", id: "request-id" }, res.request_id),
      ` · contributors ${ids.join(", ")} · ${seconds.toFixed(1)} s`),
    el("div", { class: "gallery" }, figures));
}

async function viewUsage() {
  const [credit, history] = await Promise.all([api("credit"), api("history", { limit: 20 })]);
  const rows = Object.entries(credit.contributors);
  const usage = el("section", { class: "card", id: "usage" }, el("h2", {}, "Usage"),
    rows.length ? [
      barsChart(rows.map(([c, r]) => ({ label: c, value: r.usage.mass })),
        { fmt: (v) => num(v, 2), title: "attribution mass by contributor", width: 360 }),
      table(["contributor", ["samples", "num"], ["attribution mass", "num"], ["share", "num"]],
        rows.map(([c, r]) => el("tr", {}, td(c), numTd(r.usage.samples, 0), numTd(r.usage.mass, 3),
          td(pct(r.usage.share), "num"))))]
      : el("p", { class: "muted" }, "No usage yet."));
  const detail = el("div", { id: "attribution-detail" });
  const hist = el("section", { class: "card", id: "history" }, el("h2", {}, "Request history"),
    history.requests.length ? table(["time", "contributors", ["n", "num"], ["seed", "num"],
      ["steps", "num"], "request", ""],
    history.requests.map((r) => el("tr", { dataset: { requestId: r.request_id } },
      td(when(r.created_at)), td(r.contributors.join(", ") +
        (r.params.label ? ` · label ${[...new Set(r.params.label)].join(", ")}` : "")), numTd(r.params.n, 0),
      numTd(r.params.seed, 0), numTd(r.params.steps, 0),
      td(r.request_id.slice(0, 8), "mono"),
      td(el("button", { class: "small secondary", type: "button",
        onclick: (ev) => guarded(() => showAttribution(r.request_id, detail), ev.target) },
      "attribution")))))
      : el("p", { class: "muted" }, "No requests yet."), detail);
  return el("div", {}, usage, hist);
}

async function showAttribution(requestId, box) {
  const a = await api("attribution", { request_id: requestId });
  const n = a.params.n || 1;
  const items = Object.entries(a.attribution).map(([c, ws]) =>
    ({ label: c, value: ws.reduce((s, w) => s + w, 0) / n })).sort((x, y) => y.value - x.value);
  box.replaceChildren(el("h3", {}, `Mean attribution of request ${requestId.slice(0, 8)} (${n} image(s))`),
    barsChart(items, { max: 1, width: 360 }));
}

// ----------------------------------------------------------- contributor
async function viewContributor() {
  const cid = state.me.contributor_id;
  const [credit, history, vals, audit] = await Promise.all([api("credit"),
    api("history", { limit: 1000 }), api("valuations"), api("audit", { limit: 50 })]);
  const row = credit.contributors[cid] || { usage: { samples: 0, mass: 0, share: 0 } };
  const policy = credit.payout_policy || {};
  const stats = el("div", { class: "cards", id: "stats" },
    [["samples generated with you", num(row.usage.samples, 0)],
     ["attribution mass", num(row.usage.mass, 3)],
     ["share of all mass", pct(row.usage.share)],
     ["payout share", row.payout_share === null || row.payout_share === undefined ? "—" : pct(row.payout_share)],
     ...(row.licence ? [[row.licence.licence, row.licence.attribution]] : [])]
      .map(([k, v]) => el("div", { class: "stat" }, el("b", {}, v), el("span", {}, k))));
  // cumulative usage over time, oldest first
  let samples = 0, mass = 0;
  const usagePts = history.requests.slice().reverse().map((r) => {
    samples += r.samples; mass += r.mass;
    return [r.created_at, samples, mass];
  });
  const payoutPts = vals.valuations.filter((v) => v.payout_shares)
    .map((v) => [v.at, v.payout_shares[cid]]).reverse();
  const charts = el("div", { class: "charts", id: "over-time" },
    lineChart([{ name: "samples", color: "#2f5fd0", points: usagePts.map((p) => [p[0], p[1]]) }],
      { title: "samples (cumulative)", fmt: (y) => num(y, 0) }),
    lineChart([{ name: "mass", color: "#1e7d3c", points: usagePts.map((p) => [p[0], p[2]]) }],
      { title: "attribution mass (cumulative)" }),
    lineChart([{ name: "payout", color: "#a15c00", points: payoutPts }],
      { title: `payout share (${policy.policy ? policy.policy.property + ", " + policyMethod(policy.policy) : "policy"})`, fmt: pct }));
  const shapley = Object.entries(credit.valuations || {});
  const values = el("section", { class: "card", id: "shapley" }, el("h2", {}, "Latest Shapley values"),
    shapley.length ? table(["property", ["value", "num"], "method", "recorded"],
      shapley.map(([prop, v]) => el("tr", {}, td(prop), numTd(v.values[cid], 4), td(v.method), td(when(v.at)))))
      : el("p", { class: "muted" }, "No valuation has valued you yet."),
    policy.note ? el("p", { class: "small muted" }, policy.note) : null);
  return el("div", {},
    el("section", { class: "card" }, el("h2", {}, `Contributor ${cid}`), stats,
      el("h3", {}, "Over time"), charts),
    values, removeSection(cid), auditSection(audit.records, "Your audit records"));
}

function removeSection(cid) {
  const box = el("section", { class: "card", id: "remove" }, el("h2", {}, "Remove my data"),
    el("p", { class: "small" }, `Excludes ${cid} from every request from now on, then deletes your ` +
      "shard, your router head and any kept images, and the cached valuations that used them. " +
      "It cannot be undone. As the purge's last step this key is revoked."));
  const start = el("button", { class: "danger", type: "button", id: "remove-start" }, "Remove my data…");
  const area = el("div");
  start.addEventListener("click", () => {
    start.hidden = true;
    const yes = el("button", { class: "danger", type: "button", id: "remove-confirm" },
      `Yes, remove ${cid}`);
    const no = el("button", { class: "secondary", type: "button" }, "Cancel");
    no.addEventListener("click", () => { area.replaceChildren(); start.hidden = false; });
    yes.addEventListener("click", () => guarded(async () => {
      const ack = await api("forget", { contributor_id: cid });
      stopTimers();  // nothing else on this page polls while the purge runs
      // the acknowledgement carries the exclusion's record: shown at once, since the key
      // may be revoked (purge done) before an audit request would get through
      const records = el("div", { id: "remove-audit" },
        auditSection(ack.audit ? [ack.audit] : [], "Audit records"));
      const done = el("div", { id: "remove-done" });
      const showAudit = async () => {
        try {
          const a = await api("audit", { limit: 20 }, { keep401: true });
          records.replaceChildren(auditSection(a.records, "Audit records"));
        } catch (_) { /* the key is revoked once the purge ends: keep what was shown */ }
      };
      const panel = jobPanel(ack.job_id, "Purge", {
        openResult: true,
        onEnd: (job) => { showAudit(); done.replaceChildren(el("p", { class: "ok" }, `Purge ${job.status}.`)); },
        on401: (err, last, pbox) => {
          // the purge revokes this key as its last step: it is done
          pbox.dataset.status = "succeeded";
          $(".bar", pbox).className = "bar done";
          for (const li of pbox.querySelectorAll(".steps li")) li.className = "done";
          $(".status", pbox).textContent = "purge finished: the key was revoked as its last step";
          sessionStorage.removeItem(KEY);
          done.replaceChildren(el("p", { class: "ok" },
            `Your data is deleted: ${cid} was excluded at once and purged; this key no longer ` +
            `works (${err.message}). The admin's audit log holds the purge record.`),
          el("button", { type: "button", onclick: () => signOut() }, "Back to sign-in"));
        },
      });
      area.replaceChildren(el("p", {}, `Acknowledged: ${cid} is excluded from every request from now on.`),
        panel, done, records);
      showAudit();
    }, yes));
    area.replaceChildren(el("div", { class: "confirm" },
      el("p", {}, el("b", {}, `Remove ${cid}'s data for good?`)), el("div", { class: "row" }, yes, no)));
  });
  box.append(start, area);
  return box;
}

function auditSection(records, title) {
  return el("section", { class: "card audit" }, el("h2", {}, title),
    records.length ? table(["time", "actor", "action", "contributor", "details"],
      records.map((r) => el("tr", { dataset: { action: r.action, contributor: r.contributor_id } },
        td(when(r.at)), td(r.actor), td(r.action), td(r.contributor_id),
        td(el("details", {}, el("summary", {}, detailSummary(r.details)),
          el("pre", {}, JSON.stringify(r.details, null, 2)))))))
      : el("p", { class: "muted" }, "No records."));
}
function detailSummary(d) {
  if (!d) return "—";
  const keys = ["job_id", "key_id", "property", "self_request"].filter((k) => k in d);
  return keys.map((k) => `${k}: ${typeof d[k] === "string" ? d[k].slice(0, 8) : d[k]}`).join(", ") || "details";
}

// ---------------------------------------------------------------- admin
async function viewContributors() {
  const jobs = el("div", { id: "admin-jobs" });
  const tableBox = el("section", { class: "card", id: "contributors" });
  let pending = false;
  const refreshLater = () => {  // reload the table; job panels stay and keep polling
    if (pending) return;
    pending = true;
    setTimeout(() => guarded(async () => {
      pending = false;
      tableBox.replaceChildren(...await contributorsTable(jobs, refreshLater));
    }), 300);
  };
  tableBox.append(...await contributorsTable(jobs, refreshLater));
  const folder = el("input", { id: "add-folder", placeholder: "/srv/data/zoe", required: true });
  const kind = el("select", { id: "add-kind" }, el("option", { value: "" }, "store default"),
    el("option", { value: "full" }, "full"), el("option", { value: "lora" }, "lora"));
  const addButton = el("button", { type: "submit", id: "add" }, "Add contributor");
  const add = el("form", { class: "card", id: "add-form" }, el("h2", {}, "Add a contributor"),
    el("p", { class: "small muted" }, "A folder of images on the server, under CDM_DATA_ROOTS; " +
      "its name is the contributor id. The folder is checked now; training runs as a job."),
    el("div", { class: "form" }, el("label", { class: "wide" }, "folder", folder),
      el("label", {}, "kind", kind), addButton));
  add.addEventListener("submit", (ev) => {
    ev.preventDefault();
    guarded(async () => {
      const body = { folder: folder.value.trim() };
      if (kind.value) body.kind = kind.value;
      const ack = await api("add_contributor", body);
      jobs.prepend(jobPanel(ack.job_id, `Add ${ack.contributor_id}`, { onEnd: refreshLater }));
    }, addButton);
  });
  return el("div", {}, tableBox, jobs, add);
}

async function contributorsTable(jobs, refreshLater) {
  const [{ contributors }, credit] = await Promise.all([api("contributors"), api("credit")]);
  assignColors(contributors.map((c) => c.contributor_id));
  const props = Object.keys(credit.valuations || {}).sort();
  const live = new Set(contributors.map((c) => c.contributor_id));
  const rows = contributors.map((c) => {
    const r = credit.contributors[c.contributor_id] || { usage: {} };
    const labels = Object.entries(c.labels || {}).map(([l, k]) => `${l}:${k}`).join(" ");
    const actions = el("td");
    const forget = el("button", { class: "small danger", type: "button", dataset: { forget: c.contributor_id } }, "Forget…");
    forget.addEventListener("click", () => {
      const yes = el("button", { class: "small danger", type: "button", dataset: { confirm: c.contributor_id } }, "Yes, forget");
      const no = el("button", { class: "small secondary", type: "button" }, "Cancel");
      no.addEventListener("click", () => actions.replaceChildren(forget));
      yes.addEventListener("click", () => guarded(async () => {
        const ack = await api("forget", { contributor_id: c.contributor_id });
        actions.replaceChildren(el("span", { class: "small muted" }, "excluded; purging"));
        jobs.prepend(jobPanel(ack.job_id, `Forget ${c.contributor_id}`, { onEnd: refreshLater }));
      }, yes));
      actions.replaceChildren(el("div", { class: "row" }, yes, no));
    });
    actions.append(forget);
    return el("tr", { dataset: { contributor: c.contributor_id } }, td(c.contributor_id),
      numTd(c.images, 0), td(labels || "—", "small"),
      r.licence ? el("td", { title: r.licence.attribution }, `${c.kind} · ${r.licence.licence}`) : td(c.kind),
      numTd(r.usage.samples, 0),
      numTd(r.usage.mass, 3), td(pct(r.payout_share), "num"),
      props.map((p) => numTd((credit.valuations[p].values || {})[c.contributor_id], 4)), actions);
  });
  const gone = Object.entries(credit.contributors).filter(([c]) => !live.has(c));
  const policy = credit.payout_policy;
  return [el("h2", {}, `Live contributors (${contributors.length})`),
    table(["id", ["images", "num"], "labels", "kind · licence", ["samples", "num"], ["mass", "num"],
      ["payout share", "num"], props.map((p) => [`φ ${p}`, "num"]), ""], rows, { id: "contributors-table" }),
    policy ? el("p", { class: "small muted" },
      `Payout policy: ${policy.policy.property} by ${policyMethod(policy.policy)}` +
      ` (set by ${policy.policy.set_by}). ${policy.note || ""}`) : "",
    gone.length ? el("h3", {}, "Forgotten (past usage, kept in the ledger)") : "",
    gone.length ? table(["id", ["samples", "num"], ["mass", "num"]], gone.map(([c, r]) =>
      el("tr", { dataset: { forgotten: c } }, td(c), numTd(r.usage.samples, 0), numTd(r.usage.mass, 3))),
    { id: "forgotten-table" }) : ""];
}

async function viewJobs() {
  const { jobs } = await api("jobs", { limit: 50 });
  const body = el("tbody");
  const fill = (list) => body.replaceChildren(...list.map((j) => el("tr", { dataset: { jobId: j.job_id, status: j.status } },
    td(j.job_id.slice(0, 8), "mono"), td(j.kind), td(j.params.contributor_id || j.params.property || "—"),
    td(j.actor), td(el("span", { class: j.status === "failed" ? "err" : j.status === "succeeded" ? "ok" : "" }, j.status)),
    td(when(j.created_at)),
    td(j.finished_at ? `${(j.finished_at - j.created_at).toFixed(1)} s` : "…", "num"),
    td(j.error || "", "small err"))));
  fill(jobs);
  const box = el("section", { class: "card", id: "jobs" }, el("h2", {}, "Background jobs"),
    el("p", { class: "small muted" }, "Newest first; refreshed every 2 s while any runs."),
    el("div", { class: "scroll" }, el("table", {}, el("thead", {}, el("tr", {},
      ["job", "kind", "about", "by", "status", "created", "took", "error"].map((h) => el("th", {}, h)))), body)));
  if (jobs.some((j) => j.status === "queued" || j.status === "running")) {
    const stop = every(2000, async () => {
      try {
        const again = await api("jobs", { limit: 50 });
        fill(again.jobs);
        if (!again.jobs.some((j) => j.status === "queued" || j.status === "running")) stop();
      } catch (err) { stop(); notify(err); }
    });
  }
  return box;
}

async function viewAudit() {
  const { records } = await api("audit", { limit: 500 });
  return auditSection(records, `Audit log (${records.length} newest)`);
}

async function viewKeys() {
  const { keys } = await api("keys");
  const now = Date.now() / 1000;
  const rows = keys.slice().reverse().map((k) => {
    const status = k.revoked_at ? "revoked" : k.expires_at && k.expires_at <= now ? "expired" : "active";
    const cell = el("td");
    if (status === "active") {
      const b = el("button", { class: "small danger", type: "button", dataset: { revoke: k.key_id } }, "Revoke…");
      b.addEventListener("click", () => {
        const yes = el("button", { class: "small danger", type: "button", dataset: { confirm: k.key_id } },
          k.key_id === state.me.key_id ? "Yes, revoke my own key" : "Yes, revoke");
        const no = el("button", { class: "small secondary", type: "button" }, "Cancel");
        no.addEventListener("click", () => cell.replaceChildren(b));
        yes.addEventListener("click", () => guarded(async () => {
          await api("revoke_key", { key_id: k.key_id });
          await route();
          notify(`Key ${k.key_id} of ${k.user} revoked: refused from its next request on.`, "info");
        }, yes));
        cell.replaceChildren(el("div", { class: "row" }, yes, no));
      });
      cell.append(b);
    }
    const licence = k.contributor_id ? `acts for ${k.contributor_id}` : k.license === null ? "all"
      : k.license.join(", ") || "—";
    return el("tr", { dataset: { keyId: k.key_id, status } }, td(k.key_id, "mono"), td(k.user),
      td(el("span", { class: "tag " + k.role }, k.role)), td(licence, "small"), td(status),
      td(when(k.created_at)), td(k.expires_at ? when(k.expires_at) : "never"), cell);
  });
  return el("section", { class: "card", id: "keys" }, el("h2", {}, `API keys (${keys.length})`),
    el("p", { class: "small muted" }, "Create keys with cdm keys create; a key is shown once, when created."),
    table(["key id", "user", "role", "licence", "status", "created", "expires", ""], rows));
}

const METHOD_COLORS = ["#2f5fd0", "#1e7d3c", "#a15c00", "#8e3bbd", "#b3261e", "#00838f",
  "#6d4c41", "#5f6b7a", "#c2185b", "#558b2f"];

async function viewValuation() {
  const [vals, credit] = await Promise.all([api("valuations", { limit: 1000 }), api("credit")]);
  const box = el("section", { class: "card", id: "valuation" }, el("h2", {}, "Latest valuation"));
  if (!vals.valuations.length) {
    box.append(el("p", { class: "muted" }, "No valuation recorded yet: run the value endpoint or cdm value."));
    return box;
  }
  // the newest recorded values of each (property, method); properties newest first
  const latest = new Map();
  for (const v of vals.valuations) {
    if (!latest.has(v.property)) latest.set(v.property, new Map());
    const m = latest.get(v.property);
    if (!m.has(v.method)) m.set(v.method, v);
  }
  const policy = vals.policy;
  box.append(el("p", { class: "small muted" },
    `Payout policy: ${policy.property} by ${policyMethod(policy)} (set by ${policy.set_by || "default"}). ` +
    (credit.payout_policy && credit.payout_policy.note ? credit.payout_policy.note : "")));
  const select = el("select", { id: "valuation-property" },
    [...latest.keys()].sort().map((p) => el("option", { value: p }, p)));
  select.value = latest.has(policy.property) ? policy.property : [...latest.keys()][0];
  const body = el("div", { id: "valuation-report" });
  const show = () => {
    const order = (m) => (m.method === "exact" ? "" : m.method);  // exact first
    const methods = [...latest.get(select.value).values()].sort((a, b) => order(a).localeCompare(order(b)));
    const players = [...new Set(methods.flatMap((m) => Object.keys(m.values)))].sort();
    const series = methods.map((m, i) => ({ name: m.method, color: METHOD_COLORS[i % METHOD_COLORS.length] }));
    const byMethod = Object.fromEntries(methods.map((m) => [m.method, m]));
    const ref = byMethod.exact ? "exact" : methods[0].method;
    const scatters = methods.filter((m) => m.method !== ref).map((m) => {
      const common = players.filter((p) => p in m.values && p in byMethod[ref].values);
      const r = pearson(common.map((p) => byMethod[ref].values[p]), common.map((p) => m.values[p]));
      return scatter(common.map((p) => ({ label: p, x: byMethod[ref].values[p], y: m.values[p] })),
        { title: `${m.method} vs ${ref}: r = ${r === null ? "—" : r.toFixed(3)}`, xname: ref, yname: m.method });
    });
    // the server gives payout_shares only on the rows the policy pays by
    const policyRow = methods.find((m) => m.payout_shares) || null;
    body.replaceChildren();
    append(body, [
      groupedBars(players, series, (g, s) => byMethod[s.name].values[g],
        { title: `${select.value}: value by method and contributor` }),
      legend(series),
      scatters.length ? el("div", { class: "charts" }, scatters) : null,
      table(["method", "recorded", players.map((p) => [p, "num"])],
        methods.map((m) => el("tr", { dataset: { method: m.method } }, td(m.method + (m.kind === "primary" ? " *" : "")),
          td(when(m.at), "small"), players.map((p) => numTd(m.values[p], 4))))),
      el("p", { class: "small muted" }, "* the values credit shows for this property."),
      policyRow ? [el("h3", {}, "Payout shares under the policy"),
        barsChart(players.map((p) => ({ label: p, value: policyRow.payout_shares[p] || 0 })), { max: 1, width: 360 })] : null]);
  };
  select.addEventListener("change", show);
  box.append(el("div", { class: "form" }, el("label", {}, "property", select)), body);
  show();
  return box;
}

// ----------------------------------------------------------------- start
window.addEventListener("hashchange", () => route());
window.addEventListener("error", (ev) => notify("console error: " + ev.message));
window.addEventListener("unhandledrejection", (ev) => {
  const err = ev.reason;
  if (!(err instanceof ApiError && err.status === 401)) notify(err instanceof Error ? err : String(err));
});
document.addEventListener("DOMContentLoaded", () => {
  $("#signout").addEventListener("click", () => signOut());
  boot();
});
