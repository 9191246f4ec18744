// Echo admin page: watch one app's `status` events live (?app=NAME). An admin token puts the
// socket in the app's status feed: connections, subscriptions, function errors, reloads.

const app = new URLSearchParams(location.search).get("app")?.trim() || "";
const MAX_FEED = 100;

const $ = (selector) => document.querySelector(selector);

/** uuid -> {uuid, admin, connections, channels: Set, since, left} */
const clients = new Map();
/** function name -> {count, kind, error, durationMs, channel} */
const failures = new Map();
let echo = null;

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

const clock = (ts) => new Date(ts || Date.now()).toLocaleTimeString([], { hour12: false });
const short = (uuid) => (uuid && uuid.length > 12 ? uuid.slice(0, 8) + "…" : uuid || "?");

function setStatus(state, text) {
  $("#status").dataset.state = state;
  $("#status").textContent = text;
}

function showFatal(text) {
  $("#fatal").textContent = text;
  $("#fatal").hidden = false;
}

// -- clients ------------------------------------------------------------------------------

function client(uuid, admin = false) {
  let entry = clients.get(uuid);
  if (!entry) {
    entry = { uuid, admin, connections: 0, channels: new Set(), since: Date.now(), left: null };
    clients.set(uuid, entry);
  }
  return entry;
}

function track(status) {
  const { event, uuid, admin, ts } = status;
  if (!uuid) return;
  if (event === "connection") {
    const entry = client(uuid, admin);
    if (entry.connections === 0) entry.since = ts;
    entry.connections += 1;
    entry.admin = admin;
    entry.left = null;
  } else if (event === "disconnection") {
    const entry = client(uuid, admin);
    entry.connections = Math.max(0, entry.connections - 1);
    if (entry.connections === 0) {
      entry.left = ts;
      entry.channels.clear();
    }
  } else if (event === "subscribe" || event === "unsubscribe") {
    const entry = client(uuid, admin);
    if (entry.connections === 0 && entry.left === null) entry.connections = 1; // connected before we looked
    for (const channel of status.channels || []) {
      if (event === "subscribe") entry.channels.add(channel);
      else entry.channels.delete(channel);
    }
  } else {
    return;
  }
  renderClients();
}

function renderClients() {
  const rows = [...clients.values()].sort((a, b) =>
    (b.connections > 0) - (a.connections > 0) || a.since - b.since);
  const body = $("#clients tbody");
  body.replaceChildren();
  for (const entry of rows) {
    const online = entry.connections > 0;
    const row = el("tr");
    Object.assign(row.dataset, { uuid: entry.uuid, state: online ? "online" : "offline" });
    const dot = el("td", "dot");
    dot.title = online ? "connected" : "gone";
    const id = el("td", "uuid", short(entry.uuid));
    id.title = entry.uuid;
    let role = entry.admin ? "admin" : "user";
    if (echo && entry.uuid === echo.uuid) role += " (this page)";
    if (entry.connections > 1) role += ` ×${entry.connections}`;
    const channels = el("td", "channels-cell", [...entry.channels].join(", ") || "—");
    const since = el("td", "time", online ? clock(entry.since) : `left ${clock(entry.left)}`);
    row.append(dot, id, el("td", "role", role), channels, since);
    body.append(row);
  }
  const online = rows.filter((entry) => entry.connections > 0).length;
  $("#client-count").textContent = `${online} connected`;
}

/** The server went away: whoever we knew of may or may not come back. */
function forgetConnections() {
  for (const entry of clients.values()) {
    if (entry.connections > 0) {
      entry.connections = 0;
      entry.left = Date.now();
      entry.channels.clear();
    }
  }
  renderClients();
}

// -- function errors ----------------------------------------------------------------------

