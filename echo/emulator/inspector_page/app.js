// The Echo dev inspector: messages hop by hop, clients, reloads. Reads /dev/traces, follows
// /dev/traces/stream (server-sent events), and can publish and replay.

const $ = (selector) => document.querySelector(selector);
const traces = new Map(); // id -> trace, newest last
let selected = null;

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}
const show = (value) => (typeof value === "string" ? JSON.stringify(value) : JSON.stringify(value, null, 2));
const clock = (ts) => new Date(ts).toLocaleTimeString([], { hour12: false });

function badge(trace) {
  const outcome = trace.outcome;
  if (!outcome) return ["pending", "in flight"];
  if (outcome.error) return ["error", `${outcome.error.kind} in ${outcome.error.function}`];
  if (outcome.filteredBy) return ["filtered", `filtered by ${outcome.filteredBy}`];
  if (outcome.droppedBy) return ["filtered", `dropped by ${outcome.droppedBy}`];
  return ["delivered", `→ ${outcome.subscribers} subscriber${outcome.subscribers === 1 ? "" : "s"}`];
}

function matches(trace) {
  const app = $("#filter-app").value;
  const channel = $("#filter-channel").value;
  return (!app || trace.app === app) && (!channel || trace.channel === channel);
}

function addOption(select, value) {
  if (![...select.options].some((option) => option.value === value)) {
    select.append(Object.assign(el("option", "", value), { value }));
  }
}

function renderList() {
  const list = $("#traces");
  list.replaceChildren();
  let shown = 0;
  for (const trace of [...traces.values()].reverse()) {
    addOption($("#filter-app"), trace.app);
    addOption($("#filter-channel"), trace.channel);
    if (!matches(trace)) continue;
    shown += 1;
    const [kind, text] = badge(trace);
    const item = el("li", "trace");
    Object.assign(item.dataset, { id: trace.id, channel: trace.channel, outcome: kind });
    item.setAttribute("aria-selected", String(trace.id === selected));
    item.append(el("time", "", clock(trace.ts)), el("span", "where", `${trace.app} #${trace.channel} · ${trace.uuid ?? ""}`),
      el("span", `badge ${kind}`, text));
    item.addEventListener("click", () => { selected = trace.id; renderList(); renderDetail(); });
    list.append(item);
  }
  $("#count").textContent = `${shown} message${shown === 1 ? "" : "s"}`;
}

function hopView(hop, index) {
  const box = el("div", hop.error ? "hop failed" : "hop");
  box.dataset.function = hop.function;
  const title = el("h3", "", `${index + 1}. ${hop.function} `);
  title.append(el("span", "ms", `${hop.durationMs} ms`));
  box.append(title, el("div", "label", "input"), el("pre", "hop-input", show(hop.input)));
  if (hop.error) {
    box.append(el("div", "label", "error"), el("pre", "hop-error", `${hop.error.kind}: ${hop.error.message}`));
    if (hop.error.at) box.append(el("div", "at hop-at", `at ${hop.error.at.file}, line ${hop.error.at.line}`));
    if (hop.error.traceback) box.append(el("pre", "hop-traceback", hop.error.traceback));
  } else {
    box.append(el("div", "label", hop.filtered ? "output (filtered: not delivered)" : "output"),
      el("pre", "hop-output", show(hop.output)));
  }
  if (hop.logs && hop.logs.length) {
    box.append(el("div", "label", "printed / logged"), el("pre", "hop-logs", hop.logs.join("\n")));
  }
  return box;
}

function renderDetail() {
  const trace = traces.get(selected);
  const detail = $("#detail");
  detail.className = "";
  if (!trace) return;
  detail.replaceChildren();
  const head = el("h2", "", `${trace.app} #${trace.channel}`);
  detail.append(head, el("div", "muted", `${trace.id} · from ${trace.uuid ?? "?"} · ${clock(trace.ts)}`),
    el("div", "label", "published"), el("pre", "trace-input", show(trace.input)));
  trace.hops.forEach((hop, index) => detail.append(hopView(hop, index)));
  const outcome = el("div", "outcome");
  outcome.dataset.outcome = badge(trace)[0];
  outcome.textContent = trace.outcome
    ? (trace.outcome.error ? `not delivered: ${trace.outcome.error.kind} in ${trace.outcome.error.function}`
      : trace.outcome.delivered ? `delivered to ${trace.outcome.subscribers} subscriber(s)` : badge(trace)[1])
    : "in flight…";
  detail.append(outcome);
  if (trace.outcome?.delivered) detail.append(el("div", "label", "delivered"), el("pre", "trace-output", show(trace.outcome.output)));
  if (trace.hops.length || trace.outcome?.error) {
    const button = el("button", "secondary", "Replay with the current code");
    button.id = "replay";
    button.addEventListener("click", () => replay(trace.id));
    detail.append(button);
  }
}

