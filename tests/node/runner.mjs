// The step engine shared by the Node test clients (ekko-client.mjs, socketio-client.mjs).
//
// A script is driven by one JSON object, given as the first argument or in the env variable
// ECHO_NODE_PARAMS:
//
//   {
//     "url": "http://127.0.0.1:8000",   // the Echo server
//     "deadlineMs": 8000,                // the whole run; exit 3 when it passes
//     "waitMs": 3000,                    // default timeout of each wait / connect / ack
//     "steps": [ {"op": "connect", "client": "alice", ...}, ... ]
//   }
//
// Common steps (a client adapter adds its own, e.g. "publish" or "emit"):
//   {"op": "connect", "client": NAME, "app": APP, "jwt": TOKEN, "uuid": UUID?,
//    "expect": "connect" | "connect_error", "timeoutMs": N?}
//   {"op": "wait", "client": NAME, "event": "message", "match": {...}?, "count": 1?,
//    "timeoutMs": N?}   -- until NAME has received COUNT events that match (since it connected)
//   {"op": "sleep", "ms": N}
//   {"op": "stop", "client": NAME}
//
// Every line on stdout is one JSON object with a "type": start, console (whatever the client
// library printed with console.*), connect, connect_error, event, ack, step, fail, done.
// Exit status: 0 all steps done, 1 bad parameters or a crash, 2 a step failed or timed out,
// 3 the overall deadline passed.

import { format } from "node:util";

export function out(record) {
  // stdout to a pipe is synchronous on Linux, so nothing is lost on process.exit
  process.stdout.write(JSON.stringify(record) + "\n");
}

// Client libraries (Ekko) talk through console.log; keep stdout pure JSON by wrapping it.
for (const level of ["log", "info", "warn", "error", "debug"]) {
  console[level] = (...args) => out({ type: "console", level, text: format(...args) });
}

/** `expected` is a subset of `actual`: objects by key, arrays element-wise, the rest by ===. */
export function matches(expected, actual) {
  if (expected === null || typeof expected !== "object") return expected === actual;
  if (Array.isArray(expected)) {
    return (
      Array.isArray(actual) &&
      actual.length === expected.length &&
      expected.every((item, i) => matches(item, actual[i]))
    );
  }
  if (actual === null || typeof actual !== "object" || Array.isArray(actual)) return false;
  return Object.entries(expected).every(([key, value]) => matches(value, actual[key]));
}

class StepFailed extends Error {}

function readParams() {
  const raw = process.argv[2] ?? process.env.ECHO_NODE_PARAMS;
  if (!raw) throw new Error("pass the parameters as JSON: node SCRIPT '{\"url\": ..., \"steps\": [...]}'");
  const params = JSON.parse(raw);
  if (typeof params.url !== "string" || !Array.isArray(params.steps)) {
    throw new Error("parameters need a url (string) and steps (list)");
  }
  return params;
}

/**
 * Runs the steps against an adapter:
 *   adapter.name                                  -- for the start line
 *   adapter.connect(ctx, step) -> handle          -- opens a client; must call ctx.record(...)
 *                                                    for what it receives and resolve/reject
 *                                                    via ctx.connected / ctx.connectFailed
 *   adapter.stop(handle)                          -- closes it
 *   adapter.ops[op](ctx, handle, step) -> Promise -- the adapter's own steps
 */
