// pushsvc JavaScript client: one dependency-free ES module for browsers and Node.
// Wire contract: docs/protocol.md (PROTOCOL v1 plus pushsvc's extensions).

/** Close codes after which the client does not reconnect by itself. */
const NO_RECONNECT = new Set([4003, 1009]);
/** Locally chosen close code: no pong (or any frame) in time. */
export const CLOSE_DEAD = 4900;
/** Locally chosen close code: no welcome within the connect timeout. */
export const CLOSE_CONNECT_TIMEOUT = 4901;
/** Locally chosen close code: the browser went offline. */
export const CLOSE_OFFLINE = 4902;

const DRAIN_DELAY = /reconnect in ([0-9]+(?:\.[0-9]+)?)s/;

const DEFAULTS = {
  protocols: undefined,
  minDelay: 500, // ms, backoff base
  maxDelay: 30000, // ms, backoff cap
  maxAttempts: Infinity, // reconnect attempts in a row before giving up
  policyDelay: 15000, // ms, at least this long after close 1008
  drainJitter: 1000, // ms, random extra on top of the 1001 reason's delay
  connectTimeout: 10000, // ms from the socket opening to the welcome
  sendTimeout: 10000, // ms for a send's reply, queued time included
  outboxSize: 100, // sends kept while disconnected
  ackMode: "auto", // "auto": ack after the handlers ran; "manual": call client.ack()
  ackDelay: 20, // ms to batch acks into one frame
  dedupeSize: 1000, // message ids remembered to drop duplicates
  pingInterval: undefined, // ms of silence before an application ping (default: half the heartbeat)
  pongTimeout: 10000, // ms to wait for the pong (or any frame) before the connection counts as dead
  refreshBefore: 30, // s before exp to refresh the token in-band; 0 disables
  autoConnect: true,
  network: undefined, // EventTarget with online/offline events (default: window in browsers)
};

/** A rejected send or a server `error` frame. */
export class PushError extends Error {
  /**
   * @param {string} code
   * @param {string} message
   * @param {object} [frame]
   */
  constructor(code, message, frame) {
    super(message);
    this.name = "PushError";
    this.code = code;
    this.frame = frame;
    if (frame && typeof frame.retry_after === "number") this.retryAfter = frame.retry_after;
  }
}

/** The payload of a JWT (no verification: only to read `exp`), or null. */
export function tokenClaims(token) {
  try {
    const part = String(token).split(".")[1];
    const b64 = part.replace(/-/g, "+").replace(/_/g, "/");
    const padded = b64 + "===".slice((b64.length + 3) % 4);
    const text =
      typeof atob === "function"
        ? decodeURIComponent(
            Array.from(atob(padded), (c) => "%" + c.charCodeAt(0).toString(16).padStart(2, "0")).join(""),
          )
        : Buffer.from(padded, "base64").toString("utf8");
    const claims = JSON.parse(text);
    return claims && typeof claims === "object" ? claims : null;
  } catch {
    return null;
  }
}

/** The delay in ms a 1001 close reason asks for ("server draining; reconnect in 2.5s"), or null. */
export function drainDelay(reason) {
  const match = DRAIN_DELAY.exec(String(reason || ""));
  return match ? Math.round(parseFloat(match[1]) * 1000) : null;
}

