// The demo page after a reconnect, in a real browser (chromium via playwright-core):
// a divider before the messages recovered, a notice when they could not be.
// Skipped when no chromium is installed (set CHROMIUM to its path if it is elsewhere).
import assert from "node:assert/strict";
import { existsSync, rmSync } from "node:fs";
import { join } from "node:path";
import { after, before, test } from "node:test";
import { PushServer, token } from "../support/server.js";

const CANDIDATES = [process.env.CHROMIUM, "/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome"];
const executablePath = CANDIDATES.find((path) => path && existsSync(path));
const skip = executablePath ? false : "no chromium installed (Debian: apt-get install chromium)";
const ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-dev-shm-usage"];

const server = new PushServer({}, ["--dev"]);
const other = new PushServer({}, ["--dev"]); // the same data dir: the room goes on while the page is away
let browser = null;

before(async () => {
  if (skip) return;
  const { chromium } = await import("playwright-core");
  await server.start();
  other.dir = server.dir;
  browser = await chromium.launch({ executablePath, headless: true, args: ARGS });
});

after(async () => {
  if (browser) await browser.close();
  await other.destroy();
  await server.destroy();
});

const waitText = (page, selector, text, timeout = 20000) =>
  page.waitForFunction(([sel, t]) => (document.querySelector(sel)?.textContent || "").includes(t), [selector, text], { timeout });

test("messages sent while the page was away follow a divider", { skip, timeout: 90000 }, async () => {
  const page = await (await browser.newContext()).newPage();
  await page.goto(`${server.base}/demo#token=${token("dana")}`);
  await waitText(page, "#conv-title", "#lobby");
  await server.api("POST", "/api/v1/publish", { room: "lobby", text: "before the break" });
  await waitText(page, "#messages", "before the break");

  await server.stop();
  await other.start();
  for (const text of ["missed one", "missed two"]) {
    assert.equal((await other.api("POST", "/api/v1/publish", { room: "lobby", text })).status, 202);
  }
  await other.stop();
  await server.start(); // the page reconnects here and rejoins with since

  await waitText(page, "#messages", "missed two");
  const lines = await page.$$eval("#messages li", (items) => items.map((li) => [li.className, li.textContent]));
  const divider = lines.findIndex(([cls]) => cls === "divider");
  assert.ok(divider >= 0, JSON.stringify(lines));
  assert.match(lines[divider][1], /2 messages while you were away/);
  const texts = lines.map(([, text]) => text);
  assert.ok(texts.findIndex((t) => t.includes("missed one")) > divider, JSON.stringify(lines));
  assert.ok(texts.findIndex((t) => t.includes("before the break")) < divider, JSON.stringify(lines));
  assert.equal(texts.filter((t) => t.includes("missed one")).length, 1); // no duplicate

  // A history the page cannot resume from (a new store: a new epoch): a notice, not a silent gap.
  await server.stop();
  rmSync(join(server.dir, "data"), { recursive: true, force: true });
  await server.start();
  await waitText(page, "#messages", "could not be recovered (epoch_changed)");
});
