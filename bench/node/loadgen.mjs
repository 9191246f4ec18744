// Echo's load generator: real socket.io-client connections (websocket transport) over
// loopback, driven by one JSON config, reporting on stdout as JSON lines.
//
//   node loadgen.mjs '<config json>'
//
// Lines: {"type":"phase","phase":"connected"|"idle_start"|"idle_end"|"measure_start"|
// "measure_end"|"drained", ...} as the run goes (the orchestrator samples server CPU and
// RSS at those instants), then one {"type":"result", ...}.
//
// Everything is bounded: the number of messages (maxMessages), every wait (connect, idle,
// warm-up, measure, drain) and the whole run (deadline: the process exits by itself).
//
// Model: channels [{name, subs, pubs, pubsAreSubs, subsOn?, pubsOn?}]. Subscribers join their
// channel; subsOn / pubsOn (indices into urls) place a channel's subscribers / publishers on
// those nodes, round robin; without them every connection goes round robin over all urls.
// Publishers publish {k, p, t, pad} on their channel, where k indexes this run's message
// tables, p the publisher and t the send time (performance.now() in microseconds: the same
// monotonic clock the subscribers read, in this one process). A message is complete once
// every subscriber of its channel has it. Modes:
//   window: each publisher keeps at most `window` incomplete messages in flight, so the
//           publisher goes as fast as the server delivers (end-to-end back-pressure);
//   rate:   `rate` messages/s in total, spread evenly over the publishers (open loop;
//           a publisher with `window` incomplete messages skips its turn and counts it);
//   idle:   connect, subscribe and hold; no messages.
import { performance, monitorEventLoopDelay } from "node:perf_hooks";
import { io } from "socket.io-client";

const cfg = {
  urls: [],
  namespace: "/bench",
  token: "",
  channels: [],
  mode: "window",
  window: 8,
  rate: 200,
  warmup: 1,
  measure: 5,
  drain: 30,
  drainIdle: 3,
  idle: 0,
  payloadBytes: 100,
  connectConcurrency: 200,
  connectTimeout: 30,
  msgTimeout: 10,
  maxMessages: 2_000_000,
  deadline: 300,
  ...JSON.parse(process.argv[2] ?? "{}"),
};

const out = (obj) => process.stdout.write(JSON.stringify(obj) + "\n");
const now = () => performance.now();
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

const hardStop = setTimeout(() => {
  out({ type: "result", ok: false, error: `deadline of ${cfg.deadline}s reached` });
  process.exit(3);
}, cfg.deadline * 1000);

// ---- latency histogram (microseconds): 1 us up to 1 ms, 10 us up to 100 ms, 1 ms beyond
const HIST = new Uint32Array(1000 + 9900 + 60000 + 1);
function bucket(us) {
  if (us < 1000) return us < 0 ? 0 : Math.floor(us);
  if (us < 100_000) return 1000 + Math.floor((us - 1000) / 10);
  const i = 10900 + Math.floor((us - 100_000) / 1000);
  return i < HIST.length ? i : HIST.length - 1;
}
function bucketValueMs(i) {
  if (i < 1000) return i / 1000;
  if (i < 10900) return (1000 + (i - 1000) * 10) / 1000;
  return (100_000 + (i - 10900) * 1000) / 1000;
}
function percentiles() {
  let total = 0;
  for (const v of HIST) total += v;
  const want = [0.5, 0.9, 0.99, 0.999];
  const res = { count: total };
  if (!total) return res;
  let seen = 0, j = 0, max = 0;
  for (let i = 0; i < HIST.length; i++) {
    if (!HIST[i]) continue;
    seen += HIST[i];
    max = i;
    while (j < want.length && seen >= Math.ceil(want[j] * total)) {
      res[["p50", "p90", "p99", "p999"][j]] = bucketValueMs(i);
      j++;
    }
  }
  res.max = bucketValueMs(max);
  return res;
}

