// The Tandem operator console. Everything on the page is built with DOM
// calls and textContent: events and errors are shown, never interpreted.
"use strict";

const HISTORY_MS = 5 * 60 * 1000;
const POLL_MS = 2000;

const state = {
  snapshot: null,
  history: new Map(), // "service/consumer" -> [{t, seconds, events}]
  backlog: new Map(), // service -> [{t, pending}]
  rebuilds: new Map(), // "service/consumer" -> {started, peak}
  totals: new Map(), // "service/consumer" -> {count, sumSeconds}, the last reading
  session: null, // {who, csrf} while logged in; the token itself stays on the server
};

// ------------------------------------------------------------ helpers

function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attributes)) {
    if (key === "text") node.textContent = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  for (const child of children) {
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function svg(tag, attributes = {}, ...children) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [key, value] of Object.entries(attributes)) {
    if (key === "text") node.textContent = value;
    else node.setAttribute(key, value);
  }
  node.append(...children);
  return node;
}

function healthBadge(health) {
  return el("span", { class: "health", "data-health": health, text: health });
}

function loggedIn() {
  return Boolean(state.session);
}

function say(text, kind = "info") {
  const box = document.getElementById("message");
  box.textContent = text;
  box.dataset.kind = kind;
  box.hidden = false;
  clearTimeout(say.timer);
  say.timer = setTimeout(() => { box.hidden = true; }, 6000);
}

