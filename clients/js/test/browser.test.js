// The demo chat page (/demo) in a real browser: Debian's chromium driven by playwright-core.
// Skipped when no chromium is installed (support/browser.js).
// A screenshot of the page in a phone-sized window is saved under the temp dir (path printed);
// PUSHSVC_DEMO_SCREENSHOT=path saves it there too (docs/img/demo.png).
import assert from "node:assert/strict";
import { copyFileSync, existsSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, test } from "node:test";
import WebSocket from "ws";
import { PushClient } from "../pushsvc.js";
import { launch, skip } from "../support/browser.js";
import { PushServer, next, sleep, token } from "../support/server.js";

const PHONE = { width: 390, height: 760 };

// --dev: demo.enabled and POST /dev/token (signed with the test secret, set in the environment).
const server = new PushServer({}, ["--dev"]);
let browser = null;
const others = [];
const contexts = [];

before(async () => {
  if (skip) return;
  await server.start();
  browser = await launch();
});

after(async () => {
  for (const c of others) c.close();
  if (browser) await browser.close();
  await server.destroy();
});

/** A page in its own browser context (own permissions), phone-sized, recording errors and notifications. */
async function openPage({ grant = false, deny = false } = {}) {
  const context = await browser.newContext({ viewport: PHONE });
  contexts.push(context);
  if (grant) await context.grantPermissions(["notifications"], { origin: server.base });
  await context.addInitScript((denied) => {
    window.__shown = [];
    const Real = window.Notification;
    if (!Real) return;
    // Count the system notifications the page shows; "denied" stands for a refused prompt.
    class Counted extends Real {
      constructor(title, options) {
        super(title, options);
        window.__shown.push({ title, body: options && options.body });
      }
      static get permission() {
        return denied ? "denied" : Real.permission;
      }
    }
    window.Notification = Counted;
  }, deny);
  const page = await context.newPage();
  page.problems = [];
  page.on("pageerror", (error) => page.problems.push(String(error)));
  page.on("console", (message) => message.type() === "error" && page.problems.push(message.text()));
  return page;
}

/** Log in through the name form (POST /dev/token). */
async function login(page, name) {
  await page.goto(`${server.base}/demo`);
  await page.fill("#name", name);
  await page.press("#name", "Enter");
  await waitState(page, "open");
}

const waitState = (page, state, timeout = 15000) =>
  page.waitForFunction((s) => document.getElementById("state").textContent === s, state, { timeout });
const waitText = (page, selector, text, timeout = 10000) =>
  page.waitForFunction(([sel, t]) => (document.querySelector(sel)?.textContent || "").includes(t), [selector, text], { timeout });
const usersIn = (page) => page.$$eval("#users li", (items) => items.map((li) => li.dataset.user));
/** Wait until the user list shows exactly `users`: it is drawn when the join reply or a presence frame arrives. */
async function waitUsers(page, users, timeout = 10000) {
  try {
    await page.waitForFunction((want) => [...document.querySelectorAll("#users li")].map((li) => li.dataset.user).join("\n") === want.join("\n"), users, { timeout });
  } catch (error) {
    assert.deepEqual(await usersIn(page), users, error.message);
    throw error;
  }
}
const realProblems = (page) => page.problems.filter((p) => !/WebSocket|ERR_CONNECTION_REFUSED|status of 503/.test(p));

let alice = null;
let bob = null;

