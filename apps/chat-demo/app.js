// Echo chat demo: one chat per channel; the server's functions rewrite messages in transit.
// The channels and their functions are set in the project's associations.json.
// #secret is end-to-end encrypted ("encrypted": true there): its key is derived in this
// browser from a passphrase the people share, and the server relays ciphertext only.

const CHANNELS = [
  { name: "boring", functions: [], about: "No functions: messages arrive exactly as sent." },
  { name: "angry", functions: ["demo-angry"], about: "Shouts every message." },
  { name: "backwards", functions: ["demo-backwards"], about: "Reverses the text." },
  { name: "robot", functions: ["demo-robot"], about: "Speaks binary, 8 bits per byte." },
  { name: "emoji", functions: ["demo-angry", "demo-emojify"], about: "Two functions in a row: shout, then add angry faces." },
  { name: "polite", functions: ["demo-filter-shouting", "demo-capitalize"], about: "Drops messages typed in ALL CAPS, capitalizes the rest." },
  { name: "secret", functions: [], encrypted: true, about: "End-to-end encrypted: the key comes from the passphrase you share, derived in this browser; the server relays ciphertext it cannot read." },
];
const SECRET_KID = "p1"; // one key id: a passphrase is the key, and a wrong one does not open
const LOCKED = "could not decrypt (wrong passphrase?)";
const NO_KEY = "encrypted message: type the passphrase to read it";
const STORAGE_KEY = "echo-chat-demo";
const TAG_MARK = " · "; // a uuid is "🦊 Ada · 3f2a": what others' online lists show, and a tag

const $ = (selector) => document.querySelector(selector);
const panel = (channel) => $(`.messages[data-channel="${channel}"]`);
const tab = (channel) => $(`.tab[data-channel="${channel}"]`);

/** Who this tab is ({uuid, tag, name, avatar, active}): in sessionStorage, so each tab is its own person. */
const session = JSON.parse(sessionStorage.getItem(STORAGE_KEY) || "{}");
session.active = CHANNELS.some((c) => c.name === session.active) ? session.active : "boring";
const save = () => sessionStorage.setItem(STORAGE_KEY, JSON.stringify(session));
save();

let echo = null;
let e2e = null; // the client module, for keyFromPassphrase
/** channel -> its key (a CryptoKey from the passphrase), for the encrypted channels */
const keys = new Map();
/** The cipher option of an encrypted channel: its key once a passphrase was typed. A new
 *  passphrase sets a new entry, so the client forgets the key it had imported. */
const cipherOf = (channel) => ({ kid: SECRET_KID, getKey: () => keys.get(channel) ?? null });
const isEncrypted = (channel) => CHANNELS.some((c) => c.name === channel && c.encrypted);
/** channel -> the uuids subscribed to it now, on every node (from the presence request) */
const online = new Map();
const refreshing = new Map(); // channel -> pending refresh timer

/** The uuid others see: avatar and name, and a random tag so two Adas are two people. */
function uuidOf(name, avatar) {
  session.tag ||= Math.random().toString(16).slice(2, 6);
  return `${avatar} ${name}${TAG_MARK}${session.tag}`;
}

/** How a uuid is shown in the online list: the name part of a chat uuid, else the uuid. */
const shownName = (uuid) => String(uuid).split(TAG_MARK)[0].slice(0, 60);

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function buildChannels() {
  for (const { name } of CHANNELS) {
    const button = el("button", "tab");
    Object.assign(button, { type: "button", id: `tab-${name}` });
    button.dataset.channel = name;
    button.setAttribute("role", "tab");
    button.append(el("span", "tab-name", `#${name}`), el("span", "badge"));
    button.addEventListener("click", () => selectChannel(name));
    $("#tabs").append(button);

    const list = el("ul", "messages");
    list.dataset.channel = name;
    list.dataset.empty = `Nothing on #${name} yet. Say something!`;
    list.setAttribute("role", "tabpanel");
    list.setAttribute("aria-labelledby", button.id);
    $("#panels").append(list);
  }
}

function selectChannel(name) {
  session.active = name;
  save();
  for (const { name: other } of CHANNELS) {
    const selected = other === name;
    tab(other).setAttribute("aria-selected", String(selected));
    panel(other).hidden = !selected;
  }
  const badge = tab(name).querySelector(".badge");
  badge.textContent = "";
  const { functions, about } = CHANNELS.find((c) => c.name === name);
  const info = $("#channel-info");
  info.replaceChildren(el("span", "", about + " "));
  for (const fn of functions) info.append(el("code", "fn", fn));
  showPassphrase(name);
  showOnline();
  scrollDown(panel(name), true);
  if (isEncrypted(name) && !keys.has(name)) $("#passphrase").focus();
  else $("#message").focus();
}

