// The demo chat page (served at / and /demo when demo.enabled is true).
// Every string from the network or the user is rendered with textContent: never parsed as HTML.
import { PushClient } from "/client/pushsvc.js";

const $ = (id) => document.getElementById(id);
const wsUrl = `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/ws`;
const MAX_LINES = 500; // per conversation
const MAX_TOASTS = 5;

let client = null;
let me = null; // our user id (welcome.user)
let active = null; // key of the conversation shown: "#room" or "@user"
const conversations = new Map(); // key -> {kind, name, lines: [{parts, cls}], unread}
const members = new Map(); // room -> Set of user ids
const notified = new Set(); // notification ids shown (the client dedupes too; this is per page)

// -- rendering ------------------------------------------------------------------------

function el(tag, text, cls) {
  const node = document.createElement(tag);
  if (text !== undefined) node.textContent = String(text);
  if (cls) node.className = cls;
  return node;
}

function conversation(key) {
  if (!conversations.has(key)) {
    conversations.set(key, { kind: key[0] === "#" ? "room" : "dm", name: key.slice(1), lines: [], unread: 0 });
  }
  return conversations.get(key);
}

function addLine(key, parts, cls = "") {
  const conv = conversation(key);
  conv.lines.push({ parts, cls });
  if (conv.lines.length > MAX_LINES) conv.lines.shift();
  if (key === active) appendLine(conv.lines[conv.lines.length - 1]);
  else if (cls !== "system") conv.unread += 1;
  renderLists();
}

function appendLine(line) {
  const list = $("messages");
  const item = el("li", undefined, line.cls);
  for (const [text, cls] of line.parts) item.append(el("span", text, cls));
  list.append(item);
  while (list.children.length > MAX_LINES) list.firstElementChild.remove();
  list.scrollTop = list.scrollHeight;
}

function show(key) {
  active = key;
  const conv = conversation(key);
  conv.unread = 0;
  $("conv-title").textContent = conv.kind === "room" ? `#${conv.name}` : `private with ${conv.name}`;
  $("messages").replaceChildren();
  for (const line of conv.lines) appendLine(line);
  renderLists();
  $("text").focus();
}

function convButton(key, label) {
  const conv = conversation(key);
  const button = el("button", label, "conv");
  button.type = "button";
  button.dataset.key = key;
  button.setAttribute("aria-current", String(key === active));
  button.addEventListener("click", () => show(key));
  if (conv.unread) button.append(" ", el("span", conv.unread, "unread"));
  return button;
}

function renderLists() {
  const rooms = $("rooms");
  rooms.replaceChildren();
  for (const room of [...members.keys()].sort()) {
    const item = el("li");
    item.dataset.room = room;
    const leave = el("button", "×", "leave");
    leave.type = "button";
    leave.title = `leave ${room}`;
    leave.setAttribute("aria-label", `leave ${room}`);
    leave.addEventListener("click", () => leaveRoom(room));
    item.append(convButton(`#${room}`, `#${room}`), leave);
    rooms.append(item);
  }
  const dms = $("dms");
  dms.replaceChildren();
  for (const [key, conv] of conversations) {
    if (conv.kind !== "dm") continue;
    const item = el("li");
    item.dataset.user = conv.name;
    item.append(convButton(key, conv.name));
    dms.append(item);
  }
  const room = active && active[0] === "#" ? active.slice(1) : null;
  $("users-room").textContent = room ? `#${room}` : "-";
  const users = $("users");
  users.replaceChildren();
  for (const user of [...(members.get(room) || [])].sort()) {
    const item = el("li");
    item.dataset.user = user;
    const button = el("button", user === me ? `${user} (you)` : user, "conv");
    button.type = "button";
    button.title = user === me ? "you" : `private message to ${user}`;
    if (user === me) button.disabled = true;
    else button.addEventListener("click", () => show(`@${user}`));
    item.append(button);
    users.append(item);
  }
}

function showState(state, detail = "") {
  $("state").textContent = state;
  $("state").dataset.state = state;
  $("detail").textContent = detail;
  $("detail").hidden = !detail;
}

