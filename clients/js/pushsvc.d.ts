// Type declarations for pushsvc.js (the pushsvc JavaScript client).

/** Locally chosen close code: no pong (or any frame) within `pongTimeout`. */
export const CLOSE_DEAD: 4900;
/** Locally chosen close code: no `welcome` within `connectTimeout`. */
export const CLOSE_CONNECT_TIMEOUT: 4901;
/** Locally chosen close code: the browser went offline. */
export const CLOSE_OFFLINE: 4902;

/** A token, or a function giving a fresh one (called once at a time). */
export type TokenSource = string | (() => string | Promise<string>);

export type ConnectionState = "idle" | "connecting" | "open" | "reconnecting" | "offline" | "closed";

/** Why a send was rejected: a server error code or one of the client's own. */
export type PushErrorCode =
  | "bad_request"
  | "unknown_type"
  | "forbidden"
  | "rate_limited"
  | "too_large"
  | "internal"
  | "unavailable"
  | "timeout"
  | "outbox_full"
  | "connection_lost"
  | "closed"
  | "left"
  | "token"
  | "gave_up"
  | "push_disabled"
  | (string & {});

export class PushError extends Error {
  constructor(code: string, message: string, frame?: Frame);
  readonly name: "PushError";
  readonly code: PushErrorCode;
  /** The server's `error` frame, when there was one. */
  readonly frame?: ErrorFrame;
  /** Seconds, from `rate_limited` and `unavailable` errors. */
  readonly retryAfter?: number;
}

export interface PushClientOptions {
  token: TokenSource;
  /** WebSocket constructor; default `globalThis.WebSocket` (Node 20: pass `ws`). */
  WebSocket?: new (url: string, protocols?: string | string[]) => WebSocket;
  protocols?: string | string[];
  /** Backoff base and cap in ms (full jitter: random(0, min(maxDelay, minDelay·2^n))). Default 500, 30000. */
  minDelay?: number;
  maxDelay?: number;
  /** Reconnect attempts in a row before giving up; default Infinity. */
  maxAttempts?: number;
  /** After close 1008, wait at least this (plus up to as much again at random), ms; default 15000. */
  policyDelay?: number;
  /** Random ms added to the delay a 1001 close reason asks for; default 1000. */
  drainJitter?: number;
  /** ms from connecting to the `welcome`; default 10000. */
  connectTimeout?: number;
  /** ms for a send's reply, time in the outbox included; default 10000. */
  sendTimeout?: number;
  /** Sends kept while disconnected; default 100. */
  outboxSize?: number;
  /** "auto" (default): ack `ack: true` messages after the handlers ran; "manual": call `ack()`. */
  ackMode?: "auto" | "manual";
  /** ms to batch acks into one frame; default 20. */
  ackDelay?: number;
  /** Message ids remembered to drop duplicates; default 1000. */
  dedupeSize?: number;
  /** ms of silence before an application `ping`; default half the welcome's `heartbeat`. */
  pingInterval?: number;
  /** ms to wait for the `pong` (or any frame) before the connection counts as dead; default 10000. */
  pongTimeout?: number;
  /** Seconds before `exp` to refresh the token in-band (`auth`); 0 disables; default 30. */
  refreshBefore?: number;
  /** Connect in the constructor; default true. */
  autoConnect?: boolean;
  /** Source of `online`/`offline` events; default `window` in browsers. */
  network?: EventTarget;
  /** `fetch` for `vapidPublicKey()`; default `globalThis.fetch`. */
  fetch?: typeof fetch;
}

export interface Frame {
  type: string;
  [field: string]: unknown;
}

export interface WelcomeFrame extends Frame {
  type: "welcome";
  message: string;
  user: string;
  session: string;
  heartbeat: number;
  /** Present when the server has Web Push enabled (`push.enabled`). */
  push?: { vapid_public_key: string };
}

/** What `subscribePush` needs of a ServiceWorkerRegistration. */
export interface PushRegistration {
  pushManager: {
    getSubscription(): Promise<PushSubscription | null>;
    subscribe(options: { userVisibleOnly: boolean; applicationServerKey: Uint8Array }): Promise<PushSubscription>;
  };
}

export interface ChatFrame extends Frame {
  /** Position in the room's history (absent when the room keeps none). */
  offset?: number;
  epoch?: string;
  type: "chat";
  id: string;
  room: string;
  user: string;
  name?: string;
  text: string;
  timestamp: number;
}

export interface PrivateFrame extends Frame {
  type: "private";
  id: string;
  from: string;
  to: string;
  text: string;
  timestamp: number;
  ack: true;
}

export interface NotificationFrame extends Frame {
  type: "notification";
  id: string;
  title: string;
  message: string;
  data: Record<string, unknown>;
  timestamp: number;
  ack: true;
}

