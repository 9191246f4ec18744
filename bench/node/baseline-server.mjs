// The seed's stack, for comparison: a minimal Node socket.io 4.x server doing Echo's routing.
//
// Namespace per app (/<appName>), JWT (HS256, claim appName) checked at connect, events
// `subscribe {channels}` and `publish {channel, message}`, and `message {channel, message,
// uuid, id, seq, ts}` emitted to the channel's room (the same bytes Echo sends). Acks are
// answered like Echo's ({ok: true, ...}). No functions: this is the plain routing baseline.
//
//   node baseline-server.mjs --port 4000 [--host 127.0.0.1] [--redis redis://127.0.0.1:6379]
//
// Environment: ECHO_SECRET (the HS256 key the bench signs its tokens with).
import { createHmac, randomBytes, timingSafeEqual } from "node:crypto";
import { createServer } from "node:http";
import { parseArgs } from "node:util";
import { Server } from "socket.io";

const { values: args } = parseArgs({
  options: {
    port: { type: "string", default: "4000" },
    host: { type: "string", default: "127.0.0.1" },
    redis: { type: "string" },
  },
});
const secret = process.env.ECHO_SECRET ?? "";
if (secret.length < 32) {
  console.error("ECHO_SECRET must be set (32+ characters)");
  process.exit(2);
}

function verifyJwt(token) {
  if (typeof token !== "string") return null;
  const parts = token.split(".");
  if (parts.length !== 3) return null;
  const expected = createHmac("sha256", secret).update(`${parts[0]}.${parts[1]}`).digest();
  const given = Buffer.from(parts[2], "base64url");
  if (given.length !== expected.length || !timingSafeEqual(given, expected)) return null;
  try {
    const header = JSON.parse(Buffer.from(parts[0], "base64url"));
    if (header.alg !== "HS256") return null;
    const claims = JSON.parse(Buffer.from(parts[1], "base64url"));
    if (claims.exp !== undefined && claims.exp * 1000 < Date.now()) return null;
    return claims;
  } catch {
    return null;
  }
}

const httpServer = createServer((req, res) => {
  // socket.io answers its own path (/socket.io/) before this handler sees a request
  if (req.url === "/health") res.writeHead(200, { "content-type": "text/plain" }).end("ok");
  else res.writeHead(404).end();
});
const io = new Server(httpServer, { cors: { origin: "*" } });

if (args.redis) {
  const { createClient } = await import("redis");
  const { createAdapter } = await import("@socket.io/redis-adapter");
  const pub = createClient({ url: args.redis });
  const sub = pub.duplicate();
  await Promise.all([pub.connect(), sub.connect()]);
  io.adapter(createAdapter(pub, sub));
}

const node = randomBytes(4).toString("hex");
let ids = 0;
const seqs = new Map();

const apps = io.of(/^\/[A-Za-z0-9_.:@=-]+$/);
apps.use((socket, next) => {
  const app = socket.nsp.name.slice(1);
  const claims = verifyJwt(socket.handshake.auth?.jwt);
  if (!claims || claims.appName !== app) return next(new Error("Authorization error: bad token"));
  socket.data.uuid = typeof socket.handshake.auth?.uuid === "string" ? socket.handshake.auth.uuid : socket.id;
  next();
});
apps.on("connection", (socket) => {
  socket.on("subscribe", (data, ack) => {
    const channels = Array.isArray(data?.channels) ? data.channels.filter((c) => typeof c === "string") : [];
    for (const channel of channels) socket.join(channel);
    if (typeof ack === "function") ack({ ok: true, channels });
  });
  socket.on("unsubscribe", (data, ack) => {
    const channels = Array.isArray(data?.channels) ? data.channels.filter((c) => typeof c === "string") : [];
    for (const channel of channels) socket.leave(channel);
    if (typeof ack === "function") ack({ ok: true, channels });
  });
  socket.on("publish", (data, ack) => {
    const channel = data?.channel;
    if (typeof channel !== "string" || channel === "admin") {
      if (typeof ack === "function") ack({ ok: false, error: { code: "bad_channel", message: "bad channel" } });
      return;
    }
    const key = socket.nsp.name + " " + channel;
    const seq = (seqs.get(key) ?? 0) + 1;
    seqs.set(key, seq);
    const id = `${node}-${++ids}`;
    const ts = Date.now();
    socket.nsp.to(channel).emit("message", { channel, message: data.message, uuid: socket.data.uuid, id, seq, ts });
    if (typeof ack === "function") ack({ ok: true, id, seq, ts, delivered: true });
  });
});

httpServer.listen(Number(args.port), args.host, () => {
  console.log(`baseline socket.io ${args.redis ? "on Redis " : ""}listening on ${args.host}:${args.port}`);
});
for (const signal of ["SIGINT", "SIGTERM"]) {
  process.on(signal, () => {
    io.close();
    process.exit(0);
  });
}