export class PushClient {
  /**
   * @param {string} url ws:// or wss:// URL of /ws
   * @param {object} options see pushsvc.d.ts
   */
  constructor(url, options = {}) {
    if (!options.token) throw new TypeError("PushClient: options.token is required");
    this.url = url;
    this.options = { ...DEFAULTS, ...options };
    this.WebSocket = options.WebSocket || globalThis.WebSocket;
    if (!this.WebSocket) throw new TypeError("PushClient: no WebSocket; pass options.WebSocket");
    /** "idle" | "connecting" | "open" | "reconnecting" | "offline" | "closed" */
    this.state = "idle";
    /** The last welcome frame. */
    this.welcome = null;
    /** Rooms the client is in (rejoined after every reconnect). */
    this.rooms = new Set();
    /** room -> {offset, epoch} of the last room message seen: sent as `since` on rejoin. */
    this.positions = new Map();
    this._handlers = new Map();
    this._ws = null;
    this._attempt = 0;
    this._refCounter = 0;
    this._pending = new Map(); // ref -> {resolve, reject, timer}
    this._outbox = []; // {frame, resolve, reject, timer}
    this._roomWaiters = new Map(); // room -> [{resolve, reject}]
    this._joining = new Set(); // rooms with a join request in flight
    this._seen = new Map(); // id -> acked (bool), insertion-ordered
    this._ackQueue = [];
    this._ackTimer = null;
    this._timers = new Set();
    this._reconnectTimer = null;
    this._pingTimer = null;
    this._pongTimer = null;
    this._refreshTimer = null;
    this._connectTimer = null;
    this._lastFrame = 0;
    this._staticToken = typeof options.token === "string" ? options.token : null;
    this._token = this._staticToken;
    this._tokenFn = typeof options.token === "function" ? options.token : null;
    this._tokenPromise = null;
    this._tokenStale = false;
    this._closedByUser = false;
    this._online = true;
    this._network = this.options.network || (typeof window !== "undefined" ? window : null);
    this._listening = false;
    this._onOnline = () => this._setOnline(true);
    this._onOffline = () => this._setOnline(false);
    if (this._network && !this.options.network && typeof navigator !== "undefined" && navigator.onLine === false) {
      this._online = false;
    }
    if (this.options.autoConnect) this.connect();
  }

  // -- events ------------------------------------------------------------------------

  /** Add a handler for a frame type, "message" (every frame) or a lifecycle event. */
  on(type, handler) {
    if (!this._handlers.has(type)) this._handlers.set(type, new Set());
    this._handlers.get(type).add(handler);
    return () => this.off(type, handler);
  }

  off(type, handler) {
    const set = this._handlers.get(type);
    if (!set) return;
    if (handler) set.delete(handler);
    else set.clear();
  }

  _emit(type, ...args) {
    const set = this._handlers.get(type);
    if (!set) return;
    for (const handler of [...set]) {
      try {
        handler(...args);
      } catch (error) {
        if (type !== "error") this._emit("error", error);
      }
    }
  }

  // -- connecting --------------------------------------------------------------------

  /** Connect (again) now; called by the constructor unless autoConnect is false. */
  connect() {
    if (this.state === "connecting" || this.state === "open") return;
    this._closedByUser = false;
    this._listen(true);
    clearTimeout(this._reconnectTimer);
    this._reconnectTimer = null;
    if (!this._online) {
      this.state = "offline";
      return;
    }
    this.state = "connecting";
    this._open();
  }

  async _open() {
    let token;
    try {
      token = await this._getToken(this._tokenStale || this._tokenExpiring(token));
      this._tokenStale = false;
    } catch (error) {
      if (this.state !== "connecting") return;
      this._emit("error", new PushError("token", `token provider failed: ${error && error.message}`));
      this.state = "reconnecting";
      this._scheduleReconnect(null);
      return;
    }
    if (this.state !== "connecting" || this._closedByUser) return;
    const sep = this.url.includes("?") ? "&" : "?";
    let ws;
    try {
      ws = new this.WebSocket(`${this.url}${sep}access_token=${encodeURIComponent(token)}`, this.options.protocols);
    } catch (error) {
      this._emit("error", error);
      this.state = "reconnecting";
      this._scheduleReconnect(null);
      return;
    }
    this._ws = ws;
    ws.onopen = () => {
      this._lastFrame = Date.now();
    };
    ws.onmessage = (event) => this._onMessage(ws, event.data);
    ws.onerror = () => {
      // the close event follows; browsers give no detail here
    };
    ws.onclose = (event) => this._onClose(ws, event.code, event.reason || "");
    this._connectTimer = setTimeout(() => {
      if (this._ws === ws && this.state === "connecting") this._drop(ws, CLOSE_CONNECT_TIMEOUT, "connect timeout");
    }, this.options.connectTimeout);
  }