function recordFailure({ function: name, kind, error, durationMs, channel }) {
  const entry = failures.get(name) || { count: 0 };
  Object.assign(entry, { count: entry.count + 1, kind, error, durationMs, channel });
  failures.set(name, entry);
  const body = $("#errors tbody");
  body.replaceChildren();
  let total = 0;
  for (const [fn, failure] of [...failures].sort((a, b) => b[1].count - a[1].count)) {
    total += failure.count;
    const row = el("tr");
    Object.assign(row.dataset, { function: fn, kind: failure.kind });
    const error = el("td", "error", failure.error || "");
    error.title = `on #${failure.channel}: ${failure.error}`;
    row.append(el("td", "fn-name", fn), el("td", "num", String(failure.count)), el("td", "kind", failure.kind),
      error, el("td", "num", typeof failure.durationMs === "number" ? `${failure.durationMs} ms` : ""));
    body.append(row);
  }
  $("#error-count").textContent = `${total}`;
}

// -- the feed -----------------------------------------------------------------------------

function details(status) {
  switch (status.event) {
    case "subscribe":
    case "unsubscribe":
      return (status.channels || []).map((c) => `#${c}`).join(" ");
    case "function_error":
      return `${status.function} ${status.kind} on #${status.channel} after ${status.durationMs} ms: ${status.error}`;
    case "functions_reloaded":
      return (status.functions || []).join(", ");
    case "function_problem":
      return `${status.function}: ${status.error}`;
    case "associations_updated":
      return `from ${status.source}`;
    case "associations_error":
      return status.error || "";
    default:
      return status.admin ? "admin" : "";
  }
}

function addToFeed(status) {
  const item = el("li", "event");
  item.dataset.event = status.event;
  item.append(el("time", "time", clock(status.ts)), el("span", "name", status.event));
  if (status.uuid) {
    const who = el("span", "uuid", short(status.uuid));
    who.title = status.uuid;
    item.append(who);
  }
  item.append(el("span", "details", details(status)));
  $("#feed").prepend(item);
  while ($("#feed").children.length > MAX_FEED) $("#feed").lastElementChild.remove();
}

function onStatus(status) {
  addToFeed(status);
  track(status);
  if (status.event === "function_error") recordFailure(status);
}

// -- start --------------------------------------------------------------------------------

async function start() {
  $("#app").value = app;
  if (!app) {
    setStatus("idle", "pick an app");
    document.querySelector(".grid").hidden = true;
    $("#app").focus();
    return;
  }
  document.title = `Echo admin · ${app}`;
  $("#app-name").textContent = app;
  const link = el("a", "", `/apps/${app}/`);
  link.href = `../${encodeURIComponent(app)}/`;
  $("#app-hint").replaceChildren("Open the app itself: ", link);
  let Echo;
  let token;
  try {
    ({ Echo } = await import("/client/echo.js"));
    const response = await fetch(`/dev/token?app=${encodeURIComponent(app)}&admin=1`);
    if (!response.ok) throw new Error(`/dev/token answered ${response.status}`);
    token = await response.json();
  } catch (err) {
    setStatus("error", "offline");
    showFatal(`Could not load the Echo client or a dev admin token (${err.message}). ` +
      "Start the server with ./scripts/dev and open this page from it.");
    return;
  }
  let wasConnected = false;
  echo = new Echo({ host: location.origin, appName: token.appName, jwt: token.jwt });
  echo.addListener({
    status: onStatus,
    state: ({ state, message, retrying }) => {
      if (state === "connected") {
        wasConnected = true;
        setStatus("live", "live");
        // an admin is not sent its own connection status (as in Ekko): count this page here
        track({ event: "connection", uuid: echo.uuid, admin: true, ts: Date.now() });
      } else if (state === "connecting") {
        setStatus("connecting", "connecting…");
      } else if (state === "disconnected" || retrying) {
        setStatus("disconnected", "offline, reconnecting…");
        if (wasConnected) forgetConnections();
        wasConnected = false;
      } else {
        setStatus("error", message || "error");
        showFatal(`Echo refused the admin connection: ${message}`);
      }
    },
  });
}

start();