/** The passphrase line, under the channel's description, on encrypted channels only. */
function showPassphrase(channel) {
  const form = $("#passphrase-form");
  form.hidden = !isEncrypted(channel);
  form.dataset.channel = channel;
  const state = keys.has(channel) ? "unlocked" : form.dataset.state === "deriving" ? "deriving" : "locked";
  setPassphraseState(state);
}

function setPassphraseState(state, text) {
  const form = $("#passphrase-form");
  form.dataset.state = state;
  $("#passphrase-state").textContent = text ?? {
    locked: "Locked: type the passphrase you share with the others.",
    deriving: "Deriving the key…",
    unlocked: "🔑 Unlocked: the key was derived in this browser; the server never sees it.",
  }[state];
}

/** Derives the channel's key from the passphrase (PBKDF2, 600,000 rounds: a moment). */
async function unlock(event) {
  event.preventDefault();
  const channel = $("#passphrase-form").dataset.channel;
  const input = $("#passphrase");
  const passphrase = input.value;
  if (!passphrase || !isEncrypted(channel)) return;
  setPassphraseState("deriving");
  try {
    e2e ??= await import("/client/echo.js");
    const key = await e2e.keyFromPassphrase(passphrase, "chat-demo", channel);
    keys.set(channel, key);
    echo?.setCipher(channel, cipherOf(channel)); // forget the key of an earlier passphrase
    input.value = "";
    setPassphraseState("unlocked");
    $("#message").focus();
  } catch (err) {
    setPassphraseState(keys.has(channel) ? "unlocked" : "locked", `Could not derive a key: ${err.message}`);
  }
}

/** The active channel's online list: everyone subscribed to it now, this tab first. */
function showOnline() {
  const here = [...(online.get(session.active) ?? [])];
  here.sort((a, b) => (b === session.uuid) - (a === session.uuid) || shownName(a).localeCompare(shownName(b)));
  const list = $("#online");
  list.replaceChildren(el("span", "online-label", `Online on #${session.active} (${here.length}):`));
  for (const uuid of here) {
    const person = el("span", "online-person", shownName(uuid) + (uuid === session.uuid ? " (you)" : ""));
    person.dataset.uuid = uuid;
    list.append(person);
  }
}

/** Asks the server who is on `channel` now. Presence events only trigger it: the answer is
 *  the cluster's own list, so joins and leaves heard in any order never leave a ghost. */
function refreshOnline(channel, delay = 100) {
  clearTimeout(refreshing.get(channel));
  refreshing.set(channel, setTimeout(async () => {
    refreshing.delete(channel);
    try {
      const { clients = [] } = await echo.presence({ channel });
      online.set(channel, new Set(clients.map((c) => c.uuid)));
      if (channel === session.active) showOnline();
    } catch {
      // offline: asked again on reconnect
    }
  }, delay));
}

function scrollDown(list, force = false) {
  const nearBottom = list.scrollHeight - list.scrollTop - list.clientHeight < 80;
  if (force || nearBottom) list.scrollTop = list.scrollHeight;
}

function append(channel, item) {
  const list = panel(channel);
  if (!list) return;
  list.append(item);
  scrollDown(list, item.dataset.mine === "true");
  if (channel !== session.active) {
    const badge = tab(channel).querySelector(".badge");
    badge.textContent = String(Number(badge.textContent || 0) + 1);
  }
}

/** A delivered message: `{channel, message: {text, name, avatar}, uuid, id, seq, ts}`
 *  (and `encrypted: true` when the client opened it). */