  _onWelcome(ws, frame) {
    clearTimeout(this._connectTimer);
    this.welcome = frame;
    this.state = "open";
    this._attempt = 0;
    this._startPing(frame);
    this._scheduleRefresh();
    // Rejoin first: frames run in order on a connection, so queued chats find their room.
    for (const room of [...this.rooms]) this._sendJoin(room);
    const queued = this._outbox.splice(0);
    for (const item of queued) this._transmit(item);
    this._emit("open", frame);
  }

  _onClose(ws, code, reason) {
    if (ws !== this._ws) return;
    const wasOpen = this.state === "open";
    this._ws = null;
    this._stopTimers();
    ws.onopen = ws.onmessage = ws.onclose = null;
    // Not null: Node's `ws` emits "error" after a close or terminate during the handshake,
    // and an "error" without a listener is an uncaught exception.
    ws.onerror = () => {};
    this._failPending("connection_lost", `connection closed (${code}) before the reply; not resent`);
    // The state is the one after the close already, so close handlers can show it.
    if (this._closedByUser || NO_RECONNECT.has(code)) this.state = "closed";
    else this.state = this._online ? "reconnecting" : "offline";
    this._emit("close", code, reason);
    if (this._closedByUser) {
      this.state = "closed"; // also when a close handler called close()
      return;
    }
    if (NO_RECONNECT.has(code)) {
      this._failAll("closed", `closed by the server (${code}${reason ? `: ${reason}` : ""}); not reconnecting`);
      return;
    }
    if (!this._online) return;
    // 4001: expired or revoked. A handshake refused again and again (a 401 shows as 1006
    // in browsers) may be a revoked token too: from the second failure on, fetch a new one.
    if (code === 4001 || (!wasOpen && this._attempt >= 1)) this._tokenStale = true;
    if (this.state !== "reconnecting") return; // a close handler called connect()
    this._scheduleReconnect(code, reason);
  }

  _scheduleReconnect(code, reason) {
    const o = this.options;
    if (this._attempt >= o.maxAttempts) {
      this.state = "closed";
      this._failAll("closed", "gave up reconnecting");
      this._emit("error", new PushError("gave_up", `gave up after ${this._attempt} attempts`));
      return;
    }
    this._attempt += 1;
    const cap = Math.min(o.maxDelay, o.minDelay * 2 ** (this._attempt - 1));
    let delay = Math.random() * cap; // full jitter
    if (code === 1008) delay = Math.max(delay, o.policyDelay + Math.random() * o.policyDelay);
    if (code === 1001) {
      const asked = drainDelay(reason);
      if (asked !== null) delay = asked + Math.random() * o.drainJitter;
    }
    delay = Math.round(delay);
    this._emit("reconnecting", this._attempt, delay);
    clearTimeout(this._reconnectTimer);
    this._reconnectTimer = setTimeout(() => {
      this._reconnectTimer = null;
      if (this.state === "reconnecting") {
        this.state = "idle";
        this.connect();
      }
    }, delay);
  }

  _listen(on) {
    const net = this._network;
    if (!net || typeof net.addEventListener !== "function" || on === this._listening) return;
    this._listening = on;
    const method = on ? "addEventListener" : "removeEventListener";
    net[method]("online", this._onOnline);
    net[method]("offline", this._onOffline);
  }

  _setOnline(online) {
    if (online === this._online) return;
    this._online = online;
    if (!online) {
      // Between reconnect attempts there is no socket to close: the event says it.
      clearTimeout(this._reconnectTimer);
      this._reconnectTimer = null;
      if (this._ws) this._drop(this._ws, CLOSE_OFFLINE, "offline");
      else if (this.state !== "closed" && this.state !== "idle") this.state = "offline";
      this._emit("offline");
    } else {
      if (this.state === "offline") {
        this._attempt = 0;
        this.state = "idle";
        this.connect();
      }
      this._emit("online");
    }
  }

  /** Close the socket now (no waiting for a dead peer) and handle it as closed with `code`. */
  _drop(ws, code, reason) {
    try {
      if (typeof ws.terminate === "function") ws.terminate();
      else ws.close(code, reason);
    } catch {
      // already closed
    }
    this._onClose(ws, code, reason);
  }

