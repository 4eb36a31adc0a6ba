// subscribePush() against a real `python -m pushsvc serve` with Web Push enabled. The
// registration is hand-made (a browser's PushManager needs the vendor's push service,
// which these machines cannot reach); the push service is a small HTTP server here.
import assert from "node:assert/strict";
import { createECDH, randomBytes } from "node:crypto";
import { createServer } from "node:http";
import { after, before, describe, test } from "node:test";
import WebSocket from "ws";
import { PushClient } from "../pushsvc.js";
import { PushServer, freePort, next, token, until } from "../support/server.js";

describe("Web Push from the JavaScript client", () => {
  let pushPort = 0;
  const received = [];
  let pushService = null;
  let server = null;
  const clients = [];

  before(async () => {
    pushPort = await freePort();
    pushService = createServer((request, response) => {
      const chunks = [];
      request.on("data", (chunk) => chunks.push(chunk));
      request.on("end", () => {
        received.push({ url: request.url, headers: request.headers, body: Buffer.concat(chunks) });
        response.writeHead(201).end();
      });
    });
    await new Promise((resolve) => pushService.listen(pushPort, "127.0.0.1", resolve));
    server = new PushServer({
      PUSHSVC_PUSH__ENABLED: "true",
      PUSHSVC_PUSH__SUBJECT: "mailto:ops@example.com",
      PUSHSVC_PUSH__ALLOW_PRIVATE_ENDPOINTS: "true",
      PUSHSVC_PUSH__ALLOWED_HOSTS: "127.0.0.1",
      PUSHSVC_PUSH__AFTER_SECONDS: "0.2", // pushed even if the close is not seen yet
    });
    await server.start();
  });

  after(async () => {
    for (const c of clients) c.close();
    await server.destroy();
    await new Promise((resolve) => pushService.close(resolve));
  });

  function client(options = {}) {
    const c = new PushClient(server.wsUrl, { WebSocket, token: () => token("alice"), ...options });
    clients.push(c);
    return c;
  }

  /** A stand-in for a ServiceWorkerRegistration: keys made here, as a browser makes them. */
  function registration(name) {
    const ecdh = createECDH("prime256v1");
    ecdh.generateKeys();
    const keys = { p256dh: ecdh.getPublicKey().toString("base64url"), auth: randomBytes(16).toString("base64url") };
    const endpoint = `http://127.0.0.1:${pushPort}/push/${name}`;
    const calls = [];
    let current = null;
    const pushManager = {
      async getSubscription() {
        return current;
      },
      async subscribe(options) {
        calls.push(options);
        current = {
          endpoint,
          options: { applicationServerKey: options.applicationServerKey.buffer },
          toJSON: () => ({ endpoint, expirationTime: null, keys }),
          unsubscribe: async () => {
            current = null;
            return true;
          },
        };
        return current;
      },
    };
    return { pushManager, calls, endpoint };
  }

  test("the key comes from welcome or HTTP; subscribePush registers the browser", async () => {
    const idle = client({ autoConnect: false });
    const fromHttp = await idle.vapidPublicKey();
    assert.equal(Buffer.from(fromHttp, "base64url").length, 65);
    const alice = client();
    const [welcome] = await next(alice, "open");
    assert.equal(welcome.push.vapid_public_key, fromHttp);

    const reg = registration("laptop");
    const subscription = await alice.subscribePush(reg);
    assert.equal(subscription.endpoint, reg.endpoint);
    assert.equal(reg.calls.length, 1);
    assert.equal(reg.calls[0].userVisibleOnly, true);
    assert.deepEqual(Buffer.from(reg.calls[0].applicationServerKey), Buffer.from(fromHttp, "base64url"));
    await alice.subscribePush(reg); // already subscribed with this key: no new browser subscription
    assert.equal(reg.calls.length, 1);
    const listed = await server.api("GET", "/api/v1/users/alice/push-subscriptions");
    assert.deepEqual(listed.body.subscriptions.map((s) => s.endpoint), [reg.endpoint]);

    alice.close();
    const notified = await server.api("POST", "/api/v1/notify", { to: "alice", title: "t", message: "m" });
    assert.equal(notified.status, 202);
    await until(() => received.length >= 1, 10000, "a push");
    const push = received[0];
    assert.equal(push.url, "/push/laptop");
    assert.equal(push.headers["content-encoding"], "aes128gcm");
    assert.match(push.headers.authorization, new RegExp(`^vapid t=[^,]+,k=${fromHttp}$`));

    const again = client();
    await next(again, "open");
    assert.equal(await again.unsubscribePush(reg), true);
    assert.equal(await again.unsubscribePush(reg), false);
    const empty = await server.api("GET", "/api/v1/users/alice/push-subscriptions");
    assert.deepEqual(empty.body.subscriptions, []);
  });

  test("a refused endpoint rejects with the server's error", async () => {
    const alice = client();
    await next(alice, "open");
    const reg = registration("x");
    const original = reg.pushManager.subscribe;
    reg.pushManager.subscribe = async (options) => {
      const sub = await original(options);
      return { ...sub, toJSON: () => ({ ...sub.toJSON(), endpoint: "ftp://127.0.0.1/push" }) };
    };
    await assert.rejects(alice.subscribePush(reg), { code: "forbidden" });
  });
});
