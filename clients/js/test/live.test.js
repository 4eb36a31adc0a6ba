// The client against a real `python -m pushsvc serve` process.
import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import WebSocket from "ws";
import { PushClient } from "../pushsvc.js";
import { PushServer, next, sleep, token, until } from "../support/server.js";

const clients = [];
function client(server, sub, options = {}) {
  const c = new PushClient(server.wsUrl, { WebSocket, token: () => token(sub), minDelay: 50, maxDelay: 500, ...options });
  clients.push(c);
  return c;
}

describe("against a running server", () => {
  const server = new PushServer({
    PUSHSVC_DELIVERY__ACK_TIMEOUT: "0.4",
    PUSHSVC_SERVER__MAX_MESSAGE_BYTES: "2048",
  });
  before(() => server.start());
  after(async () => {
    for (const c of clients) c.close();
    await server.destroy();
  });

  test("open, join, chat reply and echo, error rejects the send", async () => {
    const alice = client(server, "alice");
    const [welcome] = await next(alice, "open");
    assert.equal(welcome.user, "alice");
    assert.equal(alice.state, "open");
    const joined = await alice.join("r1");
    assert.equal(joined.room, "r1");
    const echo = next(alice, "chat");
    const reply = await alice.send("chat", { room: "r1", text: "hello" });
    assert.equal(reply.ok, true);
    assert.equal(typeof reply.id, "string");
    const [frame] = await echo;
    assert.equal(frame.text, "hello");
    assert.equal(frame.user, "alice");
    await assert.rejects(alice.send("chat", { room: "not-joined", text: "x" }), { code: "forbidden" });
    await alice.leave("r1");
    assert.ok(!alice.rooms.has("r1"));
  });

  test("presence of another user in a joined room", async () => {
    const a = client(server, "pa");
    const b = client(server, "pb");
    await a.join("pres");
    const presence = new Promise((resolve) => a.on("presence", (f) => f.room === "pres" && f.user === "pb" && resolve(f)));
    await b.join("pres");
    const frame = await presence;
    assert.equal(frame.event, "join");
  });

  test("notifications are acked after the handlers ran (auto)", async () => {
    const carol = client(server, "carol");
    await next(carol, "open");
    const seen = [];
    carol.on("notification", async (frame) => {
      await sleep(50);
      seen.push(frame.id);
    });
    const { status, body } = await server.api("POST", "/api/v1/notify", { to: "carol", title: "t", message: "m" });
    assert.equal(status, 202);
    await until(() => seen.includes(body.id), 5000, "notification");
    await until(async () => (await server.api("GET", "/api/v1/users/carol/pending")).body.messages.length === 0, 5000, "ack");
  });

  test("manual ack: duplicates by id are dropped until the app acks", async () => {
    const dave = client(server, "dave", { ackMode: "manual" });
    await next(dave, "open");
    const calls = [];
    dave.on("notification", (frame) => calls.push(frame));
    const { body } = await server.api("POST", "/api/v1/notify", { to: "dave", title: "t", message: "m" });
    await until(() => calls.length === 1, 5000, "notification");
    await sleep(1500); // several ack timeouts: the server resends, the client drops them
    assert.equal(calls.length, 1);
    let pending = await server.api("GET", "/api/v1/users/dave/pending");
    assert.equal(pending.body.messages.length, 1);
    assert.ok(pending.body.messages[0].attempts > 1, "the server did resend");
    dave.ack(calls[0]);
    await until(async () => (await server.api("GET", "/api/v1/users/dave/pending")).body.messages.length === 0, 5000, "ack");
    assert.equal(calls[0].id, body.id);
  });

  test("a failing handler leaves the message unacked; the redelivery runs it again", async () => {
    const erin = client(server, "erin");
    await next(erin, "open");
    let calls = 0;
    const errors = [];
    erin.on("error", (e) => errors.push(e));
    erin.on("notification", () => {
      calls += 1;
      if (calls === 1) throw new Error("first try fails");
    });
    await server.api("POST", "/api/v1/notify", { to: "erin", title: "t", message: "m" });
    await until(() => calls >= 2, 5000, "redelivery");
    await until(async () => (await server.api("GET", "/api/v1/users/erin/pending")).body.messages.length === 0, 5000, "ack");
    assert.equal(errors[0].message, "first try fails");
  });

  test("4003 (disconnected by the API) does not reconnect; queued sends are rejected", async () => {
    const frank = client(server, "frank");
    await next(frank, "open");
    const closed = next(frank, "close");
    let reconnecting = false;
    let stateInHandler = null;
    frank.on("reconnecting", () => (reconnecting = true));
    frank.on("close", () => (stateInHandler = frank.state));
    await server.api("POST", "/api/v1/users/frank/disconnect", { reason: "bye" });
    const [code] = await closed;
    assert.equal(code, 4003);
    assert.equal(stateInHandler, "closed", "close handlers see the state after the close");
    await sleep(300);
    assert.equal(reconnecting, false);
    assert.equal(frank.state, "closed");
    await assert.rejects(frank.send("chat", { text: "x" }), { code: "closed" });
  });

  test("1009 (frame too large) does not reconnect", async () => {
    const gina = client(server, "gina");
    await next(gina, "open");
    const closed = next(gina, "close");
    const sent = gina.send("chat", { text: "x".repeat(3000) });
    const [code] = await closed;
    assert.equal(code, 1009);
    await assert.rejects(sent, { code: "connection_lost" });
    assert.equal(gina.state, "closed");
  });

  test("4001 (token expired) gets a fresh token, then reconnects", async () => {
    let calls = 0;
    const hank = client(server, "hank", {
      refreshBefore: 0,
      token: () => {
        calls += 1;
        return token("hank", { ttl: 2 });
      },
    });
    await next(hank, "open");
    await hank.join("h");
    const [code] = await next(hank, "close", 8000);
    assert.equal(code, 4001);
    await next(hank, "open", 8000);
    assert.equal(calls, 2);
    await until(async () => (await server.api("GET", "/api/v1/rooms/h/presence")).body.users.includes("hank"), 5000, "rejoin");
  });

  test("a revoked token (4001 token revoked) is replaced before reconnecting", async () => {
    let calls = 0;
    const lena = client(server, "lena", {
      token: () => {
        calls += 1;
        return token("lena");
      },
    });
    await next(lena, "open");
    const closed = next(lena, "close");
    const { status } = await server.api("POST", "/api/v1/revocations", { user: "lena" });
    assert.equal(status, 200);
    const [code, reason] = await closed;
    assert.equal(code, 4001);
    assert.match(reason, /revoked/);
    // Tokens issued in the same second may count as revoked too (iat has second precision):
    // refused handshakes make the client fetch new tokens until one is accepted.
    await next(lena, "open", 10000);
    assert.ok(calls >= 2);
  });

  test("the token is refreshed in-band (auth frame) before exp", async () => {
    let calls = 0;
    const ivan = client(server, "ivan", {
      refreshBefore: 30,
      token: async () => {
        calls += 1;
        await sleep(10);
        return token("ivan", { ttl: 2 });
      },
    });
    await next(ivan, "open");
    let closes = 0;
    ivan.on("close", () => (closes += 1));
    await sleep(4500);
    assert.equal(closes, 0, "no 4001: the token was refreshed in time");
    assert.ok(calls >= 3, `token provider called ${calls} times`);
    assert.equal(ivan.state, "open");
  });

  test("concurrent refreshes share one provider call", async () => {
    let calls = 0;
    const c = client(server, "judy", {
      autoConnect: false,
      token: async () => {
        calls += 1;
        await sleep(50);
        return token("judy");
      },
    });
    const [a, b, d] = await Promise.all([c.refreshToken(), c.refreshToken(), c.refreshToken()]);
    assert.equal(calls, 1);
    assert.equal(a, b);
    assert.equal(a, d);
  });
});