  /** Close for good: queued and pending sends are rejected with "closed". */
  close(code = 1000, reason = "") {
    this._closedByUser = true;
    clearTimeout(this._reconnectTimer);
    this._reconnectTimer = null;
    this._listen(false);
    this._failAll("closed", "client closed");
    const ws = this._ws;
    if (ws) {
      try {
        ws.close(code, reason);
      } catch {
        // already closing
      }
      this._onClose(ws, code, reason);
    } else {
      this._stopTimers();
      this.state = "closed";
    }
  }

  // -- tokens --------------------------------------------------------------------------

  _tokenExpiring() {
    if (!this._token) return true;
    const claims = tokenClaims(this._token);
    if (!claims || typeof claims.exp !== "number") return false;
    return claims.exp * 1000 - Date.now() < 5000;
  }

  async _getToken(force) {
    if (!this._tokenFn) return this._token;
    if (!force && this._token) return this._token;
    return this.refreshToken();
  }

  /** Get a fresh token from the provider; concurrent calls share one provider call. */
  refreshToken() {
    if (!this._tokenFn) return Promise.resolve(this._token);
    if (!this._tokenPromise) {
      this._tokenPromise = Promise.resolve()
        .then(() => this._tokenFn())
        .then(
          (token) => {
            if (typeof token !== "string" || !token) throw new TypeError("token provider returned no string");
            this._token = token;
            this._tokenPromise = null;
            return token;
          },
          (error) => {
            this._tokenPromise = null;
            throw error;
          },
        );
    }
    return this._tokenPromise;
  }

  _scheduleRefresh() {
    clearTimeout(this._refreshTimer);
    this._refreshTimer = null;
    if (!this._tokenFn || !this.options.refreshBefore) return;
    const claims = tokenClaims(this._token);
    if (!claims || typeof claims.exp !== "number") return;
    const left = claims.exp * 1000 - Date.now();
    const before = Math.min(this.options.refreshBefore * 1000, left / 2);
    const wait = Math.max(0, left - before);
    this._refreshTimer = setTimeout(() => this._refreshInBand(), wait);
  }

  async _refreshInBand() {
    this._refreshTimer = null;
    if (this.state !== "open") return;
    try {
      const token = await this.refreshToken();
      if (this.state !== "open") return;
      await this._request({ type: "auth", token }, this.options.sendTimeout);
      this._scheduleRefresh();
    } catch (error) {
      this._emit("error", error instanceof PushError ? error : new PushError("token", String(error && error.message)));
      if (this.state === "open") {
        // try again soon; the server closes with 4001 at exp and the reconnect gets a new token
        this._refreshTimer = setTimeout(() => this._refreshInBand(), 2000);
      }
    }
  }

  // -- sending -----------------------------------------------------------------------

  /**
   * Send a command; resolves with the server's `reply`, rejects with a PushError
   * (the server's `error`, "timeout", "outbox_full", "connection_lost" or "closed").
   */
  send(type, fields = {}, options = {}) {
    const frame = { ...fields, type };
    const timeout = options.timeout ?? this.options.sendTimeout;
    if (this.state === "closed") {
      return Promise.reject(new PushError("closed", "client is closed"));
    }
    if (this.state === "open") return this._request(frame, timeout);
    if (this._outbox.length >= this.options.outboxSize) {
      return Promise.reject(new PushError("outbox_full", `outbox full (${this.options.outboxSize} queued sends)`));
    }
    return new Promise((resolve, reject) => {
      const item = { frame, resolve, reject, timer: null, deadline: Date.now() + timeout };
      item.timer = setTimeout(() => {
        const index = this._outbox.indexOf(item);
        if (index >= 0) this._outbox.splice(index, 1);
        reject(new PushError("timeout", `no connection within ${timeout} ms; not sent`));
      }, timeout);
      this._outbox.push(item);
    });
  }

