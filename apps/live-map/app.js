// Echo live map: everyone publishes positions on one channel; two functions on the server
// filter them (too far from the centre: dropped) and enrich them (distance, direction,
// nearest place) before anyone receives them. See associations.json, app "live-map".

const APP = "live-map";
const CHANNEL = "positions";
const CENTER = { lat: 52.3731, lon: 4.8926 }; // Dam Square: the centre demo-nearby-filter uses
const RADIUS_KM = 2; // demo-nearby-filter's RADIUS_KM, drawn as the dashed circle

// Drawn on the map (the table demo-enrich-distance names places from)...
const PLACES = [
  ["Dam Square", 52.3731, 4.8926], ["Amsterdam Centraal", 52.3791, 4.9003],
  ["Anne Frank House", 52.3752, 4.8840], ["Noordermarkt", 52.3795, 4.8860],
  ["Rembrandtplein", 52.3663, 4.8966], ["Waterlooplein", 52.3676, 4.9020],
  ["Leidseplein", 52.3641, 4.8828], ["NEMO Science Museum", 52.3738, 4.9123],
  ["A'DAM Tower", 52.3840, 4.9020], ["Rijksmuseum", 52.3600, 4.8852],
  ["Heineken Experience", 52.3578, 4.8918], ["Artis zoo", 52.3663, 4.9166],
  ["Vondelpark", 52.3580, 4.8686], ["Oosterpark", 52.3603, 4.9200],
];
// ...and a few places off the map, to jump to.
const FAR_PLACES = [
  ["Sloterplas", 52.3660, 4.8090], ["Zaandam", 52.4389, 4.8258], ["Schiphol airport", 52.3105, 4.7683],
];

// The map: an equirectangular projection around CENTER, SCALE px per km.
const WIDTH = 700;
const HEIGHT = 500;
const SCALE = 100;
const KM_PER_DEG_LAT = 111.32;
const KM_PER_DEG_LON = KM_PER_DEG_LAT * Math.cos((CENTER.lat * Math.PI) / 180);
const toXY = ({ lat, lon }) => ({
  x: WIDTH / 2 + (lon - CENTER.lon) * KM_PER_DEG_LON * SCALE,
  y: HEIGHT / 2 - (lat - CENTER.lat) * KM_PER_DEG_LAT * SCALE,
});
const toLatLon = ({ x, y }) => ({
  lat: +(CENTER.lat - (y - HEIGHT / 2) / SCALE / KM_PER_DEG_LAT).toFixed(5),
  lon: +(CENTER.lon + (x - WIDTH / 2) / SCALE / KM_PER_DEG_LON).toFixed(5),
});

const AVATARS = [["🦊", "Fox"], ["🐼", "Panda"], ["🐸", "Frog"], ["🦉", "Owl"], ["🐙", "Octopus"],
  ["🦄", "Unicorn"], ["🐢", "Turtle"], ["🐝", "Bee"]];
const STORAGE_KEY = "echo-live-map";
const SVG = "http://www.w3.org/2000/svg";

const $ = (selector) => document.querySelector(selector);

/** Who this tab is ({uuid, name, avatar}): in sessionStorage, so each tab is its own person. */
const session = JSON.parse(sessionStorage.getItem(STORAGE_KEY) || "{}");
if (!session.avatar) [session.avatar, session.name] = AVATARS[Math.floor(Math.random() * AVATARS.length)];
const save = () => sessionStorage.setItem(STORAGE_KEY, JSON.stringify(session));
save();

let echo = null;
/** uuid -> the last position message from that person (enriched by the server). */
const people = new Map();

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function svg(tag, attributes = {}, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, value);
  if (text !== undefined) node.textContent = text;
  return node;
}

