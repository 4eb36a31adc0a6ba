// Resume after a reconnect: the client rejoins with `since` and the server replays what it missed.
import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import WebSocket from "ws";
import { PushClient } from "../pushsvc.js";
import { PushServer, next, until, token } from "../support/server.js";

describe("rooms that remember", () => {
  const server = new PushServer();
  const clients = [];
  const others = [];
  before(() => server.start());
  after(async () => {
    for (const c of clients) c.close();
    for (const o of others) await o.destroy();
    await server.destroy();
  });

  test("a rejoin after a restart replays the missed messages once, in order, then live", async () => {
    const ann = new PushClient(server.wsUrl, { WebSocket, token: () => token("ann"), minDelay: 50, maxDelay: 300, drainJitter: 50 });
    clients.push(ann);
    const chats = [];
    const recoveries = [];
    ann.on("chat", (frame) => frame.room === "news" && chats.push(frame));
    ann.on("recovery", (r) => recoveries.push(r));
    await ann.join("news");
    await server.api("POST", "/api/v1/publish", { room: "news", text: "m0" });
    await until(() => chats.length === 1, 5000, "m0");
    const first = chats[0];
    assert.deepEqual(ann.positions.get("news"), { offset: first.offset, epoch: first.epoch });

    // The room goes on while ann is away: another process on the same data dir.
    await server.stop();
    const other = new PushServer();
    others.push(other);
    other.dir = server.dir;
    await other.start();
    for (let i = 1; i <= 5; i++) {
      const { status } = await other.api("POST", "/api/v1/publish", { room: "news", text: `m${i}` });
      assert.equal(status, 202);
    }
    await other.stop();
    await server.start(); // ann reconnects here and rejoins with since
    const [recovery] = await next(ann, "recovery", 20000);
    assert.deepEqual(recovery, { room: "news", recovered: true, recoveredCount: 5, reason: null });
    await until(() => chats.length === 6, 5000, "the replay");
    await server.api("POST", "/api/v1/publish", { room: "news", text: "live" });
    await until(() => chats.length === 7, 5000, "live");
    assert.deepEqual(chats.map((c) => c.text), ["m0", "m1", "m2", "m3", "m4", "m5", "live"]);
    assert.deepEqual(chats.map((c) => c.offset), [1, 2, 3, 4, 5, 6, 7].map((n) => first.offset + n - 1));
    assert.deepEqual(recoveries, [recovery]);
  });

  test("a lost history is reported, not hidden", async () => {
    const bo = new PushClient(server.wsUrl, { WebSocket, token: () => token("bo"), minDelay: 50, maxDelay: 300 });
    clients.push(bo);
    // as after a reconnect: the room is rejoined on open, from a position of another history
    bo.positions.set("gone", { offset: 3, epoch: "an-old-epoch" });
    bo.rooms.add("gone");
    const [recovery] = await next(bo, "recovery", 10000);
    assert.deepEqual(recovery, { room: "gone", recovered: false, recoveredCount: 0, reason: "epoch_changed" });
  });
});