export interface PresenceFrame extends Frame {
  type: "presence";
  room: string;
  event: "join" | "leave";
  user: string;
}

export interface ReplyFrame extends Frame {
  type: "reply";
  ref: string;
  ok: true;
  id?: string;
  /** `join`/`leave` replies: the room. */
  room?: string;
  /** `join` replies: the room's users so far, sorted (absent above chat.presence_max_members). */
  users?: string[];
  /** `join` replies: the room's history position (absent when the room keeps no history). */
  offset?: number;
  epoch?: string;
  /** `join` with `since` (a rejoin): whether every missed message follows this reply. */
  recovered?: boolean;
  recovered_count?: number;
  /** When not recovered: "epoch_changed" | "too_far_behind" | "history_expired" | "history_disabled" | "unavailable". */
  reason?: string;
}

/** What the "recovery" event tells after a rejoin with `since`. */
export interface Recovery {
  room: string;
  /** false: messages were lost meanwhile; reload the room (e.g. the history API). */
  recovered: boolean;
  /** Messages replayed (they follow, in order, before live ones). */
  recoveredCount: number;
  reason: string | null;
}

export interface ErrorFrame extends Frame {
  type: "error";
  code: string;
  message: string;
  ref?: string;
  retry_after?: number;
}

export interface FrameMap {
  chat: ChatFrame;
  private: PrivateFrame;
  notification: NotificationFrame;
  presence: PresenceFrame;
}

export interface LifecycleEvents {
  open: (welcome: WelcomeFrame) => void;
  /** `state` is already the next one: `reconnecting`, `offline` or `closed`. */
  close: (code: number, reason: string) => void;
  /** Server `error` frames without a pending send, failing handlers, token provider failures. */
  error: (error: Error) => void;
  reconnecting: (attempt: number, delay: number) => void;
  /** After a room was rejoined with `since`: recovered, or why not. */
  recovery: (recovery: Recovery) => void;
  /** The network went offline (after the `close` of an open socket): no reconnect attempts until `online`. */
  offline: () => void;
  /** The network is back: an `offline` client connects at once (state `connecting`, no backoff). */
  online: () => void;
  /** Every frame dispatched to handlers (not replies, errors or pongs). */
  message: (frame: Frame) => void | Promise<void>;
}

export type Unsubscribe = () => void;

export class PushClient {
  constructor(url: string, options: PushClientOptions);
  readonly url: string;
  readonly state: ConnectionState;
  /** The last `welcome` frame. */
  readonly welcome: WelcomeFrame | null;
  /** Rooms joined; rejoined after every reconnect. */
  readonly rooms: ReadonlySet<string>;
  /** room -> the last room message's offset and epoch (sent as `since` on rejoin). */
  readonly positions: ReadonlyMap<string, { offset: number; epoch: string }>;

  on<K extends keyof LifecycleEvents>(type: K, handler: LifecycleEvents[K]): Unsubscribe;
  on<K extends keyof FrameMap>(type: K, handler: (frame: FrameMap[K]) => void | Promise<void>): Unsubscribe;
  on(type: string, handler: (frame: Frame) => void | Promise<void>): Unsubscribe;
  /** Remove one handler, or all of a type without `handler`. */
  off(type: string, handler?: (...args: any[]) => unknown): void;

  /** Resolves with the `reply` for this send's `ref`; rejects with a PushError. */
  send(type: string, fields?: Record<string, unknown>, options?: { timeout?: number }): Promise<ReplyFrame>;
  join(room: string): Promise<ReplyFrame>;
  leave(room: string): Promise<ReplyFrame | null>;
  /** Acknowledge messages (ids or frames); needed with `ackMode: "manual"`. */
  ack(...ids: Array<string | { id: string } | Array<string | { id: string }>>): void;
  /** The server's VAPID public key, base64url (from `welcome`, else the HTTP endpoint). */
  vapidPublicKey(): Promise<string>;
  /** Subscribe the browser (`pushManager.subscribe`) and send `push_subscribe`. */
  subscribePush(registration: PushRegistration): Promise<PushSubscription>;
  /** Send `push_unsubscribe` and unsubscribe the browser; false when there was none. */
  unsubscribePush(registration: PushRegistration): Promise<boolean>;
  /** A fresh token from the provider; concurrent calls share one call. */
  refreshToken(): Promise<string>;
  connect(): void;
  /** Close for good; queued and pending sends are rejected with "closed". */
  close(code?: number, reason?: string): void;
}

/** The delay in ms a 1001 close reason asks for, or null. */
export function drainDelay(reason: string): number | null;
/** A JWT's payload, unverified (to read `exp`), or null. */
export function tokenClaims(token: string): Record<string, unknown> | null;

export default PushClient;