function drawMap() {
  const map = $("#map");
  map.setAttribute("viewBox", `0 0 ${WIDTH} ${HEIGHT}`);
  const grid = svg("g", { class: "grid" });
  for (let x = WIDTH / 2 % SCALE; x < WIDTH; x += SCALE) grid.append(svg("line", { x1: x, y1: 0, x2: x, y2: HEIGHT }));
  for (let y = HEIGHT / 2 % SCALE; y < HEIGHT; y += SCALE) grid.append(svg("line", { x1: 0, y1: y, x2: WIDTH, y2: y }));
  grid.append(svg("text", { x: WIDTH - 8, y: HEIGHT - 8, "text-anchor": "end" }, "grid: 1 km"));
  const center = toXY(CENTER);
  const area = svg("g", { class: "area" });
  area.append(svg("circle", { cx: center.x, cy: center.y, r: RADIUS_KM * SCALE }));
  area.append(svg("text", { x: center.x, y: center.y - RADIUS_KM * SCALE - 8, "text-anchor": "middle" },
    `${RADIUS_KM} km: farther is dropped`));
  const places = svg("g", { class: "places" });
  for (const [name, lat, lon] of PLACES) {
    const { x, y } = toXY({ lat, lon });
    const place = svg("g", { class: name === "Dam Square" ? "place center" : "place" });
    place.append(svg("circle", { cx: x, cy: y, r: name === "Dam Square" ? 5 : 3 }),
      svg("text", { x: x + 7, y: y + 4 }, name));
    places.append(place);
  }
  map.append(grid, area, places, svg("g", { id: "ghosts" }), svg("g", { id: "markers" }));
  map.addEventListener("click", (event) => {
    const point = new DOMPoint(event.clientX, event.clientY).matrixTransform(map.getScreenCTM().inverse());
    share(toLatLon(point));
  });
}

function buildPlaces() {
  const select = $("#place");
  for (const [name, lat, lon] of [...PLACES, ...FAR_PLACES]) {
    const option = el("option", "", name);
    option.value = JSON.stringify({ lat, lon });
    select.append(option);
  }
}

/** "0.63 km W of Dam Square, near Anne Frank House": the fields demo-enrich-distance added. */
function describe(message) {
  if (typeof message.distanceKm !== "number") return "position not enriched";
  const near = message.near?.name ? `, near ${message.near.name}` : "";
  return `${message.distanceKm.toFixed(2)} km ${message.compass} of Dam Square${near}`;
}

function showPerson({ message, uuid }) {
  if (!message || typeof message !== "object" || typeof message.lat !== "number") return;
  people.set(uuid, message);
  const mine = uuid === session.uuid;
  const { x, y } = toXY(message);

  let marker = document.querySelector(`#markers .marker[data-uuid="${CSS.escape(uuid)}"]`);
  if (!marker) {
    marker = svg("g", { class: mine ? "marker mine" : "marker", "data-uuid": uuid });
    marker.append(svg("circle", { r: 15 }), svg("text", { class: "face", y: 6 }),
      svg("text", { class: "label", y: 30 }), svg("title"));
    $("#markers").append(marker);
  }
  marker.style.transform = `translate(${x}px, ${y}px)`;
  marker.querySelector(".face").textContent = message.avatar || "📍";
  marker.querySelector(".label").textContent = message.name || "someone";
  marker.querySelector("title").textContent = `${message.name}: ${describe(message)}`;
  if (mine) $("#markers").append(marker); // your own marker on top

  let item = document.querySelector(`#people li[data-uuid="${CSS.escape(uuid)}"]`);
  if (!item) {
    item = el("li", "person");
    item.dataset.uuid = uuid;
    item.append(el("span", "avatar"), el("span", "who"), el("span", "where"));
    $("#people").append(item);
  }
  item.dataset.mine = String(mine);
  item.querySelector(".avatar").textContent = message.avatar || "📍";
  item.querySelector(".who").textContent = (message.name || "someone") + (mine ? " (you)" : "");
  item.querySelector(".where").textContent = describe(message);
}

function removePerson(uuid) {
  people.delete(uuid);
  document.querySelector(`#markers .marker[data-uuid="${CSS.escape(uuid)}"]`)?.remove();
  document.querySelector(`#people li[data-uuid="${CSS.escape(uuid)}"]`)?.remove();
}

