// Close-code policy, heartbeat, network events and the outbox against a scripted `ws` server.
import assert from "node:assert/strict";
import { createServer } from "node:net";
import { after, test } from "node:test";
import WebSocket, { WebSocketServer } from "ws";
import { CLOSE_DEAD, CLOSE_OFFLINE, PushClient, drainDelay, tokenClaims } from "../pushsvc.js";
import { freePort, next, sleep, token } from "../support/server.js";

const open = [];
after(() => {
  for (const thing of open) thing.close();
});

/** A fake /ws: sends a welcome, then runs `script(socket, count)` per connection. */
async function fake(script = () => {}, { heartbeat = 25, pong = true } = {}) {
  const port = await freePort();
  const wss = new WebSocketServer({ port, host: "127.0.0.1" });
  const state = { connections: 0, frames: [], urls: [] };
  wss.on("connection", (socket, request) => {
    state.connections += 1;
    state.urls.push(request.url);
    socket.on("message", (data) => {
      const frame = JSON.parse(String(data));
      state.frames.push(frame);
      if (frame.type === "ping" && pong) socket.send(JSON.stringify({ type: "pong" }));
      if (frame.type === "join" || frame.type === "chat") socket.send(JSON.stringify({ type: "reply", ok: true, ref: frame.ref, room: frame.room }));
    });
    socket.send(JSON.stringify({ type: "welcome", user: "u", session: "s", heartbeat, message: "hi" }));
    script(socket, state.connections);
  });
  await new Promise((r) => wss.once("listening", r));
  open.push(wss);
  return { url: `ws://127.0.0.1:${port}/ws`, state, wss };
}

function client(url, options = {}) {
  const c = new PushClient(url, { WebSocket, token: token("u"), minDelay: 20, maxDelay: 200, ...options });
  open.push(c);
  return c;
}

test("helpers: drain delay and token claims", () => {
  assert.equal(drainDelay("server draining; reconnect in 2.5s"), 2500);
  assert.equal(drainDelay("going away"), null);
  assert.equal(tokenClaims(token("zoë", { name: "Zoë" })).name, "Zoë");
  assert.equal(tokenClaims("not a token"), null);
});

test("1008 backs off at least policyDelay; 4008 and 1011 reconnect with the usual backoff", async () => {
  const server = await fake((socket, n) => {
    if (n === 1) setTimeout(() => socket.close(1008, "abuse"), 20);
    if (n === 2) setTimeout(() => socket.close(4008, "slow consumer"), 20);
    if (n === 3) setTimeout(() => socket.close(1011, "internal"), 20);
  });
  const c = client(server.url, { policyDelay: 300 });
  const delays = [];
  c.on("reconnecting", (attempt, delay) => delays.push([attempt, delay]));
  await next(c, "open");
  await next(c, "open", 3000);
  assert.ok(delays[0][1] >= 300, `1008 delay ${delays[0][1]}`);
  await next(c, "open", 3000);
  await next(c, "open", 3000);
  assert.equal(server.state.connections, 4);
  for (const [, delay] of delays.slice(1)) assert.ok(delay <= 200, `backoff ${delay} within maxDelay`);
});

test("exponential backoff with full jitter while the server is unreachable; no give-up", async () => {
  const c = client(`ws://127.0.0.1:${await freePort()}/ws`, { minDelay: 10, maxDelay: 80 });
  const seen = [];
  c.on("reconnecting", (attempt, delay) => seen.push([attempt, delay]));
  await sleep(700);
  assert.ok(seen.length >= 5, `attempts ${seen.length}`);
  seen.forEach(([attempt, delay], i) => {
    assert.equal(attempt, i + 1);
    assert.ok(delay >= 0 && delay <= Math.min(80, 10 * 2 ** i), `attempt ${attempt}: ${delay}`);
  });
  assert.equal(c.state, "reconnecting");
});

test("a missing pong within pongTimeout means a dead connection: reconnect", async () => {
  const server = await fake(() => {}, { pong: false });
  const c = client(server.url, { pingInterval: 100, pongTimeout: 150 });
  await next(c, "open");
  const [code] = await next(c, "close", 3000);
  assert.equal(code, CLOSE_DEAD);
  assert.ok(server.state.frames.some((f) => f.type === "ping"));
  await next(c, "open", 3000);
});

test("idle pings answered by pong keep the connection", async () => {
  const server = await fake();
  const c = client(server.url, { pingInterval: 50, pongTimeout: 100 });
  await next(c, "open");
  let closed = false;
  c.on("close", () => (closed = true));
  await sleep(500);
  assert.equal(closed, false);
  assert.ok(server.state.frames.filter((f) => f.type === "ping").length >= 3);
});

