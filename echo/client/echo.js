/**
 * Echo's browser client, with the API of Ekko's client.
 *
 *   import { Echo } from "/client/echo.js";
 *   const echo = new Echo({ host: location.origin, appName: "chat-demo", jwt });
 *   echo.addListener({ message: (m) => console.log(m.channel, m.message) });
 *   await echo.subscribe({ channels: ["angry"] });
 *   await echo.publish({ channel: "angry", message: { text: "hello" } });
 *
 * Requests resolve with the server's ack (`{ok: true, ...}`) or reject with an EchoError
 * whose `.code` is the server's error code ("timeout" when no ack came back in time).
 * After a lost connection it reconnects by itself and joins its channels again; `state`
 * listeners hear "connecting", "connected", "disconnected" and "error".
 *
 * On channels that keep history (associations: `"history": true`) every message carries
 * `offset` and `epoch`; the client remembers the last one per channel and, on reconnect,
 * asks for what it missed: those messages arrive first, in order, once. The "connected"
 * state after a reconnect says `recovered: {channel: true|false}`; false means messages
 * may be missing (too old, or the server lost its history): reload that channel's state
 * from your own backend (or `history()`).
 *
 * End-to-end encrypted channels: `cipher: {"secret": {kid: "k1", key}, "private:*": {kid: "k2",
 * getKey: async (channel, kid) => key}}` (exact names win, then the first glob listed) seals
 * every publish on those channels as an AES-256-GCM envelope (WebCrypto) and opens every
 * message and history publication before listeners see it (`encrypted: true` added); what
 * cannot be opened is an `error` event `{code: "decrypt_failed", channel, id, message}`.
 * The envelope and key rules are echo/sdk/e2e.py's, so browsers and the Python SDK read
 * each other. Keys never go to the server.
 *
 * Two ways to load it, one file:
 * - from the server: every Echo server serves this file at /client/echo.js, and the
 *   socket.io-client build it imports (`./socket.io.esm.min.js`) next to it;
 * - from a bundler (Vite, esbuild, webpack, Rollup): `./socket.io.esm.min.js` resolves to the
 *   two-line file beside this one, which imports `socket.io-client` from node_modules.
 */
import { io } from "./socket.io.esm.min.js";

/** How long a request waits for the server's ack, in milliseconds. */
export const ACK_TIMEOUT_MS = 10000;

/** The server refused a request (or never answered it). */
export class EchoError extends Error {
  /** @param {{code: string, message: string}} error the `error` of an `{ok: false}` ack */
  constructor(error) {
    super(error.message);
    this.name = "EchoError";
    this.code = error.code;
    this.details = error;
  }
}