async function replay(id) {
  const response = await fetch(`/dev/traces/${encodeURIComponent(id)}/replay`, { method: "POST" });
  const result = await response.json();
  const box = el("div", "replay");
  box.id = "replay-result";
  if (!result.ok) {
    box.append(el("p", "at", result.error?.message ?? "replay failed"));
  } else {
    box.append(el("h3", result.changed ? "changed" : "same",
      result.changed ? "Replayed: the output changed" : "Replayed: the same output"));
    result.hops.forEach((hop, index) => box.append(hopView(hop, index)));
    const compare = el("div", "compare");
    const before = el("div"); before.append(el("div", "label", "before"), el("pre", "replay-before", show(result.before)));
    const after = el("div"); after.append(el("div", "label", "now"), el("pre", "replay-after", show(result.output)));
    compare.append(before, after);
    box.append(compare, el("p", "muted", "A replay runs the functions only: it is delivered to no one."));
  }
  $("#replay-result")?.remove();
  $("#detail").append(box);
}

async function refreshClients() {
  try {
    const { clients } = await (await fetch("/dev/clients")).json();
    const list = $("#clients");
    list.replaceChildren(...clients.map((c) => {
      const item = el("li", "", `${c.app} · ${c.uuid}${c.admin ? " (admin)" : ""}: ${c.channels.map((ch) => "#" + ch).join(" ") || "no channels"}`);
      item.dataset.uuid = c.uuid;
      return item;
    }));
    if (!clients.length) list.append(el("li", "muted", "nobody is connected"));
  } catch { /* the server restarts: next round */ }
}

function addReload(entry) {
  const item = el("li", "reload");
  const fine = entry.functions.length ? `reloaded ${entry.functions.join(", ")}` : "";
  item.append(el("time", "muted", clock(entry.ts) + " "), el("span", "", fine));
  for (const [name, mistake] of Object.entries(entry.mistakes || {})) {
    item.append(el("div", "mistake", `${name}: ${mistake}`));
  }
  $("#reloads").prepend(item);
}

function take(trace) {
  traces.delete(trace.id);
  traces.set(trace.id, trace);
  while (traces.size > 300) traces.delete(traces.keys().next().value);
  renderList();
  if (trace.id === selected) renderDetail();
}

async function start() {
  const { traces: recent } = await (await fetch("/dev/traces")).json();
  for (const trace of recent.reverse()) traces.set(trace.id, trace);
  renderList();
  const { reloads } = await (await fetch("/dev/reloads")).json();
  for (const entry of reloads.reverse()) addReload(entry);
  const stream = new EventSource("/dev/traces/stream");
  stream.onopen = () => { $("#live").dataset.state = "live"; $("#live").textContent = "live"; };
  stream.onerror = () => { $("#live").dataset.state = "connecting"; $("#live").textContent = "reconnecting…"; };
  stream.onmessage = (event) => {
    const update = JSON.parse(event.data);
    if (update.type === "trace") take(update.trace);
    else if (update.type === "reload") addReload(update.reload);
  };
  refreshClients();
  setInterval(refreshClients, 2000);
}

$("#filter-app").addEventListener("change", renderList);
$("#filter-channel").addEventListener("change", renderList);
$("#publish").addEventListener("submit", async (event) => {
  event.preventDefault();
  let message;
  try {
    message = JSON.parse($("#pub-message").value);
  } catch {
    message = $("#pub-message").value; // not JSON: sent as a string
  }
  const response = await fetch("/dev/inspector/publish", {
    method: "POST", headers: { "content-type": "application/json" },
    body: JSON.stringify({ app: $("#pub-app").value, channel: $("#pub-channel").value, message }),
  });
  const ack = await response.json();
  $("#pub-result").textContent = ack.ok
    ? `published ${ack.id}: ${ack.delivered ? "delivered" : `not delivered (${ack.filteredBy || ack.droppedBy})`}`
    : `refused: ${ack.error.code}: ${ack.error.message}`;
  if (ack.ok) { selected = ack.id; renderList(); renderDetail(); }
});
start();