test("two pages chat in a room and see each other in the user list", { skip, timeout: 60000 }, async () => {
  alice = await openPage();
  await login(alice, "alice");
  // bob's token comes in the URL fragment: taken out of the address bar, never sent.
  bob = await openPage();
  const requests = [];
  bob.on("request", (request) => requests.push(request.url()));
  await bob.goto(`${server.base}/demo#token=${token("bob", { name: "Bob" })}`);
  assert.equal(new URL(bob.url()).hash, "", "the token is taken out of the address bar");
  await waitState(bob, "open");
  assert.ok(requests.every((url) => !url.includes("token=") || url.startsWith("ws")), requests.join("\n"));

  await waitUsers(alice, ["alice", "bob"]);
  await waitUsers(bob, ["alice", "bob"]);
  assert.equal(await alice.textContent("#conv-title"), "#lobby");

  // Enter sends.
  await alice.fill("#text", "hello from alice");
  await alice.press("#text", "Enter");
  await waitText(bob, "#messages", "hello from alice");
  assert.equal(await alice.inputValue("#text"), "");
  await bob.fill("#text", "hi alice");
  await bob.press("#text", "Enter");
  await waitText(alice, "#messages", "hi alice");
  assert.match(await alice.textContent("#messages"), /Bobhi alice/); // the display name of the token

  // Another room: join, see each other there, leave.
  await alice.fill("#room-input", "team");
  await alice.press("#room-input", "Enter");
  await waitText(alice, "#conv-title", "#team");
  await bob.fill("#room-input", "team");
  await bob.press("#room-input", "Enter");
  // Each page draws the list from its own frames: bob's join reply may come after alice's presence.
  await waitUsers(alice, ["alice", "bob"]);
  await waitUsers(bob, ["alice", "bob"]);
  await alice.click('#rooms li[data-room="team"] .leave');
  await waitText(bob, "#messages", "alice left");
  await waitUsers(bob, ["bob"]);
  assert.deepEqual(await alice.$$eval("#rooms li", (items) => items.map((li) => li.dataset.room)), ["lobby"]);
  await bob.click('#rooms li[data-room="lobby"] .conv');
  assert.deepEqual([...realProblems(alice), ...realProblems(bob)], []);
});

test("a private message", { skip: skip || undefined, timeout: 30000 }, async () => {
  assert.ok(alice && bob, "needs the first test's pages");
  await bob.click('#users li[data-user="alice"] button');
  await waitText(bob, "#conv-title", "private with alice");
  await bob.fill("#text", "psst, alice");
  await bob.press("#text", "Enter");
  await waitText(bob, "#messages", "psst, alice"); // the sender sees it too
  // alice is in #lobby: a conversation with an unread count appears.
  await alice.waitForFunction(() => document.querySelector('#dms li[data-user="bob"] .unread')?.textContent === "1");
  assert.doesNotMatch(await alice.textContent("#messages"), /psst/);
  await alice.click('#dms li[data-user="bob"] button');
  await waitText(alice, "#messages", "psst, alice");
  assert.equal(await alice.locator("#dms .unread").count(), 0);
  // And back, in the same conversation.
  await alice.fill("#text", "yes?");
  await alice.press("#text", "Enter");
  await bob.waitForFunction(() => document.getElementById("messages").textContent.includes("yes?"));
});

test("screenshot of the demo in a phone-sized window", { skip: skip || undefined, timeout: 30000 }, async () => {
  assert.ok(alice, "needs the first test's pages");
  await alice.click('#rooms li[data-room="lobby"] .conv');
  await alice.fill("#text", "the message box sends on Enter");
  const dir = mkdtempSync(join(tmpdir(), "pushsvc-demo-shot-"));
  const path = join(dir, "demo.png");
  await alice.screenshot({ path });
  console.log(`demo screenshot: ${path}`);
  if (process.env.PUSHSVC_DEMO_SCREENSHOT) copyFileSync(path, process.env.PUSHSVC_DEMO_SCREENSHOT);
  assert.ok(existsSync(path));
  await alice.fill("#text", "");
});