describe("a server restart in the middle", () => {
  const server = new PushServer({ PUSHSVC_DELIVERY__ACK_TIMEOUT: "30" });
  before(() => server.start());
  after(async () => {
    for (const c of clients) c.close();
    await server.destroy();
  });

  test("drain delay honoured, rooms rejoined, queued sends resolved, messages acked", async () => {
    const kim = client(server, "kim", { drainJitter: 200 });
    await next(kim, "open");
    await kim.join("ops");
    let attempt = 0;
    const received = [];
    kim.on("notification", (frame) => {
      attempt += 1;
      received.push(frame.id);
      if (attempt === 1) throw new Error("not yet"); // unacked: must come back after the restart
    });
    const { body } = await server.api("POST", "/api/v1/notify", { to: "kim", title: "t", message: "m" });
    await until(() => received.length === 1, 5000, "first delivery");

    const closed = next(kim, "close");
    const reconnecting = next(kim, "reconnecting");
    const stopped = server.stop();
    const [code, reason] = await closed;
    assert.equal(code, 1001);
    assert.match(reason, /reconnect in [0-9.]+s/);
    const [, delay] = await reconnecting;
    const asked = parseFloat(/reconnect in ([0-9.]+)s/.exec(reason)[1]) * 1000;
    assert.ok(delay >= asked && delay <= asked + 200, `delay ${delay} for ${reason}`);
    assert.equal(await stopped, 0);

    // Disconnected: sends queue (bounded, each with its own timeout).
    const queued = kim.send("chat", { room: "ops", text: "queued while down" }, { timeout: 20000 });
    const expires = kim.send("chat", { room: "ops", text: "too late" }, { timeout: 100 });
    await assert.rejects(expires, { code: "timeout" });

    await server.start(); // same port, same data dir
    await next(kim, "open", 20000);
    const reply = await queued; // needs the rejoined room: chat requires membership
    assert.equal(reply.ok, true);
    assert.equal(typeof reply.id, "string");
    await until(async () => (await server.api("GET", "/api/v1/rooms/ops/presence")).body.users.includes("kim"), 5000, "rejoin");
    await until(() => received.length >= 2, 10000, "redelivery after the restart");
    assert.equal(received[1], body.id);
    await until(async () => (await server.api("GET", "/api/v1/users/kim/pending")).body.messages.length === 0, 5000, "ack");
  });
});