test("offline closes and waits; online reconnects at once and rejoins rooms", async () => {
  const server = await fake();
  const network = new EventTarget();
  const c = client(server.url, { network, minDelay: 5000, maxDelay: 5000 });
  await next(c, "open");
  await c.join("room-a");
  const closed = next(c, "close");
  const offline = next(c, "offline");
  network.dispatchEvent(new Event("offline"));
  assert.equal(c.state, "offline");
  assert.deepEqual(await closed, [CLOSE_OFFLINE, "offline"]);
  await offline;
  const queued = c.send("chat", { room: "room-a", text: "later" });
  await sleep(100);
  assert.equal(server.state.connections, 1);
  network.dispatchEvent(new Event("online"));
  await next(c, "open", 1000);
  assert.equal((await queued).ok, true);
  const joins = server.state.frames.filter((f) => f.type === "join" && f.room === "room-a");
  assert.equal(joins.length, 2);
  const last = server.state.frames.at(-1);
  assert.equal(last.text, "later", "the rejoin goes before the queued chat");
});

test("offline between reconnect attempts: no attempts until online, then one at once", async () => {
  const server = await fake((socket, n) => n === 1 && setTimeout(() => socket.close(1011, "internal"), 20));
  const network = new EventTarget();
  const c = client(server.url, { network, minDelay: 5000, maxDelay: 5000 });
  const events = [];
  for (const name of ["close", "reconnecting", "offline", "online", "open"]) c.on(name, () => events.push(`${name}:${c.state}`));
  await next(c, "open");
  await next(c, "reconnecting");
  network.dispatchEvent(new Event("offline"));
  assert.equal(c.state, "offline");
  network.dispatchEvent(new Event("online"));
  assert.equal(c.state, "connecting");
  await next(c, "open", 1000); // the 5 s backoff was cancelled
  assert.deepEqual(events, ["open:open", "close:reconnecting", "reconnecting:reconnecting", "offline:offline", "online:connecting", "open:open"]);
  assert.equal(server.state.connections, 2);
});

test("bounded outbox: overflow and timeouts reject with a reason, close rejects the rest", async () => {
  const c = client(`ws://127.0.0.1:${await freePort()}/ws`, { outboxSize: 2, sendTimeout: 5000 });
  const first = c.send("chat", { text: "1" }, { timeout: 50 });
  const second = c.send("chat", { text: "2" });
  await assert.rejects(c.send("chat", { text: "3" }), { code: "outbox_full" });
  await assert.rejects(first, { code: "timeout" });
  const third = c.send("chat", { text: "3" });
  c.close();
  await assert.rejects(second, { code: "closed" });
  await assert.rejects(third, { code: "closed" });
  assert.equal(c.state, "closed");
});

test("a send without a reply times out; the token goes in access_token", async () => {
  const server = await fake((socket) => socket.removeAllListeners("message"));
  const c = client(server.url, { pingInterval: 60000 });
  await next(c, "open");
  await assert.rejects(c.send("notification", { to: "x" }, { timeout: 100 }), { code: "timeout" });
  assert.match(server.state.urls[0], /^\/ws\?access_token=ey/);
});

test("close or a connect timeout during the handshake throws nothing (Node's ws)", async () => {
  // A TCP server that never answers the upgrade: the client stays "connecting".
  const silent = createServer(() => {});
  await new Promise((r) => silent.listen(0, "127.0.0.1", r));
  open.push(silent);
  const uncaught = [];
  const record = (error) => uncaught.push(String(error));
  process.on("uncaughtException", record);
  try {
    const url = `ws://127.0.0.1:${silent.address().port}/ws`;
    const closing = client(url);
    const timingOut = client(url, { connectTimeout: 50, minDelay: 5000, maxDelay: 5000 });
    await sleep(20);
    assert.equal(closing.state, "connecting");
    closing.close();
    await next(timingOut, "reconnecting", 3000);
    await sleep(20); // the socket's "error" comes on the next tick
    assert.deepEqual(uncaught, []);
    timingOut.close();
  } finally {
    process.off("uncaughtException", record);
  }
});

test("1001 without a delay in the reason falls back to the backoff", async () => {
  const server = await fake((socket, n) => n === 1 && setTimeout(() => socket.close(1001, "going away"), 20));
  const c = client(server.url, { maxDelay: 100 });
  await next(c, "open");
  const [, delay] = await next(c, "reconnecting");
  assert.ok(delay <= 100);
  await next(c, "open", 2000);
});