// ---- message tables
const N = cfg.maxMessages;
const state = new Uint8Array(N); // 0 unused, 1 in flight, 2 complete, 3 timed out, 4 refused
const remaining = new Int32Array(N);
const pubOf = new Int32Array(N);
const sentAt = new Float64Array(N);
let nextK = 0;

const stats = {
  sent: 0, sentInWindow: 0, acked: 0, refused: 0, refusedCodes: {}, timedOut: 0, skipped: 0,
  received: 0, receivedInWindow: 0, duplicates: 0, outOfOrder: 0, foreign: 0,
  connectFailures: 0, subscribeFailures: 0, unexpectedDisconnects: 0, errors: [],
};
let expected = 0;
let publishing = false;
let windowStart = Infinity, windowEnd = Infinity;

// ---- connections
const publishers = [];
const subscribers = [];
const sockets = [];
const pad = (n) => "x".repeat(Math.max(0, n));
const padding = pad(cfg.payloadBytes - JSON.stringify({ k: 1000000, p: 100, t: 1234567890, pad: "" }).length);
let running = true;

let lastReceipt = 0;
function onMessage(sub, env) {
  const t = now();
  lastReceipt = t;
  const m = env?.message;
  const k = m?.k;
  if (typeof k !== "number" || k < 0 || k >= nextK) { stats.foreign++; return; }
  if (--remaining[k] < 0) { stats.duplicates++; return; }
  stats.received++;
  const last = sub.last.get(m.p);
  if (last !== undefined && k < last) stats.outOfOrder++;
  sub.last.set(m.p, k);
  if (t >= windowStart && t < windowEnd) {
    stats.receivedInWindow++;
    HIST[bucket(t * 1000 - m.t)]++;
  }
  if (remaining[k] === 0) complete(k, 2);
}

function complete(k, how) {
  if (state[k] !== 1) return;
  state[k] = how;
  const pub = publishers[pubOf[k]];
  pub.inflight--;
  if (cfg.mode === "window" && publishing) pump(pub);
}

function send(pub) {
  if (nextK >= N) return false;
  const k = nextK++;
  state[k] = 1;
  remaining[k] = pub.channel.subs;
  pubOf[k] = pub.index;
  expected += pub.channel.subs;
  pub.inflight++;
  pub.queue.push(k);
  stats.sent++;
  const t = now();
  sentAt[k] = t;
  if (t >= windowStart && t < windowEnd) stats.sentInWindow++;
  const message = { k, p: pub.index, t: Math.round(t * 1000), pad: padding };
  pub.socket.emit("publish", { channel: pub.channel.name, message }, (reply) => {
    stats.acked++;
    if (reply && reply.ok === false) {
      stats.refused++;
      const code = reply.error?.code ?? "unknown";
      stats.refusedCodes[code] = (stats.refusedCodes[code] ?? 0) + 1;
      if (state[k] === 1 || state[k] === 3) {
        // not delivered: nobody is owed what has not arrived of it
        expected -= Math.max(remaining[k], 0);
        remaining[k] = 0;
        if (state[k] === 1) complete(k, 4); else state[k] = 4;
      }
    }
  });
  return true;
}

function pump(pub) {
  while (publishing && pub.inflight < cfg.window) {
    if (!send(pub)) break;
  }
}

function sweep() {
  const limit = now() - cfg.msgTimeout * 1000;
  for (const pub of publishers) {
    while (pub.head < pub.queue.length) {
      const k = pub.queue[pub.head];
      if (state[k] !== 1) { pub.head++; continue; }
      if (sentAt[k] > limit) break;
      stats.timedOut++;
      complete(k, 3);
      pub.head++;
    }
    if (pub.head > 4096) { pub.queue = pub.queue.slice(pub.head); pub.head = 0; }
  }
}
function connectOne(url, role, channel, index) {
  return new Promise((resolve) => {
    const socket = io(url + cfg.namespace, {
      transports: ["websocket"],
      forceNew: true,
      reconnection: false,
      timeout: cfg.connectTimeout * 1000,
      auth: { jwt: cfg.token, uuid: `${role}-${channel.name}-${index}` },
    });
    let settled = false;
    const done = (ok, why) => {
      if (settled) return;
      settled = true;
      if (!ok) {
        if (stats.errors.length < 5) stats.errors.push(`${role} connect: ${why}`);
        socket.close();
      }
      resolve(ok ? socket : null);
    };
    socket.once("connect", () => done(true));
    socket.once("connect_error", (err) => done(false, err?.message ?? String(err)));
    setTimeout(() => done(false, "timeout"), cfg.connectTimeout * 1000);
  });
}

