// Web Push in headless Chromium (playwright-core): the example service worker served at
// /client/sw.js registers, and a push delivered to it shows the notification.
//
// What cannot run here: pushManager.subscribe() registers with the browser vendor's push
// service (FCM for Chromium), which these machines cannot reach. In a persistent profile
// the call waits for FCM forever; in playwright's fresh (off-the-record) contexts Chromium
// refuses at once ("AbortError: Registration failed - permission denied": no Push API in
// incognito). The attempt is made with the key pushsvc serves and its outcome reported; the
// push itself is delivered through the DevTools protocol (ServiceWorker.deliverPushMessage),
// as FCM would deliver it to the browser.
// Skipped when no chromium is installed (set CHROMIUM to its path if it is elsewhere).
import assert from "node:assert/strict";
import { existsSync } from "node:fs";
import { after, before, test } from "node:test";
import { PushServer, sleep, until } from "../support/server.js";

const CANDIDATES = [process.env.CHROMIUM, "/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome"];
const executablePath = CANDIDATES.find((path) => path && existsSync(path));
const skip = executablePath ? false : "no chromium installed (Debian: apt-get install chromium)";
const ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-dev-shm-usage"];

// --dev: the demo page and POST /dev/token, as in browser.test.js.
const server = new PushServer({ PUSHSVC_PUSH__ENABLED: "true", PUSHSVC_PUSH__SUBJECT: "mailto:ops@example.com" }, ["--dev"]);
let browser = null;

before(async () => {
  if (skip) return;
  const { chromium } = await import("playwright-core");
  await server.start();
  browser = await chromium.launch({ executablePath, headless: true, args: ARGS });
});

after(async () => {
  if (browser) await browser.close();
  await server.destroy();
});

test("the example service worker registers and shows a pushed notification", { skip }, async (t) => {
  const context = await browser.newContext();
  await context.grantPermissions(["notifications"], { origin: server.base });
  const page = await context.newPage();
  const problems = [];
  page.on("pageerror", (error) => problems.push(String(error)));
  page.on("console", (message) => message.type() === "error" && !/status of 404|incognito/.test(message.text()) && problems.push(message.text()));
  const cdp = await context.newCDPSession(page);
  const registrations = new Map();
  cdp.on("ServiceWorker.workerRegistrationUpdated", ({ registrations: list }) => {
    for (const r of list) registrations.set(r.scopeURL, r.registrationId);
  });
  await cdp.send("ServiceWorker.enable");
  await page.goto(`${server.base}/healthz`); // any page of the origin: the worker's scope is /client/

  const attempt = await page.evaluate(async () => {
    const registration = await navigator.serviceWorker.register("/client/sw.js");
    const worker = registration.installing || registration.waiting || registration.active;
    while (worker.state !== "activated") await new Promise((resolve) => worker.addEventListener("statechange", resolve, { once: true }));
    const { public_key: key } = await (await fetch("/api/v1/push/vapid-public-key")).json();
    const bytes = Uint8Array.from(atob(key.replace(/-/g, "+").replace(/_/g, "/")), (c) => c.charCodeAt(0));
    try {
      const subscribing = registration.pushManager.subscribe({ userVisibleOnly: true, applicationServerKey: bytes });
      const timeout = new Promise((_, reject) => setTimeout(() => reject(new Error("no answer within 10 s")), 10000));
      const subscription = await Promise.race([subscribing, timeout]);
      const used = new Uint8Array(subscription.options.applicationServerKey);
      return { subscribed: true, sameKey: used.length === bytes.length && used.every((b, i) => b === bytes[i]) };
    } catch (error) {
      return { subscribed: false, error: String(error) };
    }
  });
  if (attempt.subscribed) assert.equal(attempt.sameKey, true);
  else t.diagnostic(`pushManager.subscribe needs the vendor's push service: ${attempt.error}`);

  const scope = `${server.base}/client/`;
  await until(() => registrations.has(scope), 10000, "the service worker registration");
  const payload = { id: "01TESTID", type: "notification", title: "Build failed", message: "main is red", data: { url: "/ci/1" } };
  const push = () =>
    cdp.send("ServiceWorker.deliverPushMessage", {
      origin: server.base,
      registrationId: registrations.get(scope),
      data: JSON.stringify(payload),
    });
  const notifications = () =>
    page.evaluate(async () => {
      const registration = await navigator.serviceWorker.getRegistration("/client/");
      const list = await registration.getNotifications();
      return list.length ? list.map((n) => ({ title: n.title, body: n.body, tag: n.tag, data: n.data })) : null;
    });
  await push();
  // Once in a full suite run on a loaded machine, Chromium showed nothing within 10 s of the
  // push (the worker did not run it); the push is then made once more. The tag makes the
  // second one replace the first, so one notification is still what must be shown.
  let shown = await until(notifications, 10000, "the notification").catch(() => null);
  if (!shown) {
    t.diagnostic("no notification 10 s after the push: pushed once more");
    await push();
    shown = await until(notifications, 10000, "the notification");
  }
  assert.deepEqual(shown, [{ title: "Build failed", body: "main is red", tag: "01TESTID", data: payload }]);
  assert.deepEqual(problems, []);
  await context.close();
});

test("the demo page registers the service worker once notifications are allowed", { skip }, async () => {
  const context = await browser.newContext();
  await context.grantPermissions(["notifications"], { origin: server.base });
  const page = await context.newPage();
  const problems = [];
  page.on("pageerror", (error) => problems.push(String(error)));
  const tried = new Promise((resolve) => page.on("console", (m) => /Web Push unavailable/.test(m.text()) && resolve(m.text())));
  await page.goto(`${server.base}/demo`);
  await page.fill("#name", "erin");
  await page.press("#name", "Enter");
  await page.waitForFunction(() => document.getElementById("state").textContent === "open", null, { timeout: 15000 });
  // Not page.waitForFunction: it takes the Promise an async predicate returns as truthy
  // at once. `until` awaits each answer.
  const scope = await until(
    () =>
      page.evaluate(async () => {
        const registration = await navigator.serviceWorker.getRegistration("/client/");
        return registration && (registration.active || registration.installing || registration.waiting) ? registration.scope : null;
      }),
    10000,
    "the demo page's service worker registration",
  );
  assert.equal(scope, `${server.base}/client/`);
  // subscribePush ran and the browser refused (no vendor push service here): reported, not thrown.
  const reported = await Promise.race([tried, sleep(10000).then(() => "no 'Web Push unavailable' report within 10 s")]);
  assert.match(reported, /Registration failed|AbortError|NotAllowedError/);
  assert.deepEqual(problems, []);
  await context.close();
});