  _request(frame, timeout) {
    return new Promise((resolve, reject) => {
      this._transmit({ frame, resolve, reject, timer: null, deadline: Date.now() + timeout });
    });
  }

  /** Send a queued or new item now; its timer keeps running until the reply. */
  _transmit(item) {
    const ref = `r${++this._refCounter}`;
    clearTimeout(item.timer);
    const left = Math.max(1, item.deadline - Date.now());
    const entry = { resolve: item.resolve, reject: item.reject, timer: null };
    entry.timer = setTimeout(() => {
      if (this._pending.get(ref) === entry) {
        this._pending.delete(ref);
        item.reject(new PushError("timeout", `no reply for ${item.frame.type} within the timeout`));
      }
    }, left);
    this._pending.set(ref, entry);
    if (!this._write({ ...item.frame, ref })) {
      clearTimeout(entry.timer);
      this._pending.delete(ref);
      item.reject(new PushError("connection_lost", "socket not open; not sent"));
    }
  }

  _write(frame) {
    const ws = this._ws;
    if (!ws || ws.readyState !== 1) return false;
    try {
      ws.send(JSON.stringify(frame));
      return true;
    } catch (error) {
      this._emit("error", error);
      return false;
    }
  }

  _failPending(code, message) {
    const pending = [...this._pending.values()];
    this._pending.clear();
    for (const entry of pending) {
      clearTimeout(entry.timer);
      entry.reject(new PushError(code, message));
    }
  }

  _failAll(code, message) {
    this._failPending(code, message);
    for (const item of this._outbox.splice(0)) {
      clearTimeout(item.timer);
      item.reject(new PushError(code, `${message}; not sent`));
    }
    for (const [room, waiters] of this._roomWaiters) {
      this._roomWaiters.delete(room);
      for (const w of waiters) w.reject(new PushError(code, message));
    }
  }

  // -- rooms ---------------------------------------------------------------------------

  /**
   * Join a room now, or on the next connection; it is rejoined after every reconnect,
   * with `since` the last room message seen: the server replays what was missed, and
   * the "recovery" event gets {room, recovered, recoveredCount, reason}
   * (recovered false: something was lost, reload the room).
   */
  join(room) {
    this.rooms.add(room);
    const promise = new Promise((resolve, reject) => {
      if (!this._roomWaiters.has(room)) this._roomWaiters.set(room, []);
      this._roomWaiters.get(room).push({ resolve, reject });
    });
    if (this.state === "closed") this._settleRoom(room, new PushError("closed", "client is closed"));
    else if (this.state === "open") this._sendJoin(room);
    return promise;
  }

  _sendJoin(room) {
    if (this._joining.has(room)) return; // one join in flight per room: its reply settles every waiter
    this._joining.add(room);
    const frame = { type: "join", room };
    const position = this.positions.get(room);
    if (position) frame.since = { offset: position.offset, epoch: position.epoch };
    this._request(frame, this.options.sendTimeout).then(
      (reply) => {
        this._joining.delete(room);
        this._settleRoom(room, null, reply);
      },
      (error) => {
        this._joining.delete(room);
        if (error.code !== "connection_lost" && error.code !== "closed") {
          // refused (forbidden, bad_request) or timed out: forget the room
          if (error.code !== "timeout") this.rooms.delete(room);
          this._emit("error", error);
        }
        if (error.code !== "connection_lost") this._settleRoom(room, error);
      },
    );
  }

  _settleRoom(room, error, reply) {
    const waiters = this._roomWaiters.get(room) || [];
    this._roomWaiters.delete(room);
    for (const w of waiters) (error ? w.reject(error) : w.resolve(reply));
  }

  /** Leave a room (and stop rejoining it). */
  leave(room) {
    this.rooms.delete(room);
    this.positions.delete(room);
    this._settleRoom(room, new PushError("left", `left ${room} before joining it`));
    if (this.state !== "open") return Promise.resolve(null);
    return this._request({ type: "leave", room }, this.options.sendTimeout);
  }

  // -- receiving -----------------------------------------------------------------------

