// The recovery bench's clients: many real socket.io-client connections that subscribe to one
// history channel on node A, lose their node, and come back asking for what they missed.
//
//   node recovery.mjs '<config json>'      (driven by bench/recovery.py over stdin/stdout)
//
// Steps (each reported as a JSON line {"type":"phase","phase":...}):
//   subscribed   every client is subscribed on urls[0] and knows its position
//   lost         every client saw its connection drop (the orchestrator killed node A)
//   published    `messages` messages were published through urls[1], acknowledged
//   (waits for a "go" line on stdin: node A is back)
//   recovered    every client reconnected to urls[0], subscribed with `since`, and holds all
//                the missed messages; then one {"type":"result", ...}
// While the clients recover, a probe client on node A publishes to a channel of its own every
// 20 ms and times each round trip: how long the node stalls under the recovery.
import { createInterface } from "node:readline";
import { performance } from "node:perf_hooks";
import { io } from "socket.io-client";

const cfg = {
  urls: [],
  namespace: "/bench",
  token: "",
  channel: "h:recovery",
  clients: 1000,
  messages: 100,
  connectConcurrency: 100,
  deadline: 300,
  ...JSON.parse(process.argv[2] ?? "{}"),
};
const out = (obj) => process.stdout.write(JSON.stringify(obj) + "\n");
const now = () => performance.now();
setTimeout(() => {
  out({ type: "result", ok: false, error: `deadline of ${cfg.deadline}s reached` });
  process.exit(3);
}, cfg.deadline * 1000).unref();

function open(url) {
  return io(url + cfg.namespace, {
    transports: ["websocket"], reconnection: false, forceNew: true, auth: { jwt: cfg.token },
    timeout: 30000,
  });
}
const connected = (socket) => new Promise((resolve, reject) => {
  socket.once("connect", resolve);
  socket.once("connect_error", reject);
});
const call = (socket, event, data) => socket.timeout(30000).emitWithAck(event, data);

async function inBatches(items, size, each) {
  for (let i = 0; i < items.length; i += size) await Promise.all(items.slice(i, i + size).map(each));
}

const stdin = createInterface({ input: process.stdin });
const go = new Promise((resolve) => stdin.on("line", (line) => line.trim() === "go" && resolve()));

const clients = Array.from({ length: cfg.clients }, () => ({ position: null, got: [], done: null }));

// 1. subscribe on node A
await inBatches(clients, cfg.connectConcurrency, async (client) => {
  client.socket = open(cfg.urls[0]);
  await connected(client.socket);
  const ack = await call(client.socket, "subscribe", { channels: [cfg.channel] });
  if (!ack.ok) throw new Error(`subscribe refused: ${JSON.stringify(ack)}`);
  client.position = ack.positions[cfg.channel];
});
const lost = Promise.all(clients.map((c) => new Promise((resolve) => c.socket.once("disconnect", resolve))));
out({ type: "phase", phase: "subscribed" });

// 2. node A is killed; 3. publish what they will miss, through node B
await lost;
out({ type: "phase", phase: "lost" });
const publisher = open(cfg.urls[1]);
await connected(publisher);
let top = null;
for (let n = 0; n < cfg.messages; n++) {
  const ack = await call(publisher, "publish", { channel: cfg.channel, message: { n } });
  if (!ack.ok) throw new Error(`publish refused: ${JSON.stringify(ack)}`);
  top = ack.offset;
}
out({ type: "phase", phase: "published", top });
await go;

// 4. the probe, then every client back on node A at once (batched connects), from its position
const probe = open(cfg.urls[0]);
await connected(probe);
await call(probe, "subscribe", { channels: ["probe"] });
const rtts = [];
let probing = true;
const probeLoop = (async () => {
  while (probing) {
    const t = now();
    await call(probe, "publish", { channel: "probe", message: {} });
    rtts.push(now() - t);
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
})();

const t0 = now();
let allDone;
const finished = new Promise((resolve) => { allDone = resolve; });
let remaining = clients.length;
let recovered = 0, notRecovered = 0, wrong = 0;
const connectTimes = [];
await inBatches(clients, cfg.connectConcurrency, async (client) => {
  const started = now();
  client.socket = open(cfg.urls[0]);
  client.socket.on("message", (m) => {
    if (m.channel !== cfg.channel) return;
    client.got.push(m.offset);
    if (client.got.length === top - client.position.offset && client.done === null) {
      client.done = now() - started;
      if (--remaining === 0) allDone();
    }
  });
  await connected(client.socket);
  connectTimes.push(now() - started);
  const ack = await call(client.socket, "subscribe", {
    channels: [cfg.channel], since: { [cfg.channel]: client.position } });
  if (ack.recovered?.[cfg.channel]) recovered++;
  else notRecovered++;
});
await Promise.race([finished, new Promise((resolve) => setTimeout(resolve, 60000))]);
const seconds = (now() - t0) / 1000;
probing = false;
await probeLoop;
for (const client of clients) {
  const expected = Array.from({ length: top - client.position.offset }, (_, i) => client.position.offset + 1 + i);
  if (client.got.length !== expected.length || client.got.some((o, i) => o !== expected[i])) wrong++;
}
out({ type: "phase", phase: "recovered" });
const pct = (values, p) => {
  const sorted = [...values].sort((a, b) => a - b);
  return sorted.length ? sorted[Math.min(sorted.length - 1, Math.floor(p * sorted.length))] : null;
};
const times = clients.map((c) => c.done).filter((d) => d !== null);
out({
  type: "result",
  ok: remaining === 0 && wrong === 0 && notRecovered === 0,
  clients: clients.length,
  messages: cfg.messages,
  seconds,
  complete: clients.length - remaining,
  recovered,
  not_recovered: notRecovered,
  wrong_order_or_count: wrong,
  delivered: clients.reduce((sum, c) => sum + c.got.length, 0),
  client_ms: { p50: pct(times, 0.5), p99: pct(times, 0.99), max: pct(times, 1) },
  connect_ms: { p50: pct(connectTimes, 0.5), p99: pct(connectTimes, 0.99) },
  probe_ms: { count: rtts.length, p50: pct(rtts, 0.5), p99: pct(rtts, 0.99), max: pct(rtts, 1) },
});
process.exit(0);
