"""One Web Push request: the payload, its RFC 8291 encryption, RFC 8030 headers, the POST.

Encryption is http_ece's ``aes128gcm`` with a fresh ECDH key per push; the
VAPID header comes from :class:`~pushsvc.push.keys.VapidKeys` (py_vapid).
The request goes out on Tornado's asynchronous HTTP client, with the
:class:`~pushsvc.push.endpoints.GuardedResolver` and no redirects: no thread,
and nothing waits on the event loop.
"""

from __future__ import annotations

import email.utils
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import http_ece
import orjson
from cryptography.hazmat.primitives.asymmetric import ec
from tornado.httpclient import HTTPClientError, HTTPRequest
from tornado.simple_httpclient import SimpleAsyncHTTPClient

from pushsvc.protocol.webpush import b64url_decode
from pushsvc.push.endpoints import EndpointRefused, GuardedResolver
from pushsvc.push.keys import VapidKeys
from pushsvc.store import PushSubscription

#: Largest plaintext of one push: 4096 bytes (RFC 8030 §7.2) less the aes128gcm
#: header (86: salt, record size, key id) and the tag and delimiter (17), RFC 8291 §4.
MAX_PLAINTEXT = 3993
#: Largest answer body read from a push service (they answer with a few bytes).
MAX_ANSWER_BYTES = 64 * 1024
#: Fields of a message copied into its push payload, in this order.
PAYLOAD_FIELDS = ("title", "message", "text", "data")
#: Fields cut (longest first) when the payload is too large; ``data`` is dropped first.
_CUTTABLE = ("message", "text", "title")


def push_payload(message_id: str, message: Mapping[str, Any]) -> bytes:
    """The JSON a service worker receives: id, type, title, message/text, data.

    Over :data:`MAX_PLAINTEXT` bytes, ``data`` goes, then the longest of the
    texts is cut until it fits, and ``"truncated": true`` is added; the id
    always stays, so the client can fetch the whole message from its inbox.
    """
    body: dict[str, Any] = {"id": message_id, "type": message.get("type", "")}
    body.update({key: message[key] for key in PAYLOAD_FIELDS if key in message})
    encoded = orjson.dumps(body)
    if len(encoded) <= MAX_PLAINTEXT:
        return encoded
    body.pop("data", None)
    body["truncated"] = True
    while len(encoded := orjson.dumps(body)) > MAX_PLAINTEXT:
        texts = [key for key in _CUTTABLE if isinstance(body.get(key), str) and body[key]]
        if not texts:  # only the id and type left: cannot happen with bounded ids
            break
        longest = max(texts, key=lambda key: len(body[key].encode()))
        # Cut the UTF-8 bytes (JSON escapes make the text longer still: the loop goes on).
        data = body[longest].encode()
        keep = max(0, len(data) - (len(encoded) - MAX_PLAINTEXT))
        body[longest] = data[:keep].decode(errors="ignore")
    return encoded


def encrypt(plaintext: bytes, subscription: PushSubscription) -> bytes:
    """``plaintext`` encrypted for the subscription's browser (RFC 8291, ``aes128gcm``)."""
    ephemeral = ec.generate_private_key(ec.SECP256R1())
    body: bytes = http_ece.encrypt(
        plaintext,
        salt=os.urandom(16),
        private_key=ephemeral,
        dh=b64url_decode(subscription.p256dh),
        auth_secret=b64url_decode(subscription.auth),
        version="aes128gcm",
    )
    return body


@dataclass(frozen=True, slots=True)
class SendResult:
    """What the push service answered: a status (0: no answer) and its ``Retry-After``."""

    status: int  # HTTP status; 0 when the request failed (network, timeout, refused)
    retry_after: float | None = None  # seconds, from the Retry-After header
    error: str = ""  # why there was no answer, or the body of a refusal (short)
    refused: bool = False  # not sent: the host resolved to a non-public address


def retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds a ``Retry-After`` header asks for (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


class Sender:
    """Sends encrypted pushes over one asynchronous HTTP client (bounded connections)."""

    def __init__(
        self, keys: VapidKeys, *, concurrency: int, timeout: float, allow_private: bool
    ) -> None:
        self.keys = keys  # VAPID signing
        self.timeout = timeout  # seconds per request (connect included)
        self.resolver = GuardedResolver(allow_private=allow_private)  # the SSRF guard
        self.client = SimpleAsyncHTTPClient(
            force_instance=True,
            max_clients=concurrency,
            resolver=self.resolver,
            max_body_size=MAX_ANSWER_BYTES,
        )  # not the shared instance: its own resolver and limits

    def request(
        self,
        subscription: PushSubscription,
        payload: bytes,
        *,
        ttl: int,
        urgency: str,
        topic: str | None,
    ) -> HTTPRequest:
        """The POST for one push (encrypted body, RFC 8030 and RFC 8292 headers)."""
        headers = {
            "Content-Type": "application/octet-stream",
            "Content-Encoding": "aes128gcm",
            "TTL": str(ttl),
            "Urgency": urgency,
            "Authorization": self.keys.authorization(subscription.endpoint),
        }
        if topic:
            headers["Topic"] = topic
        return HTTPRequest(
            subscription.endpoint,
            method="POST",
            headers=headers,
            body=encrypt(payload, subscription),
            connect_timeout=self.timeout,
            request_timeout=self.timeout,
            follow_redirects=False,
            decompress_response=False,
        )

    async def send(self, request: HTTPRequest) -> SendResult:
        """POST ``request``; never raises for a network or HTTP failure."""
        try:
            response = await self.client.fetch(request, raise_error=False)
        except EndpointRefused as exc:  # from the resolver, at connect time
            return SendResult(0, None, str(exc), refused=True)
        except (OSError, HTTPClientError) as exc:
            return SendResult(0, None, f"{type(exc).__name__}: {exc}")
        if response.code == 599:  # Tornado's code for no answer (timeout, reset)
            return SendResult(0, None, str(response.error))
        body = (response.body or b"")[:200].decode(errors="replace")
        return SendResult(response.code, retry_after(response.headers.get("Retry-After")), body)

    def close(self) -> None:
        """Close the HTTP client and its resolver."""
        self.client.close()
        self.resolver.close()