export async function run(adapter) {
  let params;
  try {
    params = readParams();
  } catch (err) {
    out({ type: "fail", reason: `bad parameters: ${err.message}` });
    process.exit(1);
  }
  const waitMs = params.waitMs ?? 3000;
  const clients = new Map(); // name -> {handle, received: [{event, data}], waiters: Set}

  const stopAll = () => {
    for (const client of clients.values()) {
      try {
        if (client.handle) adapter.stop(client.handle);
      } catch {
        // closing is best effort on the way out
      }
    }
  };
  const finish = (code, record) => {
    if (record) out(record);
    stopAll();
    process.exit(code);
  };

  const deadlineMs = params.deadlineMs ?? 8000;
  setTimeout(
    () => finish(3, { type: "fail", reason: `overall deadline of ${deadlineMs} ms passed` }),
    deadlineMs,
  );

  const clientOf = (step) => {
    const client = clients.get(step.client);
    if (!client) throw new StepFailed(`no client named ${JSON.stringify(step.client)}`);
    return client;
  };

  const ctx = {
    url: params.url,
    waitMs,
    out,
    record(name, event, data) {
      const client = clients.get(name);
      out({ type: "event", client: name, event, data });
      if (!client) return;
      client.received.push({ event, data });
      for (const waiter of client.waiters) waiter();
    },
    fail(message) {
      throw new StepFailed(message);
    },
  };

  const waitFor = (name, step) => {
    const client = clientOf(step);
    const count = step.count ?? 1;
    const timeoutMs = step.timeoutMs ?? waitMs;
    const seen = () =>
      client.received.filter(
        (r) => r.event === step.event && (step.match === undefined || matches(step.match, r.data)),
      ).length;
    return new Promise((resolve, reject) => {
      const check = () => {
        if (seen() >= count) {
          client.waiters.delete(check);
          clearTimeout(timer);
          resolve();
        }
      };
      const timer = setTimeout(() => {
        client.waiters.delete(check);
        reject(
          new StepFailed(
            `${name}: wanted ${count} ${step.event} event(s) matching ` +
              `${JSON.stringify(step.match ?? {})} within ${timeoutMs} ms, got ${seen()}`,
          ),
        );
      }, timeoutMs);
      client.waiters.add(check);
      check();
    });
  };

  const connect = async (step) => {
    if (typeof step.client !== "string") throw new StepFailed("connect needs a client name");
    if (clients.has(step.client)) throw new StepFailed(`client ${step.client} exists already`);
    const expect = step.expect ?? "connect";
    const timeoutMs = step.timeoutMs ?? waitMs;
    const client = { handle: null, received: [], waiters: new Set() };
    clients.set(step.client, client);
    const outcome = await new Promise((resolve) => {
      const timer = setTimeout(() => resolve({ kind: "timeout" }), timeoutMs);
      const settle = (result) => {
        clearTimeout(timer);
        resolve(result);
      };
      client.handle = adapter.connect(ctx, step, {
        connected: () => settle({ kind: "connect" }),
        connectFailed: (err) => settle({ kind: "connect_error", err }),
      });
    });
    if (outcome.kind === "connect") {
      out({ type: "connect", client: step.client, ...(adapter.describe?.(client.handle) ?? {}) });
    } else if (outcome.kind === "connect_error") {
      out({
        type: "connect_error",
        client: step.client,
        message: outcome.err?.message,
        data: outcome.err?.data ?? null,
      });
    }
    if (outcome.kind !== expect) {
      throw new StepFailed(
        `${step.client}: expected ${expect} within ${timeoutMs} ms, got ${outcome.kind}` +
          (outcome.err ? `: ${outcome.err.message}` : ""),
      );
    }
  };

  out({ type: "start", client: adapter.name, url: params.url, steps: params.steps.length });
  for (const [index, step] of params.steps.entries()) {
    try {
      switch (step.op) {
        case "connect":
          await connect(step);
          break;
        case "wait":
          await waitFor(step.client, step);
          break;
        case "sleep":
          await new Promise((resolve) => setTimeout(resolve, step.ms ?? 0));
          break;
        case "stop": {
          const client = clientOf(step);
          adapter.stop(client.handle);
          break;
        }
        default: {
          const op = adapter.ops[step.op];
          if (!op) throw new StepFailed(`unknown op ${JSON.stringify(step.op)}`);
          await op(ctx, clientOf(step).handle, step);
        }
      }
    } catch (err) {
      const failed = err instanceof StepFailed;
      finish(failed ? 2 : 1, {
        type: "fail",
        step: index,
        op: step.op,
        reason: failed ? err.message : String(err?.stack ?? err),
      });
    }
    out({ type: "step", step: index, op: step.op, ...(step.label ? { label: step.label } : {}) });
  }
  finish(0, { type: "done" });
}
