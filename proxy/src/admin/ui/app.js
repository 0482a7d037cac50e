// canary-proxy status page. Reads /status (the proxy's own view) and
// /metrics (request counts and latency buckets) once a second, and draws
// them. Read-only: it never sends anything but GETs to the admin port.
//
// Request rates and p99 come from the difference between two scrapes of the
// counters, so they are the proxy's own numbers, not the browser's guesses.
// The sparkline history lives only in this page: reload it and it starts
// over.
"use strict";

const POLL_MS = 1000;
const RATE_SPAN_S = 10; // rates and p99 over this many seconds
const HISTORY = 180; // sparkline points: 3 minutes at one a second

const history = new Map(); // version -> [{t (proxy uptime, ms), total, buckets}]
let lastGood = null;

function $(id) { return document.getElementById(id); }

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

const SVG = "http://www.w3.org/2000/svg";

// --- /metrics, the Prometheus text format ---------------------------------

// Samples of the families the page needs: {name, labels, value}.
function parseMetrics(text) {
  const wanted = ["canary_proxy_requests_total", "canary_proxy_request_duration_seconds_bucket"];
  const out = [];
  for (const line of text.split("\n")) {
    if (line.startsWith("#") || line === "") continue;
    const m = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)/.exec(line);
    if (!m || !wanted.includes(m[1])) continue;
    const labels = {};
    for (const l of (m[2] || "").matchAll(/([a-zA-Z_]\w*)="((?:[^"\\]|\\.)*)"/g)) labels[l[1]] = l[2];
    out.push({ name: m[1], labels, value: Number(m[3]) });
  }
  return out;
}

// Per version: answered requests so far, and the cumulative latency buckets.
function countsByVersion(samples) {
  const by = new Map();
  const get = (v) => {
    if (!by.has(v)) by.set(v, { total: 0, buckets: new Map() });
    return by.get(v);
  };
  for (const s of samples) {
    const v = s.labels.version;
    if (v === undefined) continue;
    if (s.name === "canary_proxy_requests_total") get(v).total += s.value;
    else get(v).buckets.set(s.labels.le, s.value);
  }
  return by;
}

// The sample RATE_SPAN_S ago (or the oldest one), to difference against.
function baseline(points, now) {
  let base = points[0];
  for (const p of points) if (now - p.t >= RATE_SPAN_S * 1000) base = p;
  return base;
}

function rate(points) {
  const last = points[points.length - 1];
  const base = baseline(points, last.t);
  const dt = (last.t - base.t) / 1000;
  return dt > 0 ? Math.max(0, last.total - base.total) / dt : null;
}

// The upper bound of the bucket holding the 99th percentile of the answers
// in the span, in seconds: "p99 <= this". null without answers.
function p99(points) {
  const last = points[points.length - 1];
  const base = baseline(points, last.t);
  const bounds = [...last.buckets.keys()]
    .map((le) => ({ le, bound: le === "+Inf" ? Infinity : Number(le) }))
    .sort((a, b) => a.bound - b.bound);
  const delta = (le) => (last.buckets.get(le) || 0) - (base.buckets.get(le) || 0);
  const count = delta("+Inf");
  if (!(count > 0)) return null;
  for (const { le, bound } of bounds) if (delta(le) >= 0.99 * count) return bound;
  return Infinity;
}

// --- formatting ----------------------------------------------------------

function pct(x) { return (100 * x).toFixed(x > 0 && x < 0.001 ? 3 : 1) + "%"; }
function ms(s) {
  if (s === null) return "\u2013";
  if (s === Infinity) return "> 10 s";
  return s < 1 ? "\u2264 " + (s * 1000).toFixed(s < 0.01 ? 1 : 0) + " ms" : "\u2264 " + s.toFixed(1) + " s";
}
function duration(s) {
  s = Math.floor(s);
  const d = Math.floor(s / 86400), h = Math.floor(s / 3600) % 24, m = Math.floor(s / 60) % 60;
  return (d ? d + "d " : "") + (d || h ? h + "h " : "") + m + "m " + (s % 60) + "s";
}
function when(t) { return t ? new Date(t).toLocaleString() : "never"; }

// --- drawing -------------------------------------------------------------

function meter(cls, fraction, label) {
  const m = el("div", "meter " + cls);
  const fill = el("span");
  // CSSOM, not a style attribute: the page's CSP forbids inline styles.
  fill.style.width = Math.max(0, Math.min(1, fraction)) * 100 + "%";
  m.append(fill);
  m.title = label;
  m.setAttribute("role", "img");
  m.setAttribute("aria-label", label);
  return m;
}

function row(parent, key, ...content) {
  parent.append(el("span", "k", key));
  const v = el("span", "v");
  v.append(...content);
  parent.append(v);
}

function sparkline(points) {
  const svg = document.createElementNS(SVG, "svg");
  svg.setAttribute("class", "spark");
  svg.setAttribute("viewBox", "0 0 " + HISTORY + " 36");
  svg.setAttribute("preserveAspectRatio", "none");
  const rates = [];
  for (let i = 1; i < points.length; i++) {
    const dt = (points[i].t - points[i - 1].t) / 1000;
    rates.push(dt > 0 ? Math.max(0, points[i].total - points[i - 1].total) / dt : 0);
  }
  const top = Math.max(1, ...rates);
  const offset = HISTORY - rates.length;
  const line = document.createElementNS(SVG, "polyline");
  line.setAttribute("points", rates.map((r, i) => (offset + i) + "," + (35 - (r / top) * 33).toFixed(1)).join(" "));
  svg.append(line);
  const t = document.createElementNS(SVG, "title");
  t.textContent = "requests/s over the last " + rates.length + " s; peak " + top.toFixed(1);
  svg.append(t);
  return svg;
}