// -- notifications: the browser's, or in the page when not permitted --------------------

function toast(title, body) {
  const box = $("toasts");
  const item = el("div", undefined, "toast");
  const close = el("button", "×");
  close.type = "button";
  close.setAttribute("aria-label", "dismiss");
  close.addEventListener("click", () => item.remove());
  item.append(el("strong", title), close, el("span", body));
  box.append(item);
  while (box.children.length > MAX_TOASTS) box.firstElementChild.remove();
}

function notify(title, body, tag) {
  if ("Notification" in window && Notification.permission === "granted") {
    try {
      new Notification(title, { body, tag });
      return;
    } catch {
      // some browsers (Android Chrome) allow notifications only from a service worker
    }
  }
  toast(title, body);
}

function showNotificationButton() {
  $("enable-notifications").hidden = !("Notification" in window) || Notification.permission !== "default";
}

// Web Push (when the server has push.enabled): with notification permission, register the
// example service worker and this browser's push subscription, so that notifications
// arrive while the tab is closed (docs/webpush.md).
async function enableWebPush() {
  if (!client || !client.welcome || !client.welcome.push) return;
  if (!("serviceWorker" in navigator) || !("PushManager" in window)) return;
  if (!("Notification" in window) || Notification.permission !== "granted") return;
  try {
    const registration = await navigator.serviceWorker.register("/client/sw.js");
    await client.subscribePush(registration);
  } catch (error) {
    console.info("Web Push unavailable here:", String(error)); // e.g. no push service reachable
  }
}

// -- the connection ---------------------------------------------------------------------

function connect(token) {
  if (client) client.close();
  client = new PushClient(wsUrl, { token });
  showState("connecting");
  client.on("open", (welcome) => {
    me = welcome.user;
    $("me").textContent = me;
    $("login").hidden = true;
    $("app").hidden = false;
    $("logout").hidden = false;
    showNotificationButton();
    enableWebPush();
    showState("open");
    // The join reply lists the room's users: (re)load the lists after every (re)connect.
    const rooms = client.rooms.size ? [...client.rooms] : ["lobby"];
    for (const room of rooms) joinRoom(room, false);
  });
  client.on("close", (code, reason) => {
    showState(client.state, client.state === "closed" ? `closed ${code} ${reason}` : "");
    if (client.state === "closed" && !me) {
      $("login-error").textContent = `connection refused (${code} ${reason})`;
    }
  });
  client.on("reconnecting", (attempt, delay) =>
    showState("reconnecting", `attempt ${attempt} in ${(delay / 1000).toFixed(1)} s`),
  );
  client.on("offline", () => showState(client.state, "waiting for the network"));
  client.on("online", () => showState(client.state));
  client.on("error", (error) => {
    if (active) addLine(active, [[`error: ${error.message}`]], "system");
  });
  client.on("chat", (frame) => {
    const time = new Date(frame.timestamp).toLocaleTimeString();
    const who = frame.name || frame.user;
    addLine(`#${frame.room}`, [[time, "meta"], [who, "user"], [frame.text, "text"]], frame.user === me ? "mine" : "");
  });
  client.on("recovery", ({ room, recovered, recoveredCount, reason }) => {
    // After a reconnect: what the room said meanwhile follows this line, or was lost.
    if (recovered && recoveredCount) {
      addLine(`#${room}`, [[`${recoveredCount} message${recoveredCount === 1 ? "" : "s"} while you were away`]], "divider");
    } else if (!recovered) {
      addLine(`#${room}`, [[`messages sent while you were away could not be recovered (${reason}); new ones follow`]], "notice");
    }
  });
  client.on("presence", (frame) => {
    if (!members.has(frame.room)) return; // a room we left
    const set = members.get(frame.room);
    if (frame.event === "join") {
      if (set.has(frame.user)) return;
      set.add(frame.user);
    } else set.delete(frame.user);
    addLine(`#${frame.room}`, [[`${frame.user} ${frame.event === "join" ? "joined" : "left"}`]], "system");
  });
  client.on("private", (frame) => {
    const other = frame.from === me ? frame.to : frame.from;
    const time = new Date(frame.timestamp).toLocaleTimeString();
    addLine(`@${other}`, [[time, "meta"], [frame.from, "user"], [frame.text, "text"]], frame.from === me ? "mine" : "");
    if (document.hidden && frame.from !== me) notify(`${frame.from} (private)`, frame.text, frame.id);
  });
  client.on("notification", (frame) => {
    if (notified.has(frame.id)) return;
    notified.add(frame.id);
    notify(String(frame.title ?? ""), String(frame.message ?? ""), frame.id);
  });
}