async function subscribe(socket, channel) {
  return new Promise((resolve) => {
    socket.timeout(cfg.connectTimeout * 1000).emit("subscribe", { channels: [channel] }, (err, reply) => {
      if (err || !reply || reply.ok === false) {
        if (stats.errors.length < 5) stats.errors.push(`subscribe: ${err?.message ?? JSON.stringify(reply)}`);
        resolve(false);
      } else resolve(true);
    });
  });
}

async function connectAll() {
  // one spec per connection: subscribers first, so every publisher finds its room full
  const specs = [];
  let s = 0, p = 0;
  const placed = (nodes, i) => {
    const url = cfg.urls[nodes[i % nodes.length]];
    if (url === undefined) throw new Error(`no url for node ${nodes[i % nodes.length]}`);
    return url;
  };
  for (const channel of cfg.channels) {
    const subsOn = channel.subsOn?.length ? channel.subsOn : null;
    const pubsOn = channel.pubsOn?.length ? channel.pubsOn : null;
    for (let i = 0; i < channel.subs; i++) {
      const publishes = channel.pubsAreSubs && i < channel.pubs;
      const url = subsOn ? placed(subsOn, i) : cfg.urls[s++ % cfg.urls.length];
      specs.push({ url, role: publishes ? "both" : "sub", channel, i });
    }
    if (!channel.pubsAreSubs) {
      for (let i = 0; i < channel.pubs; i++) {
        const url = pubsOn ? placed(pubsOn, i) : cfg.urls[p++ % cfg.urls.length];
        specs.push({ url, role: "pub", channel, i });
      }
    }
  }
  let next = 0;
  const worker = async () => {
    while (next < specs.length && running) {
      const spec = specs[next++];
      const socket = await connectOne(spec.url, spec.role, spec.channel, spec.i);
      if (!socket) { stats.connectFailures++; continue; }
      sockets.push(socket);
      socket.on("disconnect", (reason) => {
        if (running) {
          stats.unexpectedDisconnects++;
          if (stats.errors.length < 5) stats.errors.push(`disconnect: ${reason}`);
        }
      });
      if (spec.role !== "pub") {
        const sub = { last: new Map() };
        socket.on("message", (env) => onMessage(sub, env));
        if (!(await subscribe(socket, spec.channel.name))) { stats.subscribeFailures++; continue; }
        subscribers.push(sub);
      }
      if (spec.role !== "sub") {
        publishers.push({
          index: publishers.length, socket, channel: spec.channel, inflight: 0, queue: [], head: 0,
        });
      }
    }
  };
  await Promise.all(Array.from({ length: Math.min(cfg.connectConcurrency, specs.length) }, worker));
  return specs.length;
}