function showMessage({ channel, message, uuid, id, ts, encrypted }) {
  const body = typeof message === "object" && message !== null ? message : { text: message };
  const text = typeof body.text === "string" ? body.text : JSON.stringify(body.text ?? message);
  const item = el("li", "message");
  Object.assign(item.dataset, { id: id ?? "", uuid: uuid ?? "", mine: String(uuid === session.uuid) });
  const meta = el("div", "message-meta");
  meta.append(el("span", "message-name", String(body.name || "someone")));
  if (encrypted) meta.append(Object.assign(el("span", "message-lock", "🔒"), { title: "end-to-end encrypted" }));
  const time = el("time", "message-time", new Date(ts || Date.now()).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" }));
  meta.append(time);
  const bubble = el("div", "message-body");
  bubble.append(meta, el("p", "message-text", text));
  item.append(el("span", "message-avatar", String(body.avatar || "👤")), bubble);
  append(channel, item);
}

const ICONS = { error: "⚠️", filtered: "🚫", locked: "🔒" };

/** A line from the app itself: kind "filtered", "error" or "locked" (a message that did
 *  not decrypt: `id` is its id). */
function showNotice(channel, kind, text, id) {
  const item = el("li", `notice notice-${kind}`);
  item.dataset.kind = kind;
  item.dataset.mine = String(kind !== "locked");
  if (id) item.dataset.id = id;
  item.append(el("span", "notice-icon", ICONS[kind]), el("span", "notice-text", text));
  append(channel, item);
}

function setStatus(state, text) {
  const status = $("#status");
  status.dataset.state = state;
  status.textContent = text;
  status.title = text;
}

function showFatal(text) {
  const fatal = $("#fatal");
  fatal.textContent = text;
  fatal.hidden = false;
}

function showJoin() {
  $("#chat").hidden = true;
  $("#join").hidden = false;
  $("#name").value = session.name || "";
  const chosen = document.querySelector(`input[name=avatar][value="${session.avatar}"]`);
  if (chosen) chosen.checked = true;
  $("#name").focus();
}

function showChat() {
  $("#join").hidden = true;
  $("#chat").hidden = false;
  $("#me").textContent = `${session.avatar} ${session.name}`;
  selectChannel(session.active);
}

const quote = (text) => (text.length > 60 ? `“${text.slice(0, 57)}…”` : `“${text}”`);

async function send(event) {
  event.preventDefault();
  const input = $("#message");
  const text = input.value.trim();
  const channel = session.active;
  if (!text) return;
  if (isEncrypted(channel) && !keys.has(channel)) {
    showNotice(channel, "error", `Type the passphrase first: messages on #${channel} are encrypted in this browser.`);
    $("#passphrase").focus();
    return;
  }
  if (!echo) {
    showNotice(channel, "error", "Not connected to Echo; the message was not sent.");
    return;
  }
  input.value = "";
  try {
    const ack = await echo.publish({ channel, message: { text, name: session.name, avatar: session.avatar } });
    if (ack.delivered === false) {
      showNotice(channel, "filtered", `Your message ${quote(text)} was dropped by ${ack.filteredBy || "a filter"}.`);
    }
  } catch (err) {
    showNotice(channel, "error", `Not delivered (${err.code || "error"}): ${err.message}`);
  }
}

async function connect() {
  let token;
  let Echo;
  try {
    e2e = await import("/client/echo.js");
    ({ Echo } = e2e);
    const response = await fetch("/dev/token?app=chat-demo");
    if (!response.ok) throw new Error(`/dev/token answered ${response.status}`);
    token = await response.json();
  } catch (err) {
    setStatus("error", "offline");
    showFatal(`Could not load the Echo client or a dev token (${err.message}). ` +
      "Start the server with ./scripts/dev and open this page from it.");
    return;
  }
  let subscribed = false;
  const cipher = Object.fromEntries(CHANNELS.filter((c) => c.encrypted).map((c) => [c.name, cipherOf(c.name)]));
  echo = new Echo({ host: location.origin, appName: token.appName, jwt: token.jwt, uuid: session.uuid, cipher });
  echo.addListener({
    message: showMessage,
    presence: ({ channel }) => refreshOnline(channel),
    error: (err) => {
      // a message on an encrypted channel that this tab's key does not open (or no key yet)
      if (err.code === "decrypt_failed") showNotice(err.channel, "locked", keys.has(err.channel) ? LOCKED : NO_KEY, err.id);
      // the node is going away: the status line shows the reconnect, no need for a notice
      else if (err.code !== "server_shutdown") showNotice(session.active, "error", `${err.code}: ${err.message}`);
    },
    state: ({ state, message, retrying }) => {
      if (state === "connected") {
        setStatus(subscribed ? "live" : "connected", subscribed ? "live" : "connected");
        if (subscribed) for (const { name } of CHANNELS) refreshOnline(name, 0); // back in the channels
      }
      else if (state === "connecting") setStatus("connecting", "connecting…");
      else if (state === "disconnected" || retrying) setStatus("disconnected", "offline, reconnecting…");
      else {
        setStatus("error", message || "error");
        showFatal(`Echo refused the connection: ${message}`);
      }
    },
  });
  try {
    await echo.subscribe({ channels: CHANNELS.map((c) => c.name), withPresence: true });
    subscribed = true;
    for (const { name } of CHANNELS) refreshOnline(name, 0);
    setStatus("live", "live");
  } catch (err) {
    if ($("#status").dataset.state === "error") return; // refused: already explained
    setStatus("error", "not subscribed");
    showFatal(`Could not join the channels (${err.code}): ${err.message}`);
  }
}

buildChannels();
$("#join-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const name = $("#name").value.trim();
  if (!name) return;
  session.name = name;
  session.avatar = new FormData(event.target).get("avatar") || "🦊";
  const uuid = uuidOf(session.name, session.avatar);
  const renamed = echo !== null && uuid !== session.uuid;
  session.uuid = uuid;
  save();
  if (renamed) {
    location.reload(); // a new name is a new uuid: connect again under it
    return;
  }
  showChat();
  if (!echo) connect();
});
$("#me").addEventListener("click", showJoin);
$("#composer").addEventListener("submit", send);
$("#passphrase-form").addEventListener("submit", unlock);
if (session.name) {
  session.uuid = uuidOf(session.name, session.avatar);
  save();
  showChat();
  connect();
} else showJoin();
