// A JavaScript function worker: the same line protocol as echo/emulator/worker.py.
//
// Each line on stdin is a JSON request {id, function, path, handler, timeout, event,
// context}; each answer is one JSON line on the original stdout, in order. The function's own
// console output goes to stderr (the dev server's console), so it can never corrupt the
// protocol. A handler is Ekko's `exports.handler = async (message) => ...` (CommonJS) or
// `export const handler` (ESM, .mjs or "type": "module"), sync or async, called with the
// message and a Lambda-like context. A fresh worker loads fresh code: the server retires
// workers on reload.

import { createInterface } from "node:readline";
import { pathToFileURL } from "node:url";
import { existsSync } from "node:fs";
import { join } from "node:path";
import { format } from "node:util";
import { createCipheriv, createDecipheriv, hkdfSync, randomBytes } from "node:crypto";

const protocolOut = process.stdout.write.bind(process.stdout);
const MAX_CAPTURED_LINES = 200;
let captured = null; // while an invocation asks for it (the dev inspector): what it printed
const toConsole = (...args) => {
  const text = format(...args);
  if (captured && captured.length < MAX_CAPTURED_LINES) {
    captured.push(...text.split("\n").slice(0, MAX_CAPTURED_LINES - captured.length).map((l) => l.slice(0, 2000)));
  }
  process.stderr.write(text + "\n");
};
console.log = console.info = console.debug = console.warn = console.error = toConsole;
process.stdout.write = (chunk, ...rest) => process.stderr.write(chunk, ...rest);

const handlers = new Map();
let attempts = 0; // a failed import is cached by its URL: each try gets a URL of its own

async function loadHandler(request) {
  if (handlers.has(request.function)) return handlers.get(request.function);
  const [moduleName, exportName] = request.handler.split(".", 2);
  const file = [".mjs", ".js", ".cjs"].map((ext) => join(request.path, moduleName + ext)).find(existsSync);
  if (!file) throw new Error(`no ${moduleName}.js or ${moduleName}.mjs in ${request.path}`);
  const loaded = await import(`${pathToFileURL(file).href}?load=${++attempts}`);
  const handler = loaded[exportName] ?? loaded.default?.[exportName];
  if (typeof handler !== "function") {
    throw new Error(`${file} exports no function ${JSON.stringify(exportName)} ` +
      `(write \`exports.${exportName} = async (message) => message\`)`);
  }
  handlers.set(request.function, handler);
  return handler;
}

function describe(error) {
  if (error instanceof Error) return `${error.name}: ${error.message}`;
  return `thrown ${typeof error}: ${String(error)}`;
}

function contextFor(request) {
  const deadline = Date.now() + request.timeout * 1000;
  return {
    functionName: request.function,
    functionVersion: "$LATEST",
    invokedFunctionArn: `arn:aws:lambda:local:000000000000:function:${request.function}`,
    memoryLimitInMB: "128",
    awsRequestId: request.context.messageId ?? "",
    logGroupName: `/aws/lambda/${request.function}`,
    logStreamName: "local",
    clientContext: { custom: request.context },
    getRemainingTimeInMillis: () => Math.max(0, deadline - Date.now()),
    callbackWaitsForEmptyEventLoop: true,
  };
}

// A trusted function on an encrypted channel (echo/runners/trusted.py has the same rules):
// open the envelope with the channel's key, derived from the app's master key for its kid
// in ECHO_E2E_KEYS, and seal the result under the same kid.
const b64url = (bytes) => Buffer.from(bytes).toString("base64url");
const associatedData = (app, channel, kid) => Buffer.from(`echo-e2e/1\n${app}\n${channel}\n${kid}`);

function channelKey(master, app, channel) {
  return Buffer.from(hkdfSync("sha256", master, Buffer.from("echo-e2e/1"), Buffer.from(`${app}\n${channel}`), 32));
}

