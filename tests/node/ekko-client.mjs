// Drives unchanged ekko-realtime-client@2.3.2 instances through the steps of runner.mjs.
//
// Extra steps, each calling the Ekko method of the same name with "params" as given:
//   {"op": "subscribe",   "client": NAME, "params": {"channels": [...], "withPresence": true?}}
//   {"op": "unsubscribe", "client": NAME, "params": {"channels": [...]}}
//   {"op": "publish",     "client": NAME, "params": {"channel": C, "message": M}}
// connect does `new Ekko({host, appName, jwt, uuid})` and then
// `addListener({message, presence, status})`, recording each as an "event" line.
// Ekko has no acks; the server's refusals then arrive as an "error" event, which is recorded
// too (a listener on ekko.socket, next to Ekko's own) so a test can see them.

import Ekko from "ekko-realtime-client";

import { run } from "./runner.mjs";

const call = (method) => async (ctx, ekko, step) => {
  ekko[method]({ ...(step.params ?? {}) });
};

await run({
  name: "ekko-realtime-client",
  connect(ctx, step, { connected, connectFailed }) {
    const params = { host: ctx.url, appName: step.app, jwt: step.jwt };
    if (step.uuid !== undefined) params.uuid = step.uuid;
    const ekko = new Ekko(params);
    if (step.listen !== false) {
      ekko.addListener({
        message: (data) => ctx.record(step.client, "message", data),
        presence: (data) => ctx.record(step.client, "presence", data),
        status: (data) => ctx.record(step.client, "status", data),
      });
    }
    ekko.socket.on("error", (data) => ctx.record(step.client, "error", data));
    ekko.socket.on("connect", connected);
    ekko.socket.on("connect_error", connectFailed);
    ekko.socket.on("disconnect", (reason) => ctx.record(step.client, "disconnect", reason));
    return ekko;
  },
  describe: (ekko) => ({ transport: ekko.socket.io.engine.transport.name }),
  stop(ekko) {
    ekko.stop();
  },
  ops: {
    subscribe: call("subscribe"),
    unsubscribe: call("unsubscribe"),
    publish: call("publish"),
  },
});