async function joinRoom(room, select = true) {
  if (!client || !room) return;
  if (!members.has(room)) members.set(room, new Set());
  conversation(`#${room}`);
  if (select || !active) show(`#${room}`);
  else renderLists();
  try {
    const reply = await client.join(room);
    if (reply && Array.isArray(reply.users)) {
      members.set(room, new Set(reply.users));
      renderLists();
    }
  } catch (error) {
    members.delete(room);
    conversations.delete(`#${room}`);
    if (active === `#${room}`) active = null;
    const fallback = [...members.keys()][0];
    if (fallback) show(`#${fallback}`);
    else renderLists();
    toast(`could not join ${room}`, error.message);
  }
}

function leaveRoom(room) {
  if (!client) return;
  client.leave(room).catch(() => {});
  members.delete(room);
  conversations.delete(`#${room}`);
  if (active === `#${room}`) {
    active = null;
    const next = [...members.keys()].sort()[0];
    if (next) show(`#${next}`);
    else {
      $("conv-title").textContent = "-";
      $("messages").replaceChildren();
    }
  }
  renderLists();
}

async function send(text) {
  if (!client || !active) return;
  const conv = conversation(active);
  try {
    if (conv.kind === "room") {
      await client.send("chat", { room: conv.name, text });
    } else {
      await client.send("private", { to: conv.name, text });
      // the sender's other tabs are not sent a copy: show it here
      addLine(active, [[new Date().toLocaleTimeString(), "meta"], [me, "user"], [text, "text"]], "mine");
    }
  } catch (error) {
    addLine(active, [[`not sent (${error.code || error.message}): ${text}`]], "system");
  }
}

// -- the token: the URL fragment (never sent to a server), or POST /dev/token ----------

async function devToken(name) {
  const response = await fetch("/dev/token", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ name }),
    credentials: "omit",
    cache: "no-store",
  });
  if (response.status === 404) {
    throw new Error("no dev tokens here (pushsvc serve --dev only): open /demo#token=JWT instead");
  }
  const body = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(body.message || `HTTP ${response.status}`);
  return body.token;
}

$("login-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  $("login-error").textContent = "";
  try {
    connect(await devToken($("name").value.trim()));
  } catch (error) {
    $("login-error").textContent = error.message;
  }
});
$("join-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const room = $("room-input").value.trim();
  $("room-input").value = "";
  joinRoom(room);
});
// An <input> in a form submits on Enter: Enter sends.
$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("text").value;
  if (!text.trim()) return;
  $("text").value = "";
  send(text);
});
$("enable-notifications").addEventListener("click", async () => {
  await Notification.requestPermission();
  showNotificationButton();
  enableWebPush();
});
$("logout").addEventListener("click", () => {
  if (client) client.close();
  client = null;
  me = null;
  active = null;
  members.clear();
  conversations.clear();
  $("app").hidden = true;
  $("login").hidden = false;
  $("logout").hidden = true;
  $("me").textContent = "";
  $("messages").replaceChildren();
  showState("idle");
});

const fragment = new URLSearchParams(location.hash.slice(1));
const fromUrl = fragment.get("token");
if (fromUrl) {
  history.replaceState(null, "", location.pathname + location.search); // out of the address bar and history
  connect(fromUrl);
}
showState(fromUrl ? "connecting" : "idle");