async function publishPhase() {
  const loop = monitorEventLoopDelay({ resolution: 5 });
  publishing = true;
  const started = now();
  windowStart = started + cfg.warmup * 1000;
  windowEnd = windowStart + cfg.measure * 1000;
  const sweeper = setInterval(sweep, 250);
  let cpuAtStart = null;
  let cpuAtEnd = null;
  let measureStarted = false;

  const onMeasureStart = () => {
    if (measureStarted) return;
    measureStarted = true;
    cpuAtStart = { cpu: process.cpuUsage(), t: now() };
    loop.enable();
    out({ type: "phase", phase: "measure_start" });
  };
  if (cfg.mode === "window") {
    for (const pub of publishers) pump(pub);
    await sleep(Math.max(0, windowStart - now()));
    onMeasureStart();
    await sleep(Math.max(0, windowEnd - now()));
  } else {
    // rate: global send g goes to publisher order[g % P] at started + g / rate
    const order = publishers.slice().sort(() => Math.random() - 0.5);
    const interval = 1000 / cfg.rate;
    let g = 0;
    await new Promise((resolve) => {
      const tick = () => {
        const t = now();
        if (t >= windowStart) onMeasureStart();
        if (t >= windowEnd) return resolve();
        while (started + g * interval <= t && order.length) {
          const pub = order[g % order.length];
          g++;
          if (pub.inflight >= cfg.window) { stats.skipped++; continue; }
          if (!send(pub)) break;
        }
        setTimeout(tick, 1);
      };
      tick();
    });
  }
  cpuAtEnd = { cpu: process.cpuUsage(cpuAtStart.cpu), t: now() };
  loop.disable();
  publishing = false;
  out({ type: "phase", phase: "measure_end" });
  lastReceipt = Math.max(lastReceipt, now());
  // drain: wait for every delivery owed, as long as deliveries still arrive (an overloaded
  // server is late, not lossy) and at most `drain` seconds; what is missing then is lost
  const drainUntil = now() + cfg.drain * 1000;
  while (now() < drainUntil && stats.received < expected && now() - lastReceipt < cfg.drainIdle * 1000) {
    await sleep(20);
  }
  clearInterval(sweeper);
  out({ type: "phase", phase: "drained" });
  const seconds = (windowEnd - windowStart) / 1000;
  return {
    measureSeconds: seconds,
    genCpuPct: (100 * (cpuAtEnd.cpu.user + cpuAtEnd.cpu.system)) / ((cpuAtEnd.t - cpuAtStart.t) * 1000),
    loopDelayP99Ms: loop.percentile(99) / 1e6,
    loopDelayMaxMs: loop.max / 1e6,
  };
}

async function main() {
  const t0 = now();
  const total = await connectAll();
  const connectSeconds = (now() - t0) / 1000;
  const connected = sockets.length;
  out({ type: "phase", phase: "connected", connections: connected, of: total, connectSeconds });
  const result = {
    type: "result", ok: true, error: null, connections: connected, wanted: total, connectSeconds,
    subscribers: subscribers.length, publishers: publishers.length,
  };
  if (cfg.idle > 0) {
    const cpu0 = process.cpuUsage();
    out({ type: "phase", phase: "idle_start" });
    await sleep(cfg.idle * 1000);
    out({ type: "phase", phase: "idle_end" });
    const cpu = process.cpuUsage(cpu0);
    result.genIdleCpuPct = (100 * (cpu.user + cpu.system)) / (cfg.idle * 1e6);
  }
  if (cfg.mode !== "idle" && publishers.length) Object.assign(result, await publishPhase());
  running = false;
  const lost = Math.max(0, expected - stats.received);
  Object.assign(result, {
    ...stats,
    expected,
    lost,
    deliveriesPerSec: result.measureSeconds ? stats.receivedInWindow / result.measureSeconds : 0,
    publishesPerSec: result.measureSeconds ? stats.sentInWindow / result.measureSeconds : 0,
    latencyMs: percentiles(),
    genRssMb: process.memoryUsage().rss / 2 ** 20,
  });
  if (stats.connectFailures || stats.subscribeFailures) {
    result.ok = false;
    result.error = `${stats.connectFailures} connect and ${stats.subscribeFailures} subscribe failures: ${stats.errors.join("; ")}`;
  } else if (stats.unexpectedDisconnects) {
    result.ok = false;
    result.error = `${stats.unexpectedDisconnects} connections dropped: ${stats.errors.join("; ")}`;
  } else if (nextK >= N) {
    result.ok = false;
    result.error = `message budget (${N}) exhausted before the measured window ended`;
  }
  out(result);
  for (const socket of sockets) socket.disconnect();
  await sleep(200);
  clearTimeout(hardStop);
  process.exit(0);
}

main().catch((err) => {
  out({ type: "result", ok: false, error: String(err?.stack ?? err) });
  process.exit(1);
});