/** A line in "What happened to yours": kind "delivered", "filtered" or "error". */
function log(kind, text) {
  const item = el("li", `entry entry-${kind}`);
  item.dataset.kind = kind;
  const icon = { delivered: "📍", filtered: "🚫", error: "⚠️" }[kind];
  item.append(el("span", "icon", icon), el("span", "text", text));
  $("#log").prepend(item);
  while ($("#log").children.length > 30) $("#log").lastElementChild.remove();
}

/** Where your dropped position was: an ✕ only you see, fading out. */
function ghost(position) {
  const { x, y } = toXY(position);
  const mark = svg("g", { class: "ghost", transform: `translate(${x} ${y})` });
  mark.append(svg("path", { d: "M-7-7L7 7M7-7L-7 7" }));
  $("#ghosts").append(mark);
  setTimeout(() => mark.remove(), 4000);
}

async function share(position, label) {
  const message = { ...position, name: session.name, avatar: session.avatar };
  const where = label || `${position.lat.toFixed(4)}, ${position.lon.toFixed(4)}`;
  if (!echo) {
    log("error", "Not connected to Echo; your position was not sent.");
    return;
  }
  try {
    const ack = await echo.publish({ channel: CHANNEL, message });
    if (ack.delivered === false) {
      if (typeof position.lat === "number") ghost(position);
      log("filtered", `${where} was dropped by ${ack.filteredBy || "a filter"}: nobody else sees it.`);
    } else {
      const enriched = people.get(session.uuid);
      log("delivered", `${where}: everyone sees ${enriched ? describe(enriched) : "you"}.`);
    }
  } catch (err) {
    log("error", `${err.code || "error"}: ${err.message}`);
  }
}

function setStatus(state, text) {
  const status = $("#status");
  status.dataset.state = state;
  status.textContent = text;
}

function showFatal(text) {
  $("#fatal").textContent = text;
  $("#fatal").hidden = false;
}

async function connect() {
  let Echo;
  let token;
  try {
    ({ Echo } = await import("/client/echo.js"));
    const response = await fetch(`/dev/token?app=${APP}`);
    if (!response.ok) throw new Error(`/dev/token answered ${response.status}`);
    token = await response.json();
  } catch (err) {
    setStatus("error", "offline");
    showFatal(`Could not load the Echo client or a dev token (${err.message}). ` +
      "Start the server with ./scripts/dev and open this page from it.");
    return;
  }
  echo = new Echo({ host: location.origin, appName: token.appName, jwt: token.jwt, uuid: session.uuid });
  session.uuid = echo.uuid;
  save();
  let subscribed = false;
  echo.addListener({
    message: (message) => { if (message.channel === CHANNEL) showPerson(message); },
    // someone closed their page: take them off the map
    presence: ({ eventName, uuid }) => { if (eventName === "left") removePerson(uuid); },
    error: (err) => { if (err.code !== "server_shutdown") log("error", `${err.code}: ${err.message}`); },
    state: ({ state, message, retrying }) => {
      if (state === "connected") setStatus(subscribed ? "live" : "connected", subscribed ? "live" : "connected");
      else if (state === "connecting") setStatus("connecting", "connecting…");
      else if (state === "disconnected" || retrying) setStatus("disconnected", "offline, reconnecting…");
      else {
        setStatus("error", message || "error");
        showFatal(`Echo refused the connection: ${message}`);
      }
    },
  });
  try {
    await echo.subscribe({ channels: [CHANNEL], withPresence: true });
    subscribed = true;
    setStatus("live", "live");
  } catch (err) {
    if ($("#status").dataset.state === "error") return;
    setStatus("error", "not subscribed");
    showFatal(`Could not join #${CHANNEL} (${err.code}): ${err.message}`);
  }
}

drawMap();
buildPlaces();
$("#avatar").textContent = session.avatar;
$("#name").value = session.name;
$("#name").addEventListener("input", () => {
  session.name = $("#name").value.trim() || "someone";
  save();
});
$("#jump").addEventListener("submit", (event) => {
  event.preventDefault();
  const select = $("#place");
  share(JSON.parse(select.value), select.selectedOptions[0].textContent);
});
$("#broken").addEventListener("click", () => share({ lat: "north-ish", lon: null }, "“north-ish”"));
connect();