  _onMessage(ws, data) {
    if (ws !== this._ws) return;
    this._lastFrame = Date.now();
    clearTimeout(this._pongTimer);
    this._pongTimer = null;
    if (typeof data !== "string") data = String(data);
    let frame;
    try {
      frame = JSON.parse(data);
    } catch {
      return;
    }
    if (!frame || typeof frame !== "object" || typeof frame.type !== "string") return;
    const type = frame.type;
    if (type === "welcome") {
      this._onWelcome(ws, frame);
    } else if ((type === "reply" || type === "error") && typeof frame.ref === "string" && this._pending.has(frame.ref)) {
      const entry = this._pending.get(frame.ref);
      this._pending.delete(frame.ref);
      clearTimeout(entry.timer);
      if (type === "reply" && !("publications" in frame)) this._joined(frame);
      if (type === "reply") entry.resolve(frame);
      else entry.reject(new PushError(frame.code || "error", frame.message || "error", frame));
      return;
    } else if (type === "error") {
      this._emit("error", new PushError(frame.code || "error", frame.message || "error", frame));
      return;
    } else if (type === "pong") {
      return;
    }
    if (!this._advance(frame)) return; // a room message seen already (replayed on rejoin)
    if (typeof frame.id === "string") {
      if (this._seen.has(frame.id)) {
        // a redelivery: ack it again when it was acked (the ack may have been lost)
        if (frame.ack === true && this._seen.get(frame.id)) this._queueAck(frame.id);
        return;
      }
      this._remember(frame.id, false);
    }
    this._dispatch(frame);
  }

  // A join's reply: note the room's position; tell whether what was missed came back.
  _joined(reply) {
    const { room, offset, epoch, recovered } = reply;
    if (typeof room !== "string" || typeof offset !== "number" || typeof epoch !== "string") return;
    if (recovered !== true) {
      // when recovered, the replayed messages that follow move the position
      const known = this.positions.get(room);
      if (!known || known.epoch !== epoch || known.offset < offset) this.positions.set(room, { offset, epoch });
    }
    if (typeof recovered === "boolean") {
      this._emit("recovery", { room, recovered, recoveredCount: reply.recovered_count || 0, reason: reply.reason || null });
    }
  }

  // Move a room's position to this message; false when it was seen already.
  _advance(frame) {
    const { room, offset, epoch } = frame;
    if (typeof room !== "string" || typeof offset !== "number" || typeof epoch !== "string") return true;
    const known = this.positions.get(room);
    if (known && known.epoch === epoch && offset <= known.offset) return false;
    this.positions.set(room, { offset, epoch });
    return true;
  }

  _remember(id, acked) {
    this._seen.delete(id);
    this._seen.set(id, acked);
    while (this._seen.size > this.options.dedupeSize) {
      this._seen.delete(this._seen.keys().next().value);
    }
  }

  async _dispatch(frame) {
    const handlers = [...(this._handlers.get(frame.type) || []), ...(this._handlers.get("message") || [])];
    let failed = false;
    const results = await Promise.allSettled(handlers.map((h) => Promise.resolve().then(() => h(frame))));
    for (const result of results) {
      if (result.status === "rejected") {
        failed = true;
        this._emit("error", result.reason);
      }
    }
    if (frame.ack === true && typeof frame.id === "string") {
      if (failed) {
        this._seen.delete(frame.id); // let the redelivery run the handlers again
      } else if (this.options.ackMode === "auto") {
        this.ack(frame.id);
      }
    }
  }

  /** Acknowledge messages by id (or the frames themselves); batched into one `ack` frame. */
  ack(...ids) {
    for (let id of ids.flat()) {
      if (id && typeof id === "object") id = id.id;
      if (typeof id !== "string") continue;
      this._remember(id, true);
      this._queueAck(id);
    }
  }

  _queueAck(id) {
    if (!this._ackQueue.includes(id)) this._ackQueue.push(id);
    if (this._ackTimer) return;
    this._ackTimer = setTimeout(() => {
      this._ackTimer = null;
      while (this._ackQueue.length && this.state === "open") {
        const ids = this._ackQueue.splice(0, 1000);
        this._write({ type: "ack", ids });
      }
      // not connected: the server redelivers unacked messages and the duplicate is acked then
      this._ackQueue = [];
    }, this.options.ackDelay);
  }

