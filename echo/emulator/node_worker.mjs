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
  let result;
  try {
    result = await handler(request.event, contextFor(request));
  } catch (error) {
    const stack = error?.stack ?? String(error);
    process.stderr.write(`[${request.function}] threw: ${stack}\n`);
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