test("markup from users is shown as text and runs nothing", { skip: skip || undefined, timeout: 30000 }, async () => {
  assert.ok(alice && bob, "needs the first test's pages");
  const evil = "<img src=x onerror=window.__pwned=1>";
  await alice.click('#rooms li[data-room="lobby"] .conv');
  await bob.click('#rooms li[data-room="lobby"] .conv');
  await alice.fill("#text", evil);
  await alice.press("#text", "Enter");
  await waitText(bob, "#messages", evil);
  // A user id and display name with markup (a token minted elsewhere).
  const mallory = new PushClient(server.wsUrl, { WebSocket, token: token("<b>mallory</b>", { name: "<i onmouseover=x()>M</i>" }) });
  others.push(mallory);
  await next(mallory, "open");
  await mallory.join("lobby");
  await mallory.send("chat", { room: "lobby", text: `${evil}<script>window.__pwned=2</script>` });
  await waitText(bob, "#messages", "<script>");
  await bob.waitForFunction(() => document.querySelector('#users li[data-user="<b>mallory</b>"]'));
  await sleep(300); // an onerror would have run by now
  for (const page of [alice, bob]) {
    assert.equal(await page.locator("#messages img, #messages script, #messages b, #messages i, #users b").count(), 0);
    assert.equal(await page.evaluate(() => window.__pwned), undefined);
  }
  assert.match(await bob.textContent("#users"), /<b>mallory<\/b>/);
  mallory.close();
});

async function notifyApi(to, title, message) {
  const result = await server.api("POST", "/api/v1/notify", { to, title, message });
  assert.equal(result.status, 202, JSON.stringify(result.body));
  return result.body.id;
}

test("a notification from the server API: the browser's when permitted, once", { skip, timeout: 30000 }, async () => {
  const page = await openPage({ grant: true });
  await login(page, "nina");
  assert.equal(await page.evaluate(() => Notification.permission), "granted");
  await notifyApi("nina", "Order shipped", "Your order 42 is on its way");
  await page.waitForFunction(() => window.__shown.length > 0);
  await sleep(500);
  assert.deepEqual(await page.evaluate(() => window.__shown), [{ title: "Order shipped", body: "Your order 42 is on its way" }]);
  assert.equal(await page.locator("#toasts .toast").count(), 0, "no in-page copy");
  await page.context().close();
});

test("a notification without permission: shown in the page, once, as text", { skip, timeout: 30000 }, async () => {
  for (const deny of [true, false]) {
    const page = await openPage({ deny });
    const name = deny ? "dora" : "dino";
    await login(page, name);
    assert.notEqual(await page.evaluate(() => Notification.permission), "granted");
    await notifyApi(name, "<b>Heads up</b>", "<img src=x onerror=window.__pwned=1>");
    await page.waitForFunction(() => document.querySelectorAll("#toasts .toast").length > 0);
    await sleep(500);
    assert.equal(await page.locator("#toasts .toast").count(), 1);
    assert.equal(await page.textContent("#toasts .toast strong"), "<b>Heads up</b>");
    assert.equal(await page.locator("#toasts img, #toasts b").count(), 0);
    assert.equal(await page.evaluate(() => window.__pwned), undefined);
    assert.deepEqual(await page.evaluate(() => window.__shown), []);
    await page.click("#toasts .toast button");
    assert.equal(await page.locator("#toasts .toast").count(), 0);
    await page.context().close();
  }
});