/** A random v4 uuid; crypto.randomUUID is missing outside secure contexts (plain http). */
function randomUUID() {
  if (globalThis.crypto?.randomUUID) return crypto.randomUUID();
  const b = crypto.getRandomValues(new Uint8Array(16));
  b[6] = (b[6] & 0x0f) | 0x40;
  b[8] = (b[8] & 0x3f) | 0x80;
  const hex = [...b].map((x) => x.toString(16).padStart(2, "0")).join("");
  return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20)}`;
}

/** The user a token is for (its `uuid` or `sub` claim), read without verifying it. */
function claimedUuid(token) {
  try {
    const part = String(token).split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    const claims = JSON.parse(atob(part + "=".repeat((4 - (part.length % 4)) % 4)));
    const user = claims.uuid ?? claims.sub;
    return typeof user === "string" && user ? user : null;
  } catch {
    return null;
  }
}

// -- end-to-end encryption (the rules of echo/sdk/e2e.py and echo/core/envelope.py) --------

/** The envelope's version and algorithm: `{v: 1, alg: "A256GCM", kid, iv, ct}`. */
export const E2E_VERSION = 1;
export const E2E_ALG = "A256GCM";
/** PBKDF2-SHA256 rounds of keyFromPassphrase (as echo.sdk.e2e.key_from_passphrase). */
export const PBKDF2_ITERATIONS = 600000;
const KEY_BYTES = 32;
const IV_BYTES = 12;
const KID = /^[A-Za-z0-9._-]{1,64}$/;
const B64URL = /^[A-Za-z0-9_-]*$/;
const ENVELOPE_KEYS = ["v", "alg", "kid", "iv", "ct"];

/** An envelope that could not be opened (or a message that could not be sealed). */
export class DecryptError extends Error {
  constructor(reason, code = "decrypt_failed") {
    super(reason);
    this.name = "DecryptError";
    this.code = code;
  }
}

function subtle() {
  const found = globalThis.crypto?.subtle;
  if (!found) {
    throw new DecryptError("WebCrypto (crypto.subtle) is not available here: serve the page " +
      "over https or from localhost", "no_webcrypto");
  }
  return found;
}

/** Bytes as base64url without padding. */
export function b64url(bytes) {
  let binary = "";
  for (const byte of bytes) binary += String.fromCharCode(byte);
  return btoa(binary).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}

/** base64url (no padding) as bytes; throws on anything else. */
export function unb64url(text) {
  if (typeof text !== "string" || !B64URL.test(text) || text.length % 4 === 1) {
    throw new DecryptError("not base64url");
  }
  const binary = atob(text.replace(/-/g, "+").replace(/_/g, "/") + "=".repeat((4 - (text.length % 4)) % 4));
  return Uint8Array.from(binary, (c) => c.charCodeAt(0));
}

const utf8 = (text) => new TextEncoder().encode(text);

/** What the ciphertext is bound to: a copy on another app, channel or kid does not open. */
export function associatedData(appName, channel, kid) {
  return utf8(`echo-e2e/${E2E_VERSION}\n${appName}\n${channel}\n${kid}`);
}

/** Why `value` is not an envelope, or null when it is one (the server's own check). */
export function envelopeProblem(value) {
  if (typeof value !== "object" || value === null || Array.isArray(value)) {
    const kind = value === null ? "NoneType" : Array.isArray(value) ? "list" : typeof value;
    return `got ${kind}, not an envelope object`;
  }
  const missing = ENVELOPE_KEYS.filter((key) => !(key in value));
  if (missing.length) return `envelope lacks ${missing.sort().join(", ")}`;
  const extra = Object.keys(value).filter((key) => !ENVELOPE_KEYS.includes(key)).sort();
  if (extra.length) return `envelope has unknown key '${extra[0].slice(0, 40)}'`;
  if (value.v !== E2E_VERSION) return `envelope version must be ${E2E_VERSION}`;
  if (value.alg !== E2E_ALG) return `envelope alg must be "${E2E_ALG}"`;
  if (typeof value.kid !== "string" || !KID.test(value.kid)) {
    return "envelope kid must be 1-64 characters of letters, digits and . _ -";
  }
  const { iv, ct } = value;
  if (typeof iv !== "string" || iv.length !== 16 || !B64URL.test(iv)) {
    return "envelope iv must be 12 bytes, base64url (16 characters)";
  }
  if (typeof ct !== "string" || ct.length < 22 || !B64URL.test(ct) || ct.length % 4 === 1) {
    return "envelope ct must be base64url ciphertext with its 16-byte tag";
  }
  return null;
}

/**
 * An AES-GCM CryptoKey from a CryptoKey, 32 bytes (Uint8Array, any ArrayBuffer view or an
 * ArrayBuffer) or their base64url text. Throws DecryptError (code "bad_key") otherwise.
 */
export async function importKey(key) {
  if (typeof CryptoKey !== "undefined" && key instanceof CryptoKey) {
    if (key.algorithm?.name !== "AES-GCM") throw new DecryptError(`the key is ${key.algorithm?.name}, not AES-GCM`, "bad_key");
    return key;
  }
  let bytes;
  if (typeof key === "string") {
    try {
      bytes = unb64url(key);
    } catch {
      throw new DecryptError("a key given as text is base64url (no padding)", "bad_key");
    }
  } else if (key instanceof ArrayBuffer) {
    bytes = new Uint8Array(key);
  } else if (ArrayBuffer.isView(key)) {
    bytes = new Uint8Array(key.buffer, key.byteOffset, key.byteLength);
  } else {
    throw new DecryptError("a key is a CryptoKey, 32 bytes or their base64url text", "bad_key");
  }
  if (bytes.length !== KEY_BYTES) {
    throw new DecryptError(`an encryption key is ${KEY_BYTES} bytes (got ${bytes.length})`, "bad_key");
  }
  return subtle().importKey("raw", bytes, { name: "AES-GCM" }, false, ["encrypt", "decrypt"]);
}

/**
 * A channel's key from a passphrase its users share: PBKDF2-SHA256, 600,000 rounds, salt
 * `echo-e2e/1\n{appName}\n{channel}` (as echo.sdk.e2e.key_from_passphrase). As strong as the
 * passphrase, no stronger. Resolves with a (non-extractable) AES-GCM CryptoKey.
 */
export async function keyFromPassphrase(passphrase, appName, channel) {
  const crypto = subtle();
  const material = await crypto.importKey("raw", utf8(String(passphrase).normalize("NFC")), "PBKDF2", false, ["deriveKey"]);
  return crypto.deriveKey(
    { name: "PBKDF2", hash: "SHA-256", salt: utf8(`echo-e2e/${E2E_VERSION}\n${appName}\n${channel}`),
      iterations: PBKDF2_ITERATIONS },
    material, { name: "AES-GCM", length: 256 }, false, ["encrypt", "decrypt"]);
}

/** The envelope of `message` (any JSON value) for `channel` of `appName`, under `kid`. */
export async function encryptMessage(message, key, { appName, channel, kid }) {
  if (typeof kid !== "string" || !KID.test(kid)) {
    throw new DecryptError(`kid ${JSON.stringify(kid)}: 1-64 characters of letters, digits and . _ -`, "bad_key");
  }
  const text = JSON.stringify(message);
  if (text === undefined) throw new TypeError("an encrypted message must be a JSON value");
  const cryptoKey = await importKey(key);
  const iv = globalThis.crypto.getRandomValues(new Uint8Array(IV_BYTES));
  const ct = await subtle().encrypt(
    { name: "AES-GCM", iv, additionalData: associatedData(appName, channel, kid), tagLength: 128 },
    cryptoKey, utf8(text));
  return { v: E2E_VERSION, alg: E2E_ALG, kid, iv: b64url(iv), ct: b64url(new Uint8Array(ct)) };
}

/**
 * The message inside `envelope`; `key` is a key (see importKey) or `(kid) => key` (sync or
 * async, null when there is none). Rejects with a DecryptError (code "decrypt_failed") when
 * it cannot be opened: not an envelope, no key for its kid, wrong key, tampered, or made for
 * another channel, app or kid.
 */
export async function decryptMessage(envelope, key, { appName, channel }) {
  const problem = envelopeProblem(envelope);
  if (problem !== null) throw new DecryptError(problem);
  const { kid } = envelope;
  let found;
  try {
    found = await (typeof key === "function" ? key(kid) : key);
  } catch (err) {
    throw new DecryptError(`getKey failed for kid '${kid}': ${err?.message ?? err}`);
  }
  if (found === null || found === undefined) throw new DecryptError(`no key for kid '${kid}'`);
  let cryptoKey;
  try {
    cryptoKey = await importKey(found);
  } catch (err) {
    throw new DecryptError(`the key for kid '${kid}' is unusable: ${err.message}`);
  }
  let plaintext;
  try {
    plaintext = await subtle().decrypt(
      { name: "AES-GCM", iv: unb64url(envelope.iv), additionalData: associatedData(appName, channel, kid), tagLength: 128 },
      cryptoKey, unb64url(envelope.ct));
  } catch {
    throw new DecryptError("the ciphertext does not open with this key on this channel " +
      "(wrong key, tampered, or copied from elsewhere)");
  }
  try {
    return JSON.parse(new TextDecoder("utf-8", { fatal: true }).decode(plaintext));
  } catch (err) {
    throw new DecryptError(`the plaintext is not JSON: ${String(err.message).slice(0, 120)}`);
  }
}

/** fnmatch's glob (`*`, `?`, `[...]`, `[!...]`) as a RegExp, as the Python SDK matches. */
function globRegExp(pattern) {
  let source = "";
  for (let i = 0; i < pattern.length; i++) {
    const c = pattern[i];
    if (c === "*") source += ".*";
    else if (c === "?") source += ".";
    else if (c === "[" && pattern.indexOf("]", i + 2) !== -1) {
      const end = pattern.indexOf("]", i + 2);
      let body = pattern.slice(i + 1, end);
      body = (body[0] === "!" ? "^" + body.slice(1) : body).replace(/\\/g, "\\\\");
      source += `[${body}]`;
      i = end;
    } else source += c.replace(/[.*+?^${}()|[\]\\/]/g, "\\$&");
  }
  return new RegExp(`^(?:${source})$`, "s");
}

/** One `cipher` entry: publishes use `kid`; envelopes are opened by their own kid, with
 *  `key` (for `kid`) or `getKey(channel, kid)`; imported keys are cached. */
class ChannelCipher {
  constructor(pattern, { kid = "k1", key, getKey } = {}) {
    if (typeof kid !== "string" || !KID.test(kid)) {
      throw new TypeError(`cipher ${pattern}: kid is 1-64 characters of letters, digits and . _ -`);
    }
    if ((key === undefined || key === null) && typeof getKey !== "function") {
      throw new TypeError(`cipher ${pattern}: give key or getKey(channel, kid)`);
    }
    this.pattern = pattern;
    this.kid = kid;
    this.key = key ?? null;
    this.getKey = typeof getKey === "function" ? getKey : null;
    this._static = null; // the imported `key`
    this._cache = new Map(); // `${channel}\n${kid}` -> Promise<CryptoKey>
  }

  /** Resolves with the CryptoKey for (channel, kid), or null when there is none. */
  keyFor(channel, kid) {
    if (this.key !== null && kid === this.kid) return (this._static ??= importKey(this.key));
    if (this.getKey === null) return Promise.resolve(null);
    const slot = `${channel}\n${kid}`;
    let found = this._cache.get(slot);
    if (!found) {
      found = Promise.resolve().then(() => this.getKey(channel, kid))
        .then((key) => (key === null || key === undefined ? null : importKey(key)));
      this._cache.set(slot, found);
      // a missing key or a failed lookup is asked again next time
      found.then((key) => { if (key === null) this._cache.delete(slot); },
        () => this._cache.delete(slot));
    }
    return found;
  }
}

export class Echo {
  /**
   * Connects at once (and reconnects by itself) to the app's namespace `host/appName`.
   * @param {{host: string, appName: string, jwt?: string, getToken?: () => string | Promise<string>,
   *   uuid?: string, cipher?: Object<string, {kid?: string, key?: CryptoKey | Uint8Array |
   *   ArrayBuffer | string, getKey?: (channel: string, kid: string) => any}>}} options
   *   `getToken` is asked for a token on every connect (give it instead of `jwt` when tokens
   *   expire: a reconnect then gets a fresh one). `uuid` names this client to others
   *   (messages, presence); random when absent (a token with a uuid claim fixes it).
   *   `cipher` makes channels (exact names or globs) end-to-end encrypted: see setCipher.
   */
  constructor({ host, appName, jwt, getToken, uuid, cipher } = {}) {
    if (!host || !appName || !(jwt || getToken)) {
      throw new TypeError("new Echo({host, appName, jwt}) needs host, appName and jwt (or getToken)");
    }
    this.appName = appName;
    this.uuid = uuid || (jwt && claimedUuid(jwt)) || randomUUID();
    /** @type {Map<string, boolean>} subscribed channel -> withPresence; replayed on reconnect */
    this.channels = new Map();
    /** @type {Map<string, {offset: number, epoch: string}>} the last position seen per
     *  history channel: where a reconnect recovers from */
    this.positions = new Map();
    /** The last connection state: "connecting", "connected", "disconnected" or "error". */
    this.state = "connecting";
    this._listeners = new Set();
    this._connectedBefore = false;
    /** @type {Map<string, ChannelCipher>} channel name or glob -> its cipher, in order */
    this._ciphers = new Map();
    this._globs = []; // [RegExp, ChannelCipher], in the order given
    /** @type {Map<string, Promise<void>>} per encrypted channel, the last message being opened */
    this._opening = new Map();
    for (const [pattern, entry] of Object.entries(cipher ?? {})) this.setCipher(pattern, entry);

    const url = host.replace(/\/+$/, "") + "/" + appName;
    const auth = getToken
      ? (reply) => Promise.resolve().then(getToken)
        .then((token) => {
          this.uuid = uuid || claimedUuid(token) || this.uuid; // a token for a user names it
          reply({ jwt: token, uuid: this.uuid });
        })
        .catch((err) => reply({ jwt: "", uuid: this.uuid, tokenError: String(err) }))
      : { jwt, uuid: this.uuid };
    this.socket = io(url, { transports: ["websocket"], auth });
    const socket = this.socket;
    this._stopped = false;
    this._refusals = 0;
    this._retryTimer = null;
    socket.on("connect", async () => {
      this._refusals = 0;
      // after a reconnect, "connected" means back in our channels (and caught up) too
      const recovered = this._connectedBefore ? await this._resubscribe() : null;
      // recovered messages on encrypted channels are heard before "connected" too
      if (recovered && this._opening.size) await Promise.all([...this._opening.values()]);
      this._connectedBefore = true;
      if (socket.connected) {
        this._emit("state", recovered && Object.keys(recovered).length
          ? { state: "connected", recovered } : { state: "connected" });
      }
    });
    socket.on("disconnect", (reason) => this._emit("state", { state: "disconnected", reason }));
    socket.on("connect_error", (err) => {
      // Network trouble: socket.io keeps retrying by itself (socket.active). A refusal by the
      // server stops socket.io for good; only a refused token deserves that. Anything else
      // (a node shutting down, a connection limit) is retried here, with back-off.
      const refused = !socket.active;
      // a refused token is final, unless getToken can fetch a new one
      const retrying = !(refused && /^Authorization error/.test(err.message) && !getToken);
      if (refused && retrying) this._connectLater();
      this._emit("state", { state: "error", message: err.message, retrying });
    });
    socket.io.on("reconnect_attempt", () => this._emit("state", { state: "connecting" }));
    socket.on("message", (message) => {
      if (!this._saw(message?.channel, message)) return;
      const cipher = this._ciphers.size ? this.cipherFor(message?.channel) : null;
      if (cipher) this._openInOrder(cipher, message);
      else this._emit("message", message);
    });
    for (const event of ["status", "presence", "error"]) {
      socket.on(event, (payload) => this._emit(event, payload));
    }
    // after the constructor returns, so a listener added right away still hears it
    queueMicrotask(() => {
      if (!socket.connected && this.state === "connecting") this._emit("state", { state: "connecting" });
    });
  }

  /**
   * Adds callbacks, any of: message(msg), status(event), presence(event), error(err),
   * state({state, reason?, message?, retrying?}); state is "connecting", "connected",
   * "disconnected" or "error". Returns a function that removes them again.
   */
  addListener(listener) {
    this._listeners.add(listener);
    return () => this.removeListener(listener);
  }

  /** Removes callbacks given to addListener. */
  removeListener(listener) {
    this._listeners.delete(listener);
  }

  /**
   * Joins channels; kept across reconnects until unsubscribe. A channel this token may not
   * join is left out (the others are joined) and named in `refused`; when every one is
   * refused, the promise rejects.
   * @param {{channels: string[], withPresence?: boolean}} request
   * @returns {Promise<{ok: true, channels: string[], refused?: Object<string, {code: string,
   *   message: string}>}>}
   */
  async subscribe({ channels, withPresence = false }) {
    const added = channels.filter((channel) => !this.channels.has(channel));
    for (const channel of channels) this.channels.set(channel, withPresence); // positions count from now
    let reply;
    try {
      reply = await this._request("subscribe", { channels, withPresence });
    } catch (err) {
      for (const channel of added) this.channels.delete(channel);
      throw err;
    }
    for (const channel of Object.keys(reply.refused ?? {})) {
      if (added.includes(channel)) this.channels.delete(channel);
    }
    this._sawPositions(reply);
    return reply;
  }

  /**
   * Leaves channels.
   * @param {{channels: string[]}} request
   * @returns {Promise<{ok: true, channels: string[]}>}
   */
  async unsubscribe({ channels }) {
    for (const channel of channels) {
      this.channels.delete(channel);
      this.positions.delete(channel);
    }
    return this._request("unsubscribe", { channels });
  }

  /**
   * Sends a message through the channel's functions to its subscribers.
   * `idempotencyKey` makes a retry safe: the same key on the same channel within the
   * server's window (120 s) is answered with the first ack plus `duplicate: true` and is
   * not delivered again.
   * @param {{channel: string, message: any, idempotencyKey?: string}} request
   * @returns {Promise<{ok: true, id: string, seq: number, ts: number, delivered: boolean,
   *   filteredBy?: string, offset?: number, epoch?: string, duplicate?: true}>}
   *   `delivered: false` when a filter function dropped it; `offset`/`epoch` on history channels.
   */
  publish({ channel, message, idempotencyKey }) {
    const cipher = this._ciphers.size ? this.cipherFor(channel) : null;
    if (cipher) return this._publishSealed(cipher, { channel, message, idempotencyKey });
    return this._request("publish", idempotencyKey === undefined
      ? { channel, message } : { channel, message, idempotencyKey });
  }

  /**
   * Makes `pattern` (a channel name, or a glob with `*`, `?`, `[...]`) end-to-end
   * encrypted on this client, or plain again with `entry` null. `entry`: `{kid = "k1", key,
   * getKey}`; publishes are sealed under `kid` with `key` (or `getKey(channel, kid)`);
   * received envelopes are opened by their own kid: `key` when it is `kid`, else
   * `getKey(channel, kid)` (sync or async; null when there is no such key; asked once per
   * channel and kid). A key is a CryptoKey (AES-GCM), 32 bytes (Uint8Array or
   * ArrayBuffer) or their base64url text. An exact name wins over globs, then the first
   * glob set wins. Replacing an entry forgets the keys its predecessor imported.
   */
  setCipher(pattern, entry) {
    if (typeof pattern !== "string" || !pattern) throw new TypeError("cipher: a channel name or glob");
    this._ciphers.delete(pattern);
    if (entry !== null && entry !== undefined) this._ciphers.set(pattern, new ChannelCipher(pattern, entry));
    this._globs = [...this._ciphers].filter(([name]) => /[*?[]/.test(name))
      .map(([name, cipher]) => [globRegExp(name), cipher]);
  }

  /** The cipher entry for `channel` (its exact name, else the first glob), or null. */
  cipherFor(channel) {
    if (typeof channel !== "string") return null;
    const exact = this._ciphers.get(channel);
    if (exact) return exact;
    for (const [glob, cipher] of this._globs) if (glob.test(channel)) return cipher;
    return null;
  }

  /**
   * Reads a history channel's kept messages (as they were delivered), oldest first, or
   * newest first with `reverse`; `since` an offset: only those after it.
   * @param {{channel: string, limit?: number, since?: number, reverse?: boolean}} request
   * @returns {Promise<{ok: true, channel: string, publications: object[], offset: number,
   *   epoch: string}>} `offset`/`epoch`: the channel's position now.
   */
  history({ channel, limit, since, reverse }) {
    const request = { channel };
    if (limit !== undefined) request.limit = limit;
    if (since !== undefined) request.since = since;
    if (reverse !== undefined) request.reverse = reverse;
    const reply = this._request("history", request);
    const cipher = this._ciphers.size ? this.cipherFor(channel) : null;
    if (!cipher) return reply;
    // opened like messages: what does not open is an error event and is left out
    return reply.then(async (found) => {
      if (!Array.isArray(found.publications)) return found;
      const opened = await Promise.all(found.publications.map((m) => this._open(cipher, m)));
      const publications = [];
      opened.forEach(([message, reason], i) => {
        if (message) publications.push(message);
        else this._decryptFailed(found.publications[i], reason);
      });
      return { ...found, publications };
    });
  }

  /**
   * Who is subscribed to a channel now, on every node (not only those that asked for
   * presence events); on a channel whose rule says `"presence": "count"`, only the count.
   * @param {{channel: string}} request
   * @returns {Promise<{ok: true, channel: string, count: number,
   *   clients?: {uuid: string}[]}>} one entry per connection (a user in two tabs: twice)
   */
  presence({ channel }) {
    return this._request("presence", { channel });
  }

  /** Closes the connection for good; no more reconnects. */
  stop() {
    this._stopped = true;
    clearTimeout(this._retryTimer);
    this.socket.disconnect();
  }

  /** Seals `message` for its channel and publishes the envelope. */
  async _publishSealed(cipher, { channel, message, idempotencyKey }) {
    let envelope;
    try {
      const key = await cipher.keyFor(channel, cipher.kid);
      if (key === null) throw new DecryptError(`publish: no key for '${channel}' (kid '${cipher.kid}')`, "no_key");
      envelope = await encryptMessage(message, key, { appName: this.appName, channel, kid: cipher.kid });
    } catch (err) {
      throw new EchoError({ code: err instanceof DecryptError ? err.code : "bad_request", message: err.message });
    }
    return this._request("publish", idempotencyKey === undefined
      ? { channel, message: envelope } : { channel, message: envelope, idempotencyKey });
  }

  /** Resolves `[message with its plaintext and encrypted: true, null]`, or `[null, reason]`
   *  when its envelope does not open. Never rejects. */
  async _open(cipher, message) {
    const channel = message?.channel;
    try {
      const plaintext = await decryptMessage(message?.message, (kid) => cipher.keyFor(channel, kid),
        { appName: this.appName, channel });
      return [{ ...message, message: plaintext, encrypted: true }, null];
    } catch (err) {
      return [null, err?.message ?? String(err)];
    }
  }

  /** Opens a message after the ones before it on its channel, then emits it (or the error). */
  _openInOrder(cipher, message) {
    const channel = message.channel;
    const opening = this._open(cipher, message);
    const before = this._opening.get(channel) ?? Promise.resolve();
    const done = before.then(() => opening).then(([opened, reason]) => {
      if (opened) this._emit("message", opened);
      else this._decryptFailed(message, reason);
    }).catch((err) => console.error("Echo: opening a message failed", err))
      .finally(() => { if (this._opening.get(channel) === done) this._opening.delete(channel); });
    this._opening.set(channel, done);
  }

  _decryptFailed(message, reason) {
    this._emit("error", { code: "decrypt_failed", channel: message?.channel, id: message?.id,
      message: reason ?? "could not decrypt" });
  }

  /** Emits `event` and settles with its ack. */
  _request(event, data) {
    return new Promise((resolve, reject) => {
      this.socket.timeout(ACK_TIMEOUT_MS).emit(event, data, (timedOut, reply) => {
        if (timedOut) {
          reject(new EchoError({ code: "timeout", message: `${event}: no answer within ${ACK_TIMEOUT_MS} ms` }));
        } else if (reply && reply.ok) {
          resolve(reply);
        } else {
          reject(new EchoError(reply?.error ?? { code: "bad_reply", message: `${event}: unexpected ack ${JSON.stringify(reply)}` }));
        }
      });
    });
  }

  /** Connects again after a refusal, waiting 0.5 s, 1 s, 2 s... up to 5 s (±50%). */
  _connectLater() {
    const delay = Math.min(5000, 500 * 2 ** this._refusals++) * (0.5 + Math.random());
    clearTimeout(this._retryTimer);
    this._retryTimer = setTimeout(() => {
      if (!this._stopped && !this.socket.connected) {
        this._emit("state", { state: "connecting" });
        this.socket.connect();
      }
    }, delay);
  }

  /**
   * Remembers a history channel's position from a message (the later one wins); false for
   * a message already seen (same epoch, offset not above the last one), which is dropped.
   */
  _saw(channel, { offset, epoch } = {}) {
    if (typeof channel !== "string" || !Number.isInteger(offset) || typeof epoch !== "string") return true;
    if (!this.channels.has(channel)) return true;
    const known = this.positions.get(channel);
    if (known && known.epoch === epoch && known.offset >= offset) return false;
    this.positions.set(channel, { offset, epoch });
    return true;
  }

  /** Remembers the positions a subscribe ack gives (the channels' positions when joined). */
  _sawPositions(reply) {
    for (const [channel, position] of Object.entries(reply?.positions ?? {})) {
      const known = this.positions.get(channel);
      const stale = known && known.epoch === position.epoch && known.offset > position.offset;
      if (!stale) this.positions.set(channel, position);
    }
  }

  /**
   * After a reconnect the server has forgotten our rooms: join them again, from the last
   * positions seen, so what was published meanwhile arrives first. Resolves with
   * `{channel: recovered}` for the channels that had a position.
   */
  async _resubscribe() {
    const requests = [];
    const recovered = {};
    for (const withPresence of [false, true]) {
      const channels = [...this.channels].filter(([, p]) => p === withPresence).map(([c]) => c);
      for (let i = 0; i < channels.length; i += 100) { // the server takes 100 names per request
        const batch = channels.slice(i, i + 100);
        const since = {};
        for (const channel of batch) {
          if (this.positions.has(channel)) since[channel] = this.positions.get(channel);
        }
        const request = Object.keys(since).length
          ? { channels: batch, withPresence, since } : { channels: batch, withPresence };
        requests.push(this._request("subscribe", request)
          .then((reply) => {
            for (const channel of Object.keys(reply.recovered ?? {})) {
              // not recovered: live from the ack's position, unless a newer one came meanwhile
              if (!reply.recovered[channel] && this.positions.get(channel) === since[channel]) {
                this.positions.delete(channel);
              }
            }
            this._sawPositions(reply);
            Object.assign(recovered, reply.recovered ?? {});
          })
          .catch((err) => this._emit("error", { code: err.code, message: `re-subscribe failed: ${err.message}` })));
      }
    }
    await Promise.all(requests);
    return recovered;
  }

  _emit(event, payload) {
    if (event === "state") this.state = payload.state;
    for (const listener of [...this._listeners]) {
      try {
        listener[event]?.(payload);
      } catch (err) {
        console.error(`Echo: ${event} listener threw`, err);
      }
    }
  }
}
