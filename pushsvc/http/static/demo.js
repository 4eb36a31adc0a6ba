// The demo chat page: every text from the network is set with textContent (no HTML parsing).
import { PushClient } from "/client/pushsvc.js";

const $ = (id) => document.getElementById(id);
const wsUrl = `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/ws`;
let client = null;
let room = null;
const members = new Map(); // room -> Set of users

// A token may come in the fragment (#token=...): never sent to the server, not logged.
const fragment = new URLSearchParams(location.hash.slice(1));
if (fragment.get("token")) {
  $("token").value = fragment.get("token");
  history.replaceState(null, "", location.pathname + location.search);
}

function line(parts, system = false) {
  const item = document.createElement("li");
  if (system) item.className = "system";
  for (const [text, cls] of parts) {
    const span = document.createElement("span");
    if (cls) span.className = cls;
    span.textContent = text;
    item.append(span);
  }
  const list = $("messages");
  list.append(item);
  while (list.children.length > 500) list.firstElementChild.remove();
  list.scrollTop = list.scrollHeight;
}

function showState(state, detail = "") {
  $("state").textContent = state;
  $("state").dataset.state = state;
  $("detail").textContent = detail;
  $("disconnect").disabled = !client || state === "closed";
}

function showMembers() {
  $("current-room").textContent = room || "-";
  const list = $("members");
  list.replaceChildren();
  for (const user of [...(members.get(room) || [])].sort()) {
    const item = document.createElement("li");
    item.textContent = user;
    list.append(item);
  }
}

function connect(token) {
  if (client) client.close();
  members.clear();
  client = new PushClient(wsUrl, { token });
  showState("connecting");
  client.on("open", (welcome) => {
    showState("open", `as ${welcome.user}`);
    if (!room) joinRoom($("room").value.trim());
  });
  client.on("close", (code, reason) => showState(client.state, `closed ${code} ${reason}`));
  client.on("reconnecting", (attempt, delay) =>
    showState("reconnecting", `attempt ${attempt} in ${(delay / 1000).toFixed(1)} s`),
  );
  client.on("error", (error) => line([[`error: ${error.message}`]], true));
  client.on("chat", (frame) => {
    const time = new Date(frame.timestamp).toLocaleTimeString();
    line([[`${time} ${frame.room}`, "meta"], [`${frame.name || frame.user}: `, "user"], [frame.text]]);
  });
  client.on("presence", (frame) => {
    if (!members.has(frame.room)) members.set(frame.room, new Set());
    const set = members.get(frame.room);
    if (frame.event === "join") set.add(frame.user);
    else set.delete(frame.user);
    line([[`${frame.user} ${frame.event === "join" ? "joined" : "left"} ${frame.room}`]], true);
    showMembers();
  });
  for (const type of ["private", "notification"]) {
    client.on(type, (frame) => {
      const text = type === "private" ? `${frame.from} (private): ${frame.text}` : `${frame.title}: ${frame.message}`;
      line([[text]]);
    });
  }
}

async function joinRoom(name) {
  if (!client || !name) return;
  if (room && room !== name) client.leave(room).catch(() => {});
  room = name;
  if (!members.has(name)) members.set(name, new Set());
  showMembers();
  try {
    await client.join(name);
    line([[`joined ${name}`]], true);
  } catch (error) {
    line([[`could not join ${name}: ${error.message}`]], true);
  }
}

$("connect").addEventListener("submit", (event) => {
  event.preventDefault();
  room = null;
  connect($("token").value.trim());
});
$("disconnect").addEventListener("click", () => client && client.close());
$("join").addEventListener("submit", (event) => {
  event.preventDefault();
  joinRoom($("room").value.trim());
});
$("chat").addEventListener("submit", async (event) => {
  event.preventDefault();
  const text = $("text").value;
  if (!client || !room || !text) return;
  $("text").value = "";
  try {
    await client.send("chat", { room, text });
  } catch (error) {
    line([[`not sent (${error.code}): ${text}`]], true);
  }
});
showState("idle");