test("server restart: reconnecting, reconnected, a notification sent meanwhile shown once", { skip, timeout: 120000 }, async () => {
  const page = await openPage();
  await login(page, "rita");
  await page.waitForFunction(() => document.querySelector('#users li[data-user="rita"]'));
  const states = [];
  await page.exposeFunction("__state", (s) => states.push(s));
  await page.evaluate(() => {
    new MutationObserver(() => window.__state(document.getElementById("state").textContent)).observe(
      document.getElementById("state"),
      { childList: true, characterData: true, subtree: true },
    );
  });

  await server.stop();
  await waitState(page, "reconnecting");
  // While it is down, another pushsvc on the same data dir accepts a notification for rita
  // (stored: she is offline), then stops; the restarted server delivers it.
  const helper = new PushServer({}, []);
  rmSync(helper.dir, { recursive: true, force: true });
  helper.dir = server.dir;
  await helper.start();
  try {
    const result = await helper.api("POST", "/api/v1/notify", { to: "rita", title: "While you were away", message: "sent during the restart" });
    assert.equal(result.status, 202, JSON.stringify(result.body));
  } finally {
    await helper.stop();
  }
  assert.equal(await page.textContent("#state"), "reconnecting", "still down");
  assert.equal(await page.locator("#toasts .toast").count(), 0);

  await server.start();
  await waitState(page, "open", 45000);
  await page.waitForFunction(() => document.querySelectorAll("#toasts .toast").length > 0, null, { timeout: 10000 });
  await sleep(1000); // a redelivery would show by now
  assert.equal(await page.locator("#toasts .toast").count(), 1);
  assert.match(await page.textContent("#toasts .toast"), /While you were away/);
  assert.ok(states.includes("reconnecting") && states.at(-1) === "open", states.join(" "));
  // The user list came back with the reconnect.
  await page.waitForFunction(() => document.querySelector('#users li[data-user="rita"]'));
  // Chat works again.
  await page.fill("#text", "back");
  await page.press("#text", "Enter");
  await waitText(page, "#messages", "back");
  assert.deepEqual(realProblems(page), []);
  await page.context().close();
});

/** Record every text the page's #state shows from now on (the client's state, via the demo). */
async function recordStates(page) {
  const states = [];
  await page.exposeFunction("__state", (s) => states.push(s));
  await page.evaluate(() => {
    new MutationObserver(() => window.__state(document.getElementById("state").textContent)).observe(
      document.getElementById("state"),
      { childList: true, characterData: true, subtree: true },
    );
  });
  return states;
}

// context.setOffline fires the window's offline/online events (it need not cut a loopback
// socket): what is tested is the client's reaction to them.
test("browser offline: the open connection is closed and no attempt is made; online reconnects at once", { skip, timeout: 60000 }, async () => {
  const page = await openPage();
  await login(page, "olga");
  const sockets = [];
  page.on("websocket", (ws) => sockets.push(ws.url()));
  const states = await recordStates(page);

  await page.context().setOffline(true);
  await waitState(page, "offline");
  assert.equal(await page.textContent("#detail"), "waiting for the network");
  await sleep(2000); // several backoff delays (minDelay 500 ms): no attempt while offline
  assert.equal(await page.textContent("#state"), "offline");
  assert.deepEqual(sockets, []);
  assert.ok(!states.includes("reconnecting"), states.join(" "));

  const mark = states.length;
  await page.context().setOffline(false);
  await waitState(page, "open");
  // Straight to connecting and open: no backoff ("reconnecting") in between, one new socket.
  assert.deepEqual(states.slice(mark), ["connecting", "open"]);
  assert.equal(sockets.length, 1);
  await page.fill("#text", "online again");
  await page.press("#text", "Enter");
  await waitText(page, "#messages", "online again");
  assert.deepEqual(realProblems(page), []);
  await page.context().close();
});

test("browser offline while reconnecting: attempts pause; online tries at once", { skip, timeout: 90000 }, async () => {
  const page = await openPage();
  await login(page, "otto");
  const sockets = [];
  page.on("websocket", (ws) => sockets.push(ws.url()));
  const states = await recordStates(page);

  await server.stop();
  await waitState(page, "reconnecting");
  await page.context().setOffline(true);
  await waitState(page, "offline"); // shown by the client's offline event (often no socket to close)
  const attempts = sockets.length;
  await sleep(2000);
  assert.equal(sockets.length, attempts, "no attempt while offline");
  assert.equal(await page.textContent("#state"), "offline");

  await server.start();
  const mark = states.length;
  await page.context().setOffline(false);
  await waitState(page, "open", 15000);
  assert.deepEqual(states.slice(mark), ["connecting", "open"], "no backoff after online");
  assert.equal(sockets.length, attempts + 1);
  await page.waitForFunction(() => document.querySelector('#users li[data-user="otto"]'));
  assert.deepEqual(realProblems(page), []);
  await page.context().close();
});