async function call(method, path, body) {
  const headers = {};
  // The session cookie goes by itself; a request that changes state also
  // carries the session's CSRF token.
  if (state.session && method !== "GET") headers["x-csrf-token"] = state.session.csrf;
  if (body !== undefined) headers["content-type"] = "application/json";
  const response = await fetch(path, {
    method,
    headers,
    credentials: "same-origin",
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await response.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch { data = text; }
  if (!response.ok) {
    const detail = data && data.detail ? data.detail : response.statusText;
    const error = new Error(`${response.status}: ${detail}`);
    error.status = response.status;
    if (response.status === 401 && state.session && path.startsWith("/api/") && path !== "/api/session") {
      // The session ended (expired, or the console restarted).
      showSession(null);
    }
    throw error;
  }
  return data;
}

function seconds(value) {
  if (value === undefined || value === null) return "–";
  if (value < 1) return `${Math.round(value * 1000)} ms`;
  if (value < 120) return `${value.toFixed(1)} s`;
  return `${Math.round(value / 60)} min`;
}

function when(text) {
  if (!text) return "–";
  const at = new Date(text);
  return isNaN(at) ? text : at.toLocaleString();
}

// Replaces a table's rows only when what they show changed, so that a
// button is not swapped for a copy of itself under the pointer.
const shown = new Map();
function replaceRows(body, signature, build) {
  if (shown.get(body) === signature) return;
  shown.set(body, signature);
  body.replaceChildren(...build());
}

function upServices() {
  return state.snapshot ? state.snapshot.services.filter((service) => service.up) : [];
}

// ------------------------------------------------------------ tabs

function showTab() {
  const wanted = (location.hash || "#map").slice(1);
  for (const section of document.querySelectorAll("main > section")) {
    section.hidden = section.dataset.section !== wanted;
  }
  for (const link of document.querySelectorAll("nav a")) {
    link.classList.toggle("current", link.dataset.tab === wanted);
  }
  refreshAdmin();
}

// ------------------------------------------------------------ live stream

function connect() {
  const live = document.getElementById("live");
  const source = new EventSource("/api/stream");
  source.addEventListener("open", () => {
    live.dataset.state = "live";
    live.textContent = "live";
  });
  source.addEventListener("error", () => {
    live.dataset.state = "lost";
    live.textContent = "reconnecting";
  });
  source.addEventListener("snapshot", (event) => {
    const snapshot = JSON.parse(event.data);
    if (!snapshot.services) return;
    state.snapshot = snapshot;
    record(snapshot);
    render();
  });
}

function healthOf(service) {
  if (service.held) return "stopped";
  if (!service.up) return "down";
  return service.report.health;
}

function record(snapshot) {
  const now = snapshot.atMillis;
  for (const service of snapshot.services) {
    if (!service.report) continue;
    for (const consumer of service.report.consumers) {
      const key = `${service.name}/${consumer.consumer}`;
      const points = state.history.get(key) || [];
      // Propagation: the mean end-to-end delay of the events applied
      // since the last snapshot (the service's running totals).
      let propagation = null;
      const totals = consumer.endToEnd;
      const before = state.totals.get(key);
      if (totals && before && totals.count > before.count) {
        propagation = (totals.sumSeconds - before.sumSeconds) / (totals.count - before.count);
      }
      if (totals) state.totals.set(key, totals);
      points.push({ t: now, seconds: consumer.lagSeconds, events: consumer.lagEvents, propagation });
      state.history.set(key, points.filter((point) => now - point.t <= HISTORY_MS));
      const rebuild = state.rebuilds.get(key);
      if (rebuild) rebuild.peak = Math.max(rebuild.peak, consumer.lagEvents);
    }
    if (service.report.outbox) {
      const points = state.backlog.get(service.name) || [];
      points.push({ t: now, pending: service.report.outbox.pendingEvents });
      state.backlog.set(service.name, points.filter((point) => now - point.t <= HISTORY_MS));
    }
  }
}

function render() {
  renderMap();
  renderCharts();
  renderRebuilds();
  renderControls();
}

// ------------------------------------------------------------ map

function renderMap() {
  const services = state.snapshot.services;
  const map = document.getElementById("map");
  map.replaceChildren(svg("defs", {}, svg("marker", {
    id: "arrow", viewBox: "0 0 10 10", refX: "10", refY: "5",
    markerWidth: "7", markerHeight: "7", orient: "auto-start-reverse",
  }, svg("path", { d: "M 0 0 L 10 5 L 0 10 z", fill: "#7a90ad" }))));
  const width = 900;
  const column = { service: 20, topic: 330, consumer: 600 };
  const nodeWidth = { service: 220, topic: 160, consumer: 280 };
  const row = 70;
  const topics = [];
  const consumers = [];
  for (const service of services) {
    const report = service.report;
    if (report && report.outbox && !topics.includes(report.outbox.topic)) topics.push(report.outbox.topic);
    for (const consumer of report ? report.consumers : []) {
      consumers.push({ service, consumer });
      for (const topic of consumer.topics) if (!topics.includes(topic)) topics.push(topic);
    }
  }
  const height = Math.max(services.length, topics.length, consumers.length) * row + 30;
  map.setAttribute("viewBox", `0 0 ${width} ${height}`);
  const at = {};
  const place = (key, x, y, w) => { at[key] = { x, y, w }; };
  services.forEach((service, index) => place(`s:${service.name}`, column.service, 20 + index * row, nodeWidth.service));
  topics.forEach((topic, index) => place(`t:${topic}`, column.topic, 20 + index * row, nodeWidth.topic));
  consumers.forEach((item, index) =>
    place(`c:${item.service.name}/${item.consumer.consumer}`, column.consumer, 20 + index * row, nodeWidth.consumer));
  const edge = (from, to) => {
    const a = at[from];
    const b = at[to];
    if (!a || !b) return;
    const x1 = a.x + a.w, y1 = a.y + 22, x2 = b.x - 2, y2 = b.y + 22;
    map.append(svg("path", { class: "edge", d: `M ${x1} ${y1} C ${x1 + 50} ${y1}, ${x2 - 50} ${y2}, ${x2} ${y2}` }));
  };
  for (const service of services) {
    if (service.report && service.report.outbox) edge(`s:${service.name}`, `t:${service.report.outbox.topic}`);
  }
  for (const item of consumers) {
    for (const topic of item.consumer.topics) edge(`t:${topic}`, `c:${item.service.name}/${item.consumer.consumer}`);
  }
  for (const service of services) {
    const spot = at[`s:${service.name}`];
    const health = healthOf(service);
    const outbox = service.report && service.report.outbox;
    const detail = outbox
      ? `outbox ${outbox.pendingEvents} pending, oldest ${seconds(outbox.oldestPendingAgeSeconds)}`
      : (service.up ? "no outbox" : "not answering");
    map.append(svg("g", { class: "node", "data-service": service.name, "data-health": health, "data-up": String(service.up) },
      svg("rect", { x: spot.x, y: spot.y, width: spot.w, height: 46, rx: 6 }),
      svg("text", { x: spot.x + 10, y: spot.y + 18, text: `${service.name} · ${health}` }),
      svg("text", { x: spot.x + 10, y: spot.y + 36, text: detail })));
  }
  for (const topic of topics) {
    const spot = at[`t:${topic}`];
    map.append(svg("g", { class: "topic", "data-topic": topic },
      svg("rect", { x: spot.x, y: spot.y, width: spot.w, height: 46, rx: 23 }),
      svg("text", { x: spot.x + 16, y: spot.y + 28, text: `topic ${topic}` })));
  }
  for (const item of consumers) {
    const spot = at[`c:${item.service.name}/${item.consumer.consumer}`];
    const consumer = item.consumer;
    const health = item.service.held ? "stopped" : consumer.health;
    map.append(svg("g", { class: "node", "data-consumer": consumer.consumer, "data-health": health },
      svg("rect", { x: spot.x, y: spot.y, width: spot.w, height: 46, rx: 6 }),
      svg("text", { x: spot.x + 10, y: spot.y + 18, text: `${consumer.consumer} · ${health}` }),
      svg("text", { x: spot.x + 10, y: spot.y + 36,
        text: `lag ${consumer.lagEvents} events, ${seconds(consumer.lagSeconds)} · ${consumer.deadLetters} parked` })));
  }

  const body = document.querySelector("#map-table tbody");
  body.replaceChildren(...services.map((service) => {
    const outbox = service.report && service.report.outbox;
    return el("tr", { "data-service": service.name },
      el("td", { text: service.name }),
      el("td", {}, healthBadge(healthOf(service))),
      el("td", { class: "number", text: outbox ? outbox.pendingEvents : "–" }),
      el("td", { class: "number", text: outbox ? seconds(outbox.oldestPendingAgeSeconds) : "–" }),
      el("td", { text: service.report ? service.report.consumers.map((c) => c.consumer).join(", ") || "none" : service.error || "down" }));
  }));
}

// ------------------------------------------------------------ charts

function chart(title, series, key) {
  const w = 360, h = 120;
  const all = series.flatMap((one) => one.points);
  const now = state.snapshot.atMillis;
  const box = svg("svg", { viewBox: `0 0 ${w} ${h}` });
  for (const one of series) {
    const top = Math.max(1e-9, ...one.points.map((point) => point.value));
    const points = one.points
      .map((point) => `${(w * (1 - (now - point.t) / HISTORY_MS)).toFixed(1)},${(h - 8 - (h - 16) * point.value / top).toFixed(1)}`)
      .join(" ");
    box.append(svg("polyline", { class: one.class, points }));
    const last = one.points.length ? one.points[one.points.length - 1].value : 0;
    const row = { seconds: 14, events: 28, propagation: 42 }[one.class];
    const colour = { seconds: "#c62828", events: "#1565c0", propagation: "#2e7d32" }[one.class];
    box.append(svg("text", { class: one.class, x: 6, y: row, "font-size": 11, fill: colour,
      text: `${one.label}: ${one.format(last)} (max ${one.format(top === 1e-9 ? 0 : top)})` }));
  }
  return el("div", { class: "chart", "data-chart": key }, el("h3", { text: title }), box, all.length ? "" : el("p", { text: "no data yet" }));
}

function renderCharts() {
  const charts = document.getElementById("charts");
  const parts = [];
  for (const [key, points] of state.history) {
    parts.push(chart(key, [
      { class: "seconds", label: "lag", format: seconds, points: points.map((p) => ({ t: p.t, value: p.seconds })) },
      { class: "events", label: "behind", format: (v) => `${Math.round(v)} events`, points: points.map((p) => ({ t: p.t, value: p.events })) },
      { class: "propagation", label: "propagation (mean)", format: seconds,
        points: points.filter((p) => p.propagation !== null).map((p) => ({ t: p.t, value: p.propagation })) },
    ].filter((one) => one.class !== "propagation" || one.points.length), key));
  }
  for (const [service, points] of state.backlog) {
    parts.push(chart(`${service} outbox`, [
      { class: "events", label: "pending", format: (v) => `${Math.round(v)} events`, points: points.map((p) => ({ t: p.t, value: p.pending })) },
    ], `${service}-outbox`));
  }
  charts.replaceChildren(...parts);
}

// ------------------------------------------------------------ rebuilds

function renderRebuilds() {
  const body = document.querySelector("#rebuilds tbody");
  const signature = JSON.stringify(upServices().map((service) => service.report.consumers.map((consumer) =>
    [service.name, consumer.consumer, consumer.health, consumer.lagEvents, Boolean(state.rebuilds.get(`${service.name}/${consumer.consumer}`))])));
  if (shown.get(body) === signature) return;
  shown.set(body, signature);
  const rows = [];
  for (const service of upServices()) {
    for (const consumer of service.report.consumers) {
      const key = `${service.name}/${consumer.consumer}`;
      const started = state.rebuilds.get(key);
      let progress = "–";
      let eta = "–";
      if (started) {
        const done = started.peak > 0 ? 1 - consumer.lagEvents / started.peak : (Date.now() - started.started > 3000 ? 1 : 0);
        const elapsed = (Date.now() - started.started) / 1000;
        const applied = started.peak - consumer.lagEvents;
        const rate = elapsed > 0 ? applied / elapsed : 0;
        const fill = el("span");
        // CSSOM, not a style attribute: the page's CSP allows no inline style.
        fill.style.width = `${Math.round(done * 100)}%`;
        progress = el("div", { class: "bar", title: `${Math.round(done * 100)} %` }, fill);
        eta = done >= 1 ? "done" : consumer.lagEvents === 0 ? "starting" : rate > 0 ? seconds(consumer.lagEvents / rate) : "…";
      }
      rows.push(el("tr", { "data-consumer": consumer.consumer },
        el("td", { text: service.name }),
        el("td", { text: consumer.consumer }),
        el("td", {}, healthBadge(consumer.health)),
        el("td", { class: "number", text: `${consumer.lagEvents} events` }),
        el("td", {}, progress),
        el("td", { text: eta }),
        el("td", {},
          el("button", {
            id: `rebuild-${consumer.consumer}`,
            text: "Rebuild",
            onclick: () => askRebuild(service.name, consumer.consumer),
          }),
          consumer.health === "paused"
            ? el("button", { id: `resume-${consumer.consumer}`, text: "Resume", onclick: () => pauseOrResume(service.name, consumer.consumer, "resume") })
            : el("button", { id: `pause-${consumer.consumer}`, text: "Pause", onclick: () => pauseOrResume(service.name, consumer.consumer, "pause") }))));
    }
  }
  body.replaceChildren(...rows);
}

async function pauseOrResume(service, consumer, action) {
  if (action === "pause" && !confirm(`Pause ${consumer} of the ${service} service? It applies nothing until resumed; its lag grows.`)) return;
  try {
    await call("POST", `/api/admin/${encodeURIComponent(service)}/consumers/${encodeURIComponent(consumer)}/${action}`);
    say(`${consumer}: ${action}d`);
  } catch (error) {
    say(`${consumer}: ${action} failed: ${error.message}`, "error");
  }
}

async function askRebuild(service, consumer) {
  if (!confirm(`Rebuild ${consumer} of the ${service} service from the start of the log? Its read model is cleared and built again while the service keeps serving.`)) return;
  try {
    await call("POST", `/api/admin/${encodeURIComponent(service)}/consumers/${encodeURIComponent(consumer)}/replay`);
    state.rebuilds.set(`${service}/${consumer}`, { started: Date.now(), peak: 0 });
    say(`rebuild of ${consumer} requested`);
  } catch (error) {
    say(`rebuild of ${consumer}: ${error.message}`, "error");
  }
}

// ------------------------------------------------------------ controls and orders

function renderControls() {
  const controls = state.snapshot.controls;
  document.getElementById("no-controls").hidden = controls;
  const body = document.querySelector("#controls tbody");
  const signature = JSON.stringify([controls, state.snapshot.services.map((service) => [service.name, healthOf(service)])]);
  replaceRows(body, signature, () => state.snapshot.services.map((service) => {
    const buttons = controls ? ["stop", "kill", "start"].map((action) => el("button", {
      id: `control-${service.name}-${action}`,
      text: action === "kill" ? "kill -9" : action,
      onclick: () => control(service.name, action),
    })) : [];
    return el("tr", { "data-service": service.name },
      el("td", { text: service.name }),
      el("td", {}, healthBadge(healthOf(service))),
      el("td", {}, ...buttons));
  }));
}

async function control(service, action) {
  if (action !== "start" && !confirm(`${action === "kill" ? "Kill -9" : "Stop"} the ${service} service? It stays down until you start it.`)) return;
  try {
    await call("POST", `/api/services/${encodeURIComponent(service)}/${action}`);
    say(`${service}: ${action} done`);
  } catch (error) {
    say(`${service}: ${action} failed: ${error.message}`, "error");
  }
}

async function placeOrder(event) {
  event.preventDefault();
  const body = {
    customerId: document.getElementById("order-customer").value,
    lines: [{
      productId: document.getElementById("order-product").value,
      quantity: Number(document.getElementById("order-quantity").value),
    }],
  };
  const status = document.getElementById("order-status");
  const detail = document.getElementById("order-detail");
  detail.textContent = "";
  try {
    const order = await call("POST", "/api/orders", body);
    document.getElementById("order-id").textContent = order.orderId;
    status.textContent = order.status;
    follow(order.orderId);
  } catch (error) {
    status.textContent = "REFUSED";
    detail.textContent = error.message;
  }
}

async function follow(id) {
  const status = document.getElementById("order-status");
  const detail = document.getElementById("order-detail");
  const started = Date.now();
  while (Date.now() - started < 120000) {
    if (document.getElementById("order-id").textContent !== id) return;
    try {
      const order = await call("GET", `/api/orders/${encodeURIComponent(id)}`);
      status.textContent = order.status;
      detail.textContent = order.reason ? `(${order.reason})` : "";
      if (order.status !== "PENDING") return;
    } catch (error) {
      detail.textContent = error.message;
    }
    await new Promise((resolve) => setTimeout(resolve, 300));
  }
}

// ------------------------------------------------------------ dead letters and audit

let adminBusy = false;

async function refreshAdmin() {
  if (adminBusy || !state.snapshot) return;
  const tab = (location.hash || "#map").slice(1);
  const hasToken = loggedIn();
  for (const note of document.querySelectorAll(".needs-token")) note.hidden = hasToken;
  if (!hasToken || (tab !== "dead-letters" && tab !== "audit")) return;
  adminBusy = true;
  try {
    if (tab === "dead-letters") await refreshGroups();
    else await refreshAudit();
  } catch (error) {
    say(error.message, "error");
  } finally {
    adminBusy = false;
  }
}

async function refreshGroups() {
  const rows = [];
  for (const service of upServices()) {
    const groups = await call("GET", `/api/admin/${encodeURIComponent(service.name)}/failure-groups`);
    for (const group of groups) {
      rows.push(el("tr", { "data-group": group.group, "data-count": group.count, "data-error": group.error },
        el("td", { text: service.name }),
        el("td", { text: group.consumer }),
        el("td", { text: group.eventType || "–" }),
        el("td", { text: group.reason }),
        el("td", { text: group.error }),
        el("td", { class: "number", text: group.count }),
        el("td", { text: when(group.firstSeen) }),
        el("td", { text: when(group.lastSeen) }),
        el("td", {},
          el("button", { id: `inspect-${group.group}`, text: "Inspect", onclick: () => inspect(service.name, group) }),
          el("button", { id: `redrive-${group.group}`, text: "Redrive", onclick: () => act(service.name, group, "redrive") }),
          el("button", { id: `discard-${group.group}`, text: "Discard", onclick: () => act(service.name, group, "discard") }))));
    }
  }
  if (!rows.length) rows.push(el("tr", { class: "empty" }, el("td", { colspan: 9, text: "No parked events." })));
  const signature = JSON.stringify(rows.map((row) => row.textContent));
  replaceRows(document.querySelector("#groups tbody"), signature, () => rows);
}

async function inspect(service, group) {
  const base = `/api/admin/${encodeURIComponent(service)}`;
  const page = await call("GET", `${base}/dead-letters?group=${encodeURIComponent(group.group)}&limit=1`);
  if (!page.items.length) return say("that group has no parked event any more");
  const letter = await call("GET", `${base}/dead-letters/${page.items[0].id}`);
  document.getElementById("letter-id").textContent = `${letter.id} (${letter.consumer}, ${letter.topic}/${letter.partition}@${letter.offset})`;
  document.getElementById("letter-body").textContent = JSON.stringify(letter, null, 2);
  document.getElementById("letter").hidden = false;
}

async function act(service, group, action) {
  const verb = action === "redrive" ? "Redrive (handle again)" : "Discard";
  if (!confirm(`${verb} ${group.count} event(s) of this failure group of ${group.consumer}?`)) return;
  try {
    const answer = await call("POST", `/api/admin/${encodeURIComponent(service)}/dead-letters/${action}`,
      { group: group.group, consumer: group.consumer });
    say(`${action} of ${answer.requested.length} event(s) requested`);
    await refreshGroups();
  } catch (error) {
    say(`${action}: ${error.message}`, "error");
  }
}

async function refreshAudit() {
  const entries = [];
  for (const service of upServices()) {
    const page = await call("GET", `/api/admin/${encodeURIComponent(service.name)}/audit?limit=100`);
    for (const item of page.items) entries.push({ service: service.name, ...item });
  }
  entries.sort((a, b) => (a.at < b.at ? 1 : -1));
  const rows = entries.map((entry) => el("tr", { "data-action": entry.action },
    el("td", { text: when(entry.at) }),
    el("td", { text: entry.service }),
    el("td", { text: entry.actor }),
    el("td", { text: entry.action }),
    el("td", { text: entry.target }),
    el("td", { text: entry.result })));
  if (!rows.length) rows.push(el("tr", { class: "empty" }, el("td", { colspan: 6, text: "Nothing done yet." })));
  const signature = JSON.stringify(rows.map((row) => row.textContent));
  replaceRows(document.querySelector("#audit tbody"), signature, () => rows);
}

// ------------------------------------------------------------ start

function showSession(session) {
  state.session = session;
  document.getElementById("login-form").hidden = Boolean(session);
  document.getElementById("signed-in").hidden = !session;
  document.getElementById("who").textContent = session ? `signed in as ${session.who}` : "";
  for (const note of document.querySelectorAll(".needs-token")) note.hidden = Boolean(session);
}

async function logIn(event) {
  event.preventDefault();
  const input = document.getElementById("token");
  const token = input.value.trim();
  // The token leaves the page with this request and is not kept here.
  input.value = "";
  try {
    const session = await call("POST", "/api/session", { token });
    showSession(session);
    say(`signed in as ${session.who}`);
    refreshAdmin();
  } catch (error) {
    say(`login refused: ${error.message}`, "error");
  }
}

async function logOut() {
  try {
    await call("DELETE", "/api/session");
  } catch (error) {
    say(`logout: ${error.message}`, "error");
  }
  showSession(null);
}

// On a narrow screen tables are laid out as cards: each cell carries its
// column's heading, copied here whenever rows change.
function labelCells(table) {
  const headings = [...table.querySelectorAll("thead th")].map((th) => th.textContent);
  for (const row of table.querySelectorAll("tbody tr")) {
    [...row.children].forEach((cell, index) => {
      if (headings[index] && !cell.hasAttribute("colspan")) cell.dataset.label = headings[index];
    });
  }
}

document.addEventListener("DOMContentLoaded", async () => {
  for (const table of document.querySelectorAll("table.cards")) {
    new MutationObserver(() => labelCells(table)).observe(table.querySelector("tbody"), { childList: true });
  }
  document.getElementById("login-form").addEventListener("submit", logIn);
  document.getElementById("logout").addEventListener("click", logOut);
  try {
    const session = await call("GET", "/api/session");
    showSession(session.loggedIn ? session : null);
  } catch {
    showSession(null);
  }
  document.getElementById("order-form").addEventListener("submit", placeOrder);
  window.addEventListener("hashchange", showTab);
  showTab();
  connect();
  setInterval(refreshAdmin, POLL_MS);
});
