"""What a Web Push subscription frame must look like (pure: no I/O, no network).

A browser's ``PushSubscription.toJSON()`` is ``{"endpoint", "expirationTime",
"keys": {"p256dh", "auth"}}``. :func:`parse_subscription` checks its shape and
the key sizes RFC 8291 fixes; whether the endpoint may be fetched (scheme,
allowed hosts, public addresses) is decided by :mod:`pushsvc.push.endpoints`.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from typing import Any, ClassVar

#: Longest endpoint URL accepted (browsers' are under 600 characters).
MAX_ENDPOINT_LENGTH = 2048
#: An uncompressed P-256 point: 0x04, then x and y (RFC 8291 §3.1).
P256DH_BYTES = 65
#: The authentication secret (RFC 8291 §3.2).
AUTH_BYTES = 16
_BASE64URL = re.compile(r"[A-Za-z0-9_-]+={0,2}")


@dataclass(frozen=True, slots=True)
class SubscriptionKeys:
    """A checked subscription: the endpoint and the two keys, base64url without padding."""

    endpoint: str
    p256dh: str
    auth: str


def b64url_decode(text: str) -> bytes:
    """Decode base64url with or without ``=`` padding; ValueError when malformed."""
    if not _BASE64URL.fullmatch(text):
        raise ValueError("not base64url")
    stripped = text.rstrip("=")
    try:
        return base64.urlsafe_b64decode(stripped + "=" * (-len(stripped) % 4))
    except (binascii.Error, ValueError) as exc:
        raise ValueError("not base64url") from exc


def b64url_encode(data: bytes) -> str:
    """base64url without padding (as browsers and RFC 8292 write keys)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def parse_subscription(value: Any) -> SubscriptionKeys:
    """Check a ``PushSubscription.toJSON()`` object; raises ValueError naming the field."""
    if not isinstance(value, dict):
        raise ValueError("must be an object {endpoint, keys: {p256dh, auth}}")
    endpoint = value.get("endpoint")
    if not isinstance(endpoint, str) or not endpoint:
        raise ValueError("endpoint: a URL is required")
    if len(endpoint) > MAX_ENDPOINT_LENGTH:
        raise ValueError(f"endpoint: at most {MAX_ENDPOINT_LENGTH} characters")
    keys = value.get("keys")
    if not isinstance(keys, dict):
        raise ValueError("keys: an object {p256dh, auth} is required")
    checked = []
    for name, size in (("p256dh", P256DH_BYTES), ("auth", AUTH_BYTES)):
        raw = keys.get(name)
        if not isinstance(raw, str) or len(raw) > 2 * size:
            raise ValueError(f"keys.{name}: a base64url string is required")
        try:
            data = b64url_decode(raw)
        except ValueError:
            raise ValueError(f"keys.{name}: not base64url") from None
        if len(data) != size or (name == "p256dh" and data[0] != 0x04):
            what = "an uncompressed P-256 point" if name == "p256dh" else f"{size} bytes"
            raise ValueError(f"keys.{name}: must be {what}")
        checked.append(b64url_encode(data))
    return SubscriptionKeys(endpoint, checked[0], checked[1])


def check_subscription(value: Any) -> None:
    """A :class:`~pushsvc.protocol.fields.Field` validator for :func:`parse_subscription`."""
    parse_subscription(value)


#: When a message is pushed: to users with no open connection (and to connected
#: ones that did not ack within ``push.after_seconds``), to everyone, or never.
PUSH_MODES = ("offline", "always", "never")
#: ``Urgency`` values (RFC 8030 §5.3).
URGENCIES = ("very-low", "low", "normal", "high")
#: A ``Topic`` (RFC 8030 §5.4): at most 32 characters of the base64url alphabet.
TOPIC_PATTERN = r"[A-Za-z0-9_-]{1,32}"


@dataclass(frozen=True, slots=True)
class PushOptions:
    """How one at-least-once message is pushed (``Node.send(..., push=...)``).

    Args:
        mode: one of :data:`PUSH_MODES`; None: the message type's default.
        urgency: the ``Urgency`` header; None: ``push.urgency``.
        topic: the ``Topic`` header (a later push with the same topic replaces
            an undelivered one at the push service); None: no topic.
    """

    mode: str | None = None
    urgency: str | None = None
    topic: str | None = None
    MODES: ClassVar[tuple[str, ...]] = PUSH_MODES  # for plugins, which import only pushsvc
    URGENCIES: ClassVar[tuple[str, ...]] = URGENCIES
    TOPIC_PATTERN: ClassVar[str] = TOPIC_PATTERN

    def __post_init__(self) -> None:
        if self.mode is not None and self.mode not in PUSH_MODES:
            raise ValueError(f"push: must be one of {', '.join(PUSH_MODES)}")
        if self.urgency is not None and self.urgency not in URGENCIES:
            raise ValueError(f"urgency: must be one of {', '.join(URGENCIES)}")
        if self.topic is not None and not re.fullmatch(TOPIC_PATTERN, self.topic):
            raise ValueError("topic: 1 to 32 characters of A-Z a-z 0-9 _ -")
