"""PushService: subscriptions, when to push, a bounded queue, bounded concurrency, retries.

Fed by :meth:`PushService.accepted` for every at-least-once message the node
accepted. For each recipient, by the message's push mode:

- ``never``: nothing;
- ``always``: push now;
- ``offline`` (``notification``'s default): push now when the user has no open
  connection on any node (:class:`Presence`, one batched look-up for all the
  recipients); otherwise, when ``push.after_seconds`` > 0, push then if the
  message is still pending for the user (not acked, read from the inbox).

A push is a notification, never an ack: the message stays pending in the
inbox and is delivered over the WebSocket when the user comes back (the
client drops the duplicate by ``id``, which the push payload carries). Each
(message, subscription) is pushed once; a 429, a 5xx or no answer is retried
with exponential backoff (at least the ``Retry-After`` asked for) up to
``push.max_attempts`` and never past the message's TTL; 404 and 410 delete
the subscription. Pushes live in memory: a restart forgets those not yet
sent (the inbox still has the messages).

The work is bounded: ``push.queue_size`` jobs wait (more are dropped and
counted), ``push.concurrency`` workers send, each request is bounded by
``push.timeout``. Nothing here blocks the event loop: a slow or dead push
service only keeps workers waiting.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import time
import types
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Protocol, TypeVar

from pushsvc.config import PushConfig
from pushsvc.ops.metrics import Metrics
from pushsvc.protocol.codes import ErrorCode
from pushsvc.protocol.fields import CommandError
from pushsvc.protocol.webpush import PushOptions, SubscriptionKeys
from pushsvc.push.endpoints import EndpointPolicy, EndpointRefused
from pushsvc.push.sender import Sender, SendResult, push_payload
from pushsvc.store import (
    PendingMessage,
    PushSubscription,
    PushSubscriptionStore,
    StoreUnavailable,
    SubscribeResult,
)

log = logging.getLogger("pushsvc.push")

T = TypeVar("T")
#: Recipients whose subscriptions are read together (one group commit of the store).
READ_CHUNK = 100

#: ``result`` of a push request (``pushsvc_push_requests_total``) and of the hook.
SENT, EXPIRED, REJECTED, RETRY, GAVE_UP = "sent", "expired", "rejected", "retry", "gave_up"
#: The hook's ``result`` for a user with no subscription (a plugin may use another channel).
NO_SUBSCRIPTION = "no_subscription"
_EXPIRED_STATUSES = frozenset({404, 410})


class Presence(Protocol):
    """Which users have an open connection on any node (the node: hub and cluster registry)."""

    async def online_users(self, users: Sequence[str]) -> set[str]:
        """Those of ``users`` connected somewhere; never raises.

        When the cluster registry cannot be asked, those connected to this node.
        """
        ...


class Inbox(Protocol):
    """The read push needs of the inbox: is the message still pending for the user?"""

    async def pending(self, user: str, after_id: str, limit: int) -> list[PendingMessage]:
        """Up to ``limit`` pending deliveries of ``user`` with id > ``after_id``, oldest first."""
        ...


#: Called once per push outcome: ``(user, payload, endpoint, result)`` (the plugins' hook).
SentHook = Callable[[str, Mapping[str, Any], str, str], None]


@dataclasses.dataclass(slots=True)
class Job:
    """One message to push to one user (``subscription`` None: to each of theirs)."""

    user: str  # the recipient
    message_id: str  # the message's id (carried in the payload)
    message: Mapping[str, Any]  # the message as the client would get it (for the hook)
    payload: bytes  # the plaintext, at most MAX_PLAINTEXT bytes
    urgency: str  # Urgency header
    topic: str | None  # Topic header
    expires_at: float  # seconds since the epoch: the message's TTL end
    subscription: PushSubscription | None = None  # one endpoint, once expanded
    attempts: int = 0  # requests made so far
    queued_at: float = 0.0  # monotonic time it entered the queue (latency)


def before(message_id: str) -> str:
    """The greatest string below ``message_id`` among ids of its length (a store cursor)."""
    return message_id[:-1] + chr(ord(message_id[-1]) - 1) if message_id else ""


class PushService:
    """Web Push for the node: subscriptions and the sending machinery."""

    def __init__(
        self,
        config: PushConfig,
        sender: Sender,
        subscriptions: PushSubscriptionStore,
        inbox: Inbox,
        metrics: Metrics,
        presence: Presence,
        sent: SentHook,
    ) -> None:
        self.config = config  # push.* settings
        self.sender = sender  # encrypts, signs and POSTs
        self.policy = EndpointPolicy.from_config(config)  # which endpoints are acceptable
        self.subscriptions = subscriptions  # the store's subscription part
        self.inbox = inbox  # to see whether a message is still pending
        self.metrics = metrics  # Prometheus series
        self.presence = presence  # who is connected here
        self.sent = sent  # the pushsvc_push_sent hook
        self.queue: asyncio.Queue[Job] = asyncio.Queue(config.queue_size)  # waiting pushes
        self._workers: list[asyncio.Task[None]] = []  # push.concurrency senders
        self._timers: set[asyncio.TimerHandle] = set()  # retries and ack checks
        self._tasks: set[asyncio.Task[Any]] = set()  # ack checks in progress
        self._rand = random.Random()  # backoff jitter

    @property
    def public_key(self) -> str:
        """The VAPID public key browsers subscribe with (``applicationServerKey``)."""
        return self.sender.keys.public_key

    async def start(self) -> None:
        """Start the workers and set the subscriptions gauge."""
        self._workers = [
            asyncio.ensure_future(self._work()) for _ in range(self.config.concurrency)
        ]
        await self._count()

    async def close(self) -> None:
        """Stop: forget queued pushes and timers, stop the workers, close the HTTP client."""
        for handle in self._timers:
            handle.cancel()
        self._timers.clear()
        for task in [*self._workers, *self._tasks]:
            task.cancel()
        await asyncio.gather(*self._workers, *self._tasks, return_exceptions=True)
        self._workers = []
        self.sender.close()

    # -- subscriptions ----------------------------------------------------------------

    async def subscribe(self, user: str, keys: SubscriptionKeys) -> SubscribeResult:
        """Check the endpoint and store the subscription for ``user``.

        Raises:
            CommandError: ``forbidden`` for an endpoint that may not be fetched or
                past ``push.max_subscriptions_per_user``; ``unavailable`` when the
                store failed.
        """
        try:
            await self.policy.check(keys.endpoint)
        except EndpointRefused as exc:
            self.metrics.push_subscribe_refused.labels("endpoint").inc()
            raise CommandError(ErrorCode.FORBIDDEN, str(exc)) from exc
        subscription = PushSubscription(user, keys.endpoint, keys.p256dh, keys.auth, time.time())
        limit = self.config.max_subscriptions_per_user
        result: SubscribeResult = await self._stored(
            self.subscriptions.add_push_subscription(subscription, limit)
        )
        if result == "limit":
            self.metrics.push_subscribe_refused.labels("limit").inc()
            raise CommandError(
                ErrorCode.FORBIDDEN,
                f"at most {limit} push subscriptions per user (push.max_subscriptions_per_user)",
            )
        await self._count()
        return result

    async def unsubscribe(self, user: str, endpoint: str) -> bool:
        """Forget ``user``'s subscription ``endpoint``; whether there was one."""
        removed = await self._stored(self.subscriptions.remove_push_subscription(user, endpoint))
        if removed:
            self.metrics.push_subscriptions_deleted.labels("unsubscribed").inc()
            await self._count()
        return removed

    async def listing(self, user: str) -> list[PushSubscription]:
        """``user``'s subscriptions (raises CommandError ``unavailable``)."""
        return await self._stored(self.subscriptions.push_subscriptions(user))

    @staticmethod
    async def _stored(work: Awaitable[T]) -> T:
        try:
            return await work
        except StoreUnavailable as exc:
            raise CommandError(
                ErrorCode.UNAVAILABLE, f"store unavailable: {exc}", retry_after=1.0
            ) from exc

    async def _count(self) -> None:
        try:
            self.metrics.push_subscriptions.set(await self.subscriptions.count_push_subscriptions())
        except StoreUnavailable as exc:
            log.debug("counting push subscriptions failed: %s", exc)

    # -- feeding from the inbox ---------------------------------------------------------

    def accepted(
        self,
        recipients: Sequence[str],
        message_id: str,
        message: Mapping[str, Any],
        options: PushOptions,
        lifetime: float,
    ) -> None:
        """An at-least-once message was persisted for ``recipients``: push where due.

        ``options.mode`` is resolved already (the type's default applied);
        ``lifetime`` is the message's TTL in seconds.
        """
        mode = options.mode or "never"
        if mode == "never" or not recipients:
            return
        payload = push_payload(message_id, message)
        announced = types.MappingProxyType({"id": message_id, **message})  # for the hook
        urgency = options.urgency or self.config.urgency
        expires_at = time.time() + lifetime
        jobs = [
            Job(user, message_id, announced, payload, urgency, options.topic, expires_at)
            for user in recipients
        ]
        self._spawn(self._expand(jobs) if mode == "always" else self._route(jobs))

    async def _route(self, jobs: Sequence[Job]) -> None:
        """Push the jobs of users connected nowhere now, the others' after ``after_seconds``.

        Fails open: when presence cannot be told (the registry answers with
        this node's users then), a user is pushed, maybe in duplicate of the
        WebSocket delivery, never left without a push.
        """
        try:
            online = await self.presence.online_users([job.user for job in jobs])
        except Exception:  # a broken registry: rather a push too many than none
            log.exception("push: cannot tell who is connected; pushing to all")
            online = set()
        delay = self.config.after_seconds
        loop = asyncio.get_running_loop()
        now: list[Job] = []
        for job in jobs:
            if job.user not in online:
                now.append(job)
            elif delay > 0:
                self._later(loop, delay, self._check_unacked, job)
        if now:
            await self._expand(now)

    def _later(
        self, loop: asyncio.AbstractEventLoop, delay: float, fn: Callable[[Job], None], job: Job
    ) -> None:
        handle: asyncio.TimerHandle | None = None

        def fire() -> None:
            assert handle is not None
            self._timers.discard(handle)
            fn(job)

        handle = loop.call_later(delay, fire)
        self._timers.add(handle)

    def _spawn(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _check_unacked(self, job: Job) -> None:
        self._spawn(self._push_if_pending(job))

    async def _push_if_pending(self, job: Job) -> None:
        try:
            rows = await self.inbox.pending(job.user, before(job.message_id), 1)
        except StoreUnavailable as exc:
            log.warning("push: cannot tell whether %s was acked: %s", job.message_id, exc)
            return
        if rows and rows[0].id == job.message_id:
            await self._expand([job])

    def _enqueue(self, job: Job) -> None:
        if not job.queued_at:  # a retry keeps its first time (latency counts retries)
            job.queued_at = time.monotonic()
        try:
            self.queue.put_nowait(job)
        except asyncio.QueueFull:
            self.metrics.push_dropped.labels("queue_full").inc()
            log.warning("push queue full (push.queue_size): a push to %s dropped", job.user)

    # -- sending ------------------------------------------------------------------------

    async def _work(self) -> None:
        while True:
            job = await self.queue.get()
            assert job.subscription is not None
            try:
                await self._send(job, job.subscription)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("push to %s failed", job.user)

    async def _expand(self, jobs: Sequence[Job]) -> None:
        """Queue one push per subscription of each job's user (a slot per request only).

        Subscriptions are read for :data:`READ_CHUNK` users at a time, so a
        notification to many users costs few store transactions and users
        without subscriptions take no queue slot.
        """
        for start in range(0, len(jobs), READ_CHUNK):
            chunk = jobs[start : start + READ_CHUNK]
            reads = [self.subscriptions.push_subscriptions(job.user) for job in chunk]
            results = await asyncio.gather(*reads, return_exceptions=True)
            for job, found in zip(chunk, results, strict=True):
                if isinstance(found, BaseException):
                    log.warning("push: reading %s's subscriptions failed: %s", job.user, found)
                    self.metrics.push_dropped.labels("store").inc()
                elif not found:
                    self.sent(job.user, job.message, "", NO_SUBSCRIPTION)
                for subscription in found if isinstance(found, list) else []:
                    self._enqueue(dataclasses.replace(job, subscription=subscription))

    async def _send(self, job: Job, subscription: PushSubscription) -> None:
        remaining = job.expires_at - time.time()
        if remaining < 1:
            self._give_up(job, subscription, "expired")
            return
        ttl = int(min(self.config.ttl, remaining))
        request = self.sender.request(
            subscription, job.payload, ttl=ttl, urgency=job.urgency, topic=job.topic
        )
        job.attempts += 1
        started = time.monotonic()
        result = await self.sender.send(request)
        now = time.monotonic()
        self.metrics.push_seconds.observe(now - started)
        status = result.status
        if status in (200, 201, 202):
            self.metrics.push_requests.labels(SENT).inc()
            self.metrics.push_latency.observe(now - job.queued_at)
            self.sent(job.user, job.message, subscription.endpoint, SENT)
        elif status in _EXPIRED_STATUSES:
            self.metrics.push_requests.labels(EXPIRED).inc()
            await self._expired(job, subscription)
        elif result.refused:  # resolves to a private address now (DNS rebinding?)
            self.metrics.push_requests.labels(REJECTED).inc()
            log.warning("push to %s not sent: %s", _origin(subscription.endpoint), result.error)
            self.sent(job.user, job.message, subscription.endpoint, REJECTED)
        elif status == 429 or status >= 500 or status == 0:
            self.metrics.push_requests.labels(RETRY).inc()
            self._retry(job, subscription, result)
        else:  # 400, 401, 403 (VAPID refused), 413: sending again would not help
            self.metrics.push_requests.labels(REJECTED).inc()
            log.warning(
                "push refused by %s with %d: %s",
                _origin(subscription.endpoint),
                status,
                result.error,
            )
            self.sent(job.user, job.message, subscription.endpoint, REJECTED)

    async def _expired(self, job: Job, subscription: PushSubscription) -> None:
        """404/410: the browser unsubscribed; forget the subscription."""
        try:
            removed = await self.subscriptions.remove_push_subscription(
                subscription.user, subscription.endpoint
            )
        except StoreUnavailable as exc:
            log.warning("push: deleting an expired subscription failed: %s", exc)
            removed = False
        if removed:
            self.metrics.push_subscriptions_deleted.labels("expired").inc()
            await self._count()
        self.sent(job.user, job.message, subscription.endpoint, EXPIRED)

    def _retry(self, job: Job, subscription: PushSubscription, result: SendResult) -> None:
        config = self.config
        if job.attempts >= config.max_attempts:
            self._give_up(job, subscription, "attempts")
            return
        backoff = min(config.backoff_max, config.backoff * 2.0 ** (job.attempts - 1))
        delay = backoff * (0.8 + 0.4 * self._rand.random())
        if result.retry_after is not None:  # the push service's wish comes first
            delay = max(delay, result.retry_after)
        if time.time() + delay >= job.expires_at:
            self._give_up(job, subscription, "expired")
            return
        log.info(
            "push to %s answered %s; retry %d in %.1fs",
            _origin(subscription.endpoint),
            result.status or result.error,
            job.attempts,
            delay,
        )
        self._later(asyncio.get_running_loop(), delay, self._enqueue, job)

    def _give_up(self, job: Job, subscription: PushSubscription, why: str) -> None:
        self.metrics.push_dropped.labels(why).inc()
        self.sent(job.user, job.message, subscription.endpoint, GAVE_UP)


def _origin(endpoint: str) -> str:
    """The endpoint's scheme and host (the path identifies a browser: not logged)."""
    scheme, _, rest = endpoint.partition("://")
    return f"{scheme}://{rest.split('/', 1)[0]}"
