// HTTP load generator for Echo's server API: POSTs JSON bodies over keep-alive connections.
//
//   node httpload.mjs '{"url": "http://127.0.0.1:PORT/api/bench/publish", "token": "...",
//                       "channel": "c", "requests": 20000, "concurrency": 32, "timeout": 60}'
//
// Each of `concurrency` loops keeps one request in flight on its own keep-alive socket, so
// the figure is the server's, not the generator's (Node's http client costs ~20 µs a request).
// Prints one JSON line: requests, ok, refused (non-200, by status), seconds, p50/p99 ms, and
// the generator's own CPU % over the run (★ in reports above 85%).
import http from "node:http";

const config = JSON.parse(process.argv[2]);
const url = new URL(config.url);
const agent = new http.Agent({ keepAlive: true, maxSockets: config.concurrency });
const headers = {
  authorization: `Bearer ${config.token}`,
  "content-type": "application/json",
};
const deadline = Date.now() + 1000 * (config.timeout ?? 60);
const latencies = [];
const statuses = {};
let next = 0;
let ok = 0;

function post(body) {
  return new Promise((resolve, reject) => {
    const request = http.request(
      { host: url.hostname, port: url.port, path: url.pathname, method: "POST", agent,
        headers: { ...headers, "content-length": Buffer.byteLength(body) } },
      (response) => {
        response.resume();
        response.on("end", () => resolve(response.statusCode));
      });
    request.setTimeout(30_000, () => request.destroy(new Error("timed out")));
    request.on("error", reject);
    request.end(body);
  });
}

async function loop() {
  while (next < config.requests && Date.now() < deadline) {
    const n = next++;
    const body = JSON.stringify({ channel: config.channel, message: { n, t: Date.now() } });
    const start = performance.now();
    let status;
    try {
      status = await post(body);
    } catch (error) {
      status = String(error.message).slice(0, 40);
    }
    latencies.push(performance.now() - start);
    if (status === 200) ok++;
    else statuses[status] = (statuses[status] ?? 0) + 1;
  }
}

const cpu0 = process.cpuUsage();
const t0 = performance.now();
await Promise.all(Array.from({ length: config.concurrency }, loop));
const seconds = (performance.now() - t0) / 1000;
const cpu = process.cpuUsage(cpu0);
latencies.sort((a, b) => a - b);
const at = (q) => latencies.length ? latencies[Math.floor(q * (latencies.length - 1))] : null;
console.log(JSON.stringify({
  requests: latencies.length, ok, refused: statuses, seconds,
  p50_ms: at(0.5), p99_ms: at(0.99),
  gen_cpu_pct: (100 * (cpu.user + cpu.system)) / 1e6 / seconds,
}));
agent.destroy();