function criterion(name, c) {
  if (!c) return el("span", "num", "not judged");
  const wrap = el("span");
  const cls = "evidence" + (c.evidence >= 1 ? " over" : c.evidence >= 0.5 ? " near" : "");
  wrap.append(meter(cls, c.evidence, name + " evidence " + c.evidence.toFixed(2) + " of the trip point"));
  wrap.append(el("span", "num",
    (c.evidence * 100).toFixed(0) + "% of the trip point; line " + pct(c.threshold) +
    ", " + c.judged + " judged" + (c.held ? ", held" : "")));
  return wrap;
}

function drawVersion(v, points) {
  const card = el("article", "version");
  card.dataset.version = v.name;
  const head = el("div", "head");
  head.append(el("h2", "name", v.name));
  head.append(el("span", "badge " + v.judgment.decision, v.judgment.decision.replace("_", " ")));
  head.append(el("span", "upstream", v.upstream + (v.protocol === "h2c" ? " (h2c)" : "")));
  card.append(head);
  if (v.rollback) {
    const r = v.rollback;
    card.append(el("p", "rollback",
      "Rolled back " + when(r.at) + " on " + r.criterion + ": " + r.reason + ". Its traffic goes to " + r.target + "."));
  }
  const rows = el("div", "rows");
  row(rows, "weight", meter("configured", v.share, "configured share " + pct(v.share)),
    el("span", "num weight", v.weight + " (" + pct(v.share) + ")"));
  row(rows, "effective", meter("effective", v.effective_share, "effective share " + pct(v.effective_share)),
    el("span", "num effective-weight", v.effective_weight + " (" + pct(v.effective_share) + ")"));
  const r = points.length > 1 ? rate(points) : null;
  row(rows, "requests/s", el("span", "num rate", r === null ? "\u2013" : r.toFixed(1)));
  row(rows, "answered", el("span", "num total", points.length ? String(points[points.length - 1].total) : "0"));
  row(rows, "error ratio", el("span", "num", pct(v.window.error_ratio) + " (" + v.window.errors + " of " + v.window.requests + " in the window)"));
  row(rows, "p99 latency", el("span", "num p99", points.length > 1 ? ms(p99(points)) : "\u2013"));
  row(rows, "errors", criterion("errors", v.judgment.errors));
  row(rows, "latency", criterion("latency", v.judgment.latency));
  card.append(rows);
  card.append(sparkline(points));
  return card;
}

function draw(status, counts, now) {
  for (const v of status.versions) {
    const c = counts.get(v.name) || { total: 0, buckets: new Map() };
    const points = history.get(v.name) || [];
    points.push({ t: now, total: c.total, buckets: c.buckets });
    while (points.length > HISTORY + 1) points.shift();
    history.set(v.name, points);
  }
  for (const name of [...history.keys()]) {
    if (!status.versions.some((v) => v.name === name)) history.delete(name);
  }
  $("uptime").textContent = duration(status.uptime_seconds);
  $("routes").textContent = status.routes.hash + ", loaded " + when(status.routes.loaded_at) +
    ", generation " + status.routes.generation;
  const rl = status.reload;
  $("reload").textContent = rl.last_error
    ? "FAILED " + when(rl.last_error.at) + ": " + rl.last_error.message + " (the last good routes stay)"
    : "ok, last success " + when(rl.last_success) + " (" + rl.successes + " ok, " + rl.failures + " failed)";
  $("reload").className = rl.last_error ? "bad" : "";
  const p = status.rollback;
  $("policy").textContent = p
    ? "to " + p.target + " above " + pct(p.error_rate) + " errors" +
      (p.slower_than_seconds ? ", or " + pct(p.slow_rate) + " slower than " + ms(p.slower_than_seconds).replace("\u2264 ", "") : "") +
      "; odds " + p.trip_odds + ":1"
    : "off (no [rollback] table)";
  const list = $("versions");
  list.replaceChildren(...status.versions.map((v) => drawVersion(v, history.get(v.name))));
}

function linkState(state, text) {
  const link = $("link");
  link.dataset.state = state;
  link.textContent = text;
  document.body.classList.toggle("stale", state === "error");
}

async function poll() {
  try {
    const [s, m] = await Promise.all([
      fetch("status", { cache: "no-store" }),
      fetch("metrics", { cache: "no-store" }),
    ]);
    if (!s.ok) throw new Error("/status answered HTTP " + s.status);
    if (!m.ok) throw new Error("/metrics answered HTTP " + m.status);
    const status = await s.json();
    const counts = countsByVersion(parseMetrics(await m.text()));
    // Rates are per second of the proxy's clock (its uptime), not the
    // browser's: a throttled background tab or a slow fetch then shifts no
    // number.
    draw(status, counts, status.uptime_seconds * 1000);
    lastGood = Date.now();
    linkState("live", "live, updated " + new Date(lastGood).toLocaleTimeString());
  } catch (e) {
    const since = lastGood ? "; last update " + new Date(lastGood).toLocaleTimeString() : "; no data yet";
    linkState("error", "cannot reach the proxy's /status: " + (e && e.message ? e.message : e) + since);
  } finally {
    setTimeout(poll, POLL_MS);
  }
}

poll();
