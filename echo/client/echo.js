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

export class Echo {
  /**
   * Connects at once (and reconnects by itself) to the app's namespace `host/appName`.
   * @param {{host: string, appName: string, jwt?: string, getToken?: () => string | Promise<string>,
   *   uuid?: string}} options
   *   `getToken` is asked for a token on every connect (give it instead of `jwt` when tokens
   *   expire: a reconnect then gets a fresh one). `uuid` names this client to others
   *   (messages, presence); random when absent (a token with a uuid claim fixes it).
   */
  constructor({ host, appName, jwt, getToken, uuid } = {}) {
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
      if (this._saw(message?.channel, message)) this._emit("message", message);
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
    return this._request("publish", idempotencyKey === undefined
      ? { channel, message } : { channel, message, idempotencyKey });
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
    return this._request("history", request);
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
