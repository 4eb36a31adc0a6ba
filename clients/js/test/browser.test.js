// The demo page (/) in a real browser: Debian's chromium driven by playwright-core.
// Skipped when no chromium is installed (set CHROMIUM to its path if it is elsewhere).
import assert from "node:assert/strict";
import { existsSync } from "node:fs";
import { after, before, test } from "node:test";
import WebSocket from "ws";
import { PushClient } from "../pushsvc.js";
import { PushServer, next, token } from "../support/server.js";

const CANDIDATES = [process.env.CHROMIUM, "/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome"];
const executablePath = CANDIDATES.find((path) => path && existsSync(path));
const skip = executablePath ? false : "no chromium installed (Debian: apt-get install chromium)";

const server = new PushServer();
let browser = null;
const others = [];

before(async () => {
  if (skip) return;
  const { chromium } = await import("playwright-core");
  await server.start();
  browser = await chromium.launch({ executablePath, args: ["--no-sandbox", "--disable-dev-shm-usage"] });
});

after(async () => {
  for (const c of others) c.close();
  if (browser) await browser.close();
  await server.destroy();
});

test("demo page: connect, join, chat as text, presence, reconnect after a restart", { skip, timeout: 90000 }, async () => {
  const page = await browser.newPage();
  const problems = [];
  page.on("pageerror", (error) => problems.push(String(error)));
  page.on("console", (message) => message.type() === "error" && problems.push(message.text()));

  await page.goto(`${server.base}/#token=${token("alice", { name: "Alice" })}`);
  assert.equal(new URL(page.url()).hash, "", "the token is taken out of the address bar");
  await page.click("#connect button");
  await page.waitForFunction(() => document.getElementById("state").textContent === "open");
  await page.waitForFunction(() => document.getElementById("messages").textContent.includes("joined lobby"));

  // Another user joins: presence in the member list.
  const bob = new PushClient(server.wsUrl, { WebSocket, token: token("bob") });
  others.push(bob);
  await next(bob, "open");
  await bob.join("lobby");
  await page.waitForFunction(() => document.getElementById("members").textContent.includes("bob"));

  // Text from the network is shown as text, never parsed as HTML.
  await bob.send("chat", { room: "lobby", text: "<img src=x onerror=alert(1)><b>bold</b>" });
  await page.waitForFunction(() => document.getElementById("messages").textContent.includes("<b>bold</b>"));
  assert.equal(await page.locator("#messages img, #messages b").count(), 0);

  // Chat from the page reaches bob.
  const heard = new Promise((resolve) => bob.on("chat", (m) => m.user === "alice" && resolve(m)));
  await page.fill("#text", "hi from the browser");
  await page.click("#chat button");
  const frame = await heard;
  assert.equal(frame.text, "hi from the browser");
  assert.equal(frame.name, "Alice");

  // A restart: the page shows the reconnect and is open again.
  await server.stop();
  await page.waitForFunction(() => ["reconnecting", "connecting"].includes(document.getElementById("state").textContent));
  await server.start();
  await page.waitForFunction(() => document.getElementById("state").textContent === "open", null, { timeout: 30000 });
  assert.deepEqual(problems.filter((p) => !/WebSocket|ERR_CONNECTION_REFUSED|status of 503/.test(p)), []);
  await page.close();
});