  // -- Web Push ------------------------------------------------------------------------

  /**
   * The server's VAPID public key (base64url): from `welcome` when push is enabled,
   * else `GET /api/v1/push/vapid-public-key` on the server's origin.
   */
  async vapidPublicKey() {
    const announced = this.welcome && this.welcome.push && this.welcome.push.vapid_public_key;
    if (announced) return announced;
    const url = new URL("/api/v1/push/vapid-public-key", this.url.replace(/^ws/, "http"));
    const response = await (this.options.fetch || globalThis.fetch)(url.href);
    if (!response.ok) throw new PushError("push_disabled", `Web Push is not enabled on the server (${response.status})`);
    return (await response.json()).public_key;
  }

  /**
   * Subscribe this browser to Web Push and register the subscription with pushsvc
   * (`push_subscribe`). `registration` is a ServiceWorkerRegistration (its `pushManager`).
   * An existing subscription made with another key is replaced. Resolves with the
   * PushSubscription; rejects with a PushError (e.g. `forbidden`) or the browser's error.
   * Call it after every connect: a known subscription is just `updated`.
   */
  async subscribePush(registration) {
    const key = await this.vapidPublicKey();
    const applicationServerKey = base64UrlBytes(key);
    const manager = registration.pushManager;
    let subscription = await manager.getSubscription();
    const current = subscription && subscription.options && subscription.options.applicationServerKey;
    if (subscription && current && !sameBytes(new Uint8Array(current), applicationServerKey)) {
      await subscription.unsubscribe();
      subscription = null;
    }
    if (!subscription) subscription = await manager.subscribe({ userVisibleOnly: true, applicationServerKey });
    const json = typeof subscription.toJSON === "function" ? subscription.toJSON() : subscription;
    await this.send("push_subscribe", { subscription: { endpoint: json.endpoint, keys: json.keys } });
    return subscription;
  }

  /** Forget this browser's subscription, on the server (`push_unsubscribe`) and in the browser. */
  async unsubscribePush(registration) {
    const subscription = await registration.pushManager.getSubscription();
    if (!subscription) return false;
    await this.send("push_unsubscribe", { endpoint: subscription.endpoint });
    await subscription.unsubscribe();
    return true;
  }

  // -- heartbeat -----------------------------------------------------------------------

  _startPing(welcome) {
    clearInterval(this._pingTimer);
    const heartbeat = typeof welcome.heartbeat === "number" && welcome.heartbeat > 0 ? welcome.heartbeat * 1000 : 50000;
    const interval = this.options.pingInterval ?? heartbeat / 2;
    const tick = Math.max(50, Math.min(interval, 1000));
    this._pingTimer = setInterval(() => {
      if (this.state !== "open" || this._pongTimer) return;
      if (Date.now() - this._lastFrame < interval) return;
      const ws = this._ws;
      this._write({ type: "ping" });
      this._pongTimer = setTimeout(() => {
        this._pongTimer = null;
        if (this._ws === ws && ws) this._drop(ws, CLOSE_DEAD, "no pong");
      }, this.options.pongTimeout);
    }, tick);
  }

  _stopTimers() {
    clearTimeout(this._connectTimer);
    clearInterval(this._pingTimer);
    clearTimeout(this._pongTimer);
    clearTimeout(this._refreshTimer);
    this._connectTimer = this._pingTimer = this._pongTimer = this._refreshTimer = null;
  }
}

/** base64url (padding optional) to bytes, as `applicationServerKey` wants them. */
function base64UrlBytes(text) {
  const base64 = text.replace(/-/g, "+").replace(/_/g, "/") + "===".slice((text.length + 3) % 4);
  const binary = atob(base64);
  return Uint8Array.from(binary, (c) => c.charCodeAt(0));
}

function sameBytes(a, b) {
  return a.length === b.length && a.every((byte, i) => byte === b[i]);
}

export default PushClient;
