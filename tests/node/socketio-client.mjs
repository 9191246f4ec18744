// Drives plain socket.io-client sockets through the steps of runner.mjs.
//
// connect opens io(`${url}/${app}`, {auth: {jwt, uuid}, reconnection: false, ...options});
// without "options" the client's default transports are used (HTTP long-polling, then the
// upgrade to WebSocket), as in an app that just calls io(). Every event the socket receives
// is recorded (socket.onAny), plus "disconnect" and the engine's "transport_upgrade"; the
// connect line names the transport in use then and the one the engine opened with.
//
// Extra step:
//   {"op": "emit", "client": NAME, "event": E, "data": D | "args": [...],
//    "ack": true?, "label": L?, "timeoutMs": N?}
// With ack, the server's answer is printed as {"type": "ack", "client", "label", "event",
// "data"}; a missing answer within the timeout fails the step.

import { io } from "socket.io-client";

import { run } from "./runner.mjs";

await run({
  name: "socket.io-client",
  connect(ctx, step, { connected, connectFailed }) {
    const auth = { jwt: step.jwt };
    if (step.uuid !== undefined) auth.uuid = step.uuid;
    const socket = io(`${ctx.url}/${step.app}`, {
      auth,
      reconnection: false,
      forceNew: true,
      ...(step.options ?? {}),
    });
    // the transport the engine opened with, before any upgrade
    const firstTransport = socket.io.engine?.transport?.name ?? null;
    socket.io.engine?.on("upgrade", (transport) =>
      ctx.record(step.client, "transport_upgrade", transport.name),
    );
    socket.firstTransport = firstTransport;
    socket.onAny((event, ...args) =>
      ctx.record(step.client, event, args.length === 1 ? args[0] : args),
    );
    socket.on("connect", connected);
    socket.on("connect_error", connectFailed);
    socket.on("disconnect", (reason) => ctx.record(step.client, "disconnect", reason));
    return socket;
  },
  describe: (socket) => ({
    transport: socket.io.engine.transport.name,
    firstTransport: socket.firstTransport,
  }),
  stop(socket) {
    socket.disconnect();
  },
  ops: {
    async emit(ctx, socket, step) {
      const args = step.args ?? (step.data === undefined ? [] : [step.data]);
      if (!step.ack) {
        socket.emit(step.event, ...args);
        return;
      }
      const timeoutMs = step.timeoutMs ?? ctx.waitMs;
      let data;
      try {
        data = await socket.timeout(timeoutMs).emitWithAck(step.event, ...args);
      } catch (err) {
        ctx.fail(`no ack for ${step.event} within ${timeoutMs} ms: ${err.message}`);
      }
      ctx.out({ type: "ack", client: step.client, label: step.label ?? null, event: step.event, data });
    },
  },
});
