// Test helpers: Debian's chromium driven by playwright-core (set CHROMIUM to its path if it is
// elsewhere). `skip` is false when a browser is found, else the reason to skip.
import { existsSync } from "node:fs";

const CANDIDATES = [process.env.CHROMIUM, "/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome"];
export const executablePath = CANDIDATES.find((path) => path && existsSync(path));
export const skip = executablePath ? false : "no chromium installed (Debian: apt-get install chromium)";
const ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-dev-shm-usage"];

/** Launch headless chromium. */
export async function launch() {
  const { chromium } = await import("playwright-core");
  return chromium.launch({ executablePath, headless: true, args: ARGS });
}