function openForFunction(envelope, context) {
  const text = process.env.ECHO_E2E_KEYS;
  if (!text) throw new Error("this function runs on an encrypted channel but ECHO_E2E_KEYS is not set " +
    'in its environment (e.g. {"k1": "<base64url master key>"})');
  const kid = envelope?.kid;
  let keys;
  try {
    keys = JSON.parse(text);
  } catch {
    throw new Error('ECHO_E2E_KEYS is not JSON: {"k1": "<base64url master key>"}'); // never quote it
  }
  const master = keys?.[kid];
  if (typeof master !== "string") throw new Error(`no master key for this kid in ECHO_E2E_KEYS`);
  const masterKey = Buffer.from(master, "base64url");
  if (masterKey.length < 32) throw new Error("a master key in ECHO_E2E_KEYS is shorter than 32 bytes");
  const key = channelKey(masterKey, context.app, context.channel);
  const sealed = Buffer.from(envelope.ct, "base64url");
  const decipher = createDecipheriv("aes-256-gcm", key, Buffer.from(envelope.iv, "base64url"));
  decipher.setAAD(associatedData(context.app, context.channel, kid));
  decipher.setAuthTag(sealed.subarray(sealed.length - 16));
  const plaintext = Buffer.concat([decipher.update(sealed.subarray(0, sealed.length - 16)), decipher.final()]);
  const seal = (result) => {
    if (result === null || result === undefined) return null;
    const iv = randomBytes(12);
    const cipher = createCipheriv("aes-256-gcm", key, iv);
    cipher.setAAD(associatedData(context.app, context.channel, kid));
    const ct = Buffer.concat([cipher.update(Buffer.from(JSON.stringify(result))), cipher.final(), cipher.getAuthTag()]);
    return { v: 1, alg: "A256GCM", kid, iv: b64url(iv), ct: b64url(ct) };
  };
  let event;
  try {
    event = JSON.parse(plaintext.toString("utf8"));
  } catch {
    throw new Error("the plaintext is not JSON"); // JSON.parse's own message quotes it
  }
  return { event, seal };
}

async function handle(request) {
  let handler;
  try {
    handler = await loadHandler(request);
  } catch (error) {
    const missing = error?.code === "ERR_MODULE_NOT_FOUND" || error?.code === "MODULE_NOT_FOUND";
    process.stderr.write(`${error?.stack ?? String(error)}\n`);
    return { ok: false, kind: "load_failed", detail: describe(error) +
      (missing ? `: add it to ${join(request.path, "package.json")} (echoctl dev installs it)` : "") };
  }
  let event = request.event;
  let seal = null;
  if (request.context?.encrypted) {
    try {
      ({ event, seal } = openForFunction(event, request.context));
    } catch (error) {
      return { ok: false, kind: "raised", detail: `could not decrypt its input: ${describe(error)}` };
    }
  }
  let result;
  try {
    result = await handler(event, contextFor(request));
    if (seal) result = seal(result === undefined ? null : result);
  } catch (error) {
    const stack = error?.stack ?? String(error);
    process.stderr.write(`[${request.function}] threw: ${stack}\n`);
    if (seal) { // an error's text may quote the plaintext: it stays on this host's console
      return { ok: false, kind: "raised", detail: `${error?.name ?? "Error"} (the channel is ` +
        "encrypted: the message is on the function host's console)" };
    }
    return { ok: false, kind: "raised", detail: describe(error),
      ...(request.capture ? { traceback: String(stack).slice(-8000) } : {}) };
  }
  return { ok: true, result: result === undefined ? null : result };
}

async function handleCapturing(request) {
  if (!request.capture) return handle(request);
  captured = [];
  try {
    return { ...(await handle(request)), logs: captured };
  } finally {
    captured = null;
  }
}

function encode(id, response) {
  try {
    return JSON.stringify({ id, ...response });
  } catch (error) {
    return JSON.stringify({ id, ok: false, kind: "bad_result",
      detail: `returned something that is not JSON (${describe(error)})` });
  }
}

const lines = createInterface({ input: process.stdin, crlfDelay: Infinity });
let queue = Promise.resolve();
lines.on("line", (line) => {
  if (!line.trim()) return;
  queue = queue.then(async () => {
    const request = JSON.parse(line);
    const response = await handleCapturing(request);
    protocolOut(encode(request.id, response) + "\n");
  });
});
lines.on("close", () => queue.then(() => process.exit(0)));
