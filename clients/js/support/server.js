// Test helpers: a real `python -m pushsvc serve` child process, HS256 tokens, the HTTP API.
import { spawn } from "node:child_process";
import { createHmac } from "node:crypto";
import { existsSync, mkdtempSync, rmSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

export const SECRET = "test-secret-that-is-long-enough-for-hs256!";
const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), "../../..");

/** The Python that runs pushsvc: $PUSHSVC_PYTHON, the checkout's .venv, or python3. */
export function python() {
  if (process.env.PUSHSVC_PYTHON) return process.env.PUSHSVC_PYTHON;
  const venv = join(ROOT, ".venv", "bin", "python");
  return existsSync(venv) ? venv : "python3";
}

const b64url = (data) => Buffer.from(data).toString("base64url");

/** An HS256 JWT signed with the test secret; `ttl` in seconds. */
export function token(sub, { ttl = 3600, ...claims } = {}) {
  const now = Math.floor(Date.now() / 1000);
  const header = b64url(JSON.stringify({ alg: "HS256", typ: "JWT" }));
  const payload = b64url(JSON.stringify({ sub, iat: now, exp: now + ttl, ...claims }));
  const signature = createHmac("sha256", SECRET).update(`${header}.${payload}`).digest("base64url");
  return `${header}.${payload}.${signature}`;
}

export function freePort() {
  return new Promise((resolvePort, reject) => {
    const srv = createServer();
    srv.on("error", reject);
    srv.listen(0, "127.0.0.1", () => {
      const { port } = srv.address();
      srv.close(() => resolvePort(port));
    });
  });
}

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** Wait until `predicate()` is truthy (polling), or throw after `timeout` ms. */
export async function until(predicate, timeout = 10000, what = "condition") {
  const deadline = Date.now() + timeout;
  for (;;) {
    const value = await predicate();
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await sleep(25);
  }
}

/** Resolve with the arguments of the next `event` of a PushClient. */
export function next(client, event, timeout = 10000) {
  return new Promise((resolveEvent, reject) => {
    const timer = setTimeout(() => {
      off();
      reject(new Error(`no ${event} event within ${timeout} ms`));
    }, timeout);
    const off = client.on(event, (...args) => {
      clearTimeout(timer);
      off();
      resolveEvent(args);
    });
  });
}

/** `pushsvc serve` as a child process; restartable on the same port and data dir. */
export class PushServer {
  /** `env`: extra environment; `args`: extra `serve` arguments (e.g. ["--dev"]). */
  constructor(env = {}, args = []) {
    this.env = env;
    this.args = args;
    this.dir = mkdtempSync(join(tmpdir(), "pushsvc-js-"));
    this.port = 0;
    this.proc = null;
    this.log = "";
  }

  get wsUrl() {
    return `ws://127.0.0.1:${this.port}/ws`;
  }

  get base() {
    return `http://127.0.0.1:${this.port}`;
  }

  async start() {
    if (!this.port) this.port = await freePort();
    const env = {
      ...process.env,
      PUSHSVC_JWT_SECRET: SECRET,
      PYTHONUNBUFFERED: "1",
      PUSHSVC_LOG__ACCESS_LOG: "false",
      PUSHSVC_SERVER__DRAIN_SECONDS: "0.5",
      ...this.env,
    };
    const args = ["-m", "pushsvc", "serve", "--host", "127.0.0.1", "--port", String(this.port), "--data-dir", join(this.dir, "data"), ...this.args];
    const proc = spawn(python(), args, { env, stdio: ["ignore", "pipe", "pipe"] });
    this.proc = proc;
    const exited = new Promise((r) => proc.once("exit", (code) => r(code)));
    this.exited = exited;
    await new Promise((resolveStart, reject) => {
      const timer = setTimeout(() => reject(new Error(`server did not start:\n${this.log}`)), 30000);
      const onData = (chunk) => {
        this.log += chunk;
        if (this.log.includes("listening on")) {
          clearTimeout(timer);
          resolveStart();
        }
      };
      proc.stdout.setEncoding("utf8").on("data", onData);
      proc.stderr.setEncoding("utf8").on("data", onData);
      exited.then((code) => {
        clearTimeout(timer);
        reject(new Error(`server exited (${code}) before listening:\n${this.log}`));
      });
    });
    // Later data keeps going into the log.
    return this;
  }

  /** SIGTERM (drain with 1001) and wait for the exit code. */
  async stop() {
    if (!this.proc || this.proc.exitCode !== null) return this.proc && this.proc.exitCode;
    this.proc.kill("SIGTERM");
    const code = await Promise.race([this.exited, sleep(20000).then(() => "timeout")]);
    if (code === "timeout") this.proc.kill("SIGKILL");
    return code;
  }

  async destroy() {
    if (this.proc && this.proc.exitCode === null && this.proc.signalCode === null) {
      this.proc.kill("SIGKILL");
      await this.exited;
    }
    rmSync(this.dir, { recursive: true, force: true });
  }

  /** Call the HTTP API with a publish-scoped token; returns {status, body}. */
  async api(method, path, body) {
    const response = await fetch(this.base + path, {
      method,
      headers: { Authorization: `Bearer ${token("backend", { scope: "publish notify" })}`, "Content-Type": "application/json" },
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    const text = await response.text();
    let parsed = text;
    try {
      parsed = JSON.parse(text);
    } catch {
      // not JSON
    }
    return { status: response.status, body: parsed, headers: response.headers };
  }
}
