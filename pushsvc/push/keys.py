"""The VAPID key pair (RFC 8292): read from a PEM file, or generated there on first start."""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from urllib.parse import urlsplit

from cryptography.hazmat.primitives import serialization
from py_vapid import Vapid02, VapidException

from pushsvc.protocol.webpush import b64url_encode

#: Lifetime of a VAPID JWT; RFC 8292 §2 allows at most 24 hours.
JWT_LIFETIME = 12 * 3600


class VapidKeyError(Exception):
    """The key file cannot be read, parsed or created."""


class VapidKeys:
    """The server's VAPID identity: signs the ``Authorization: vapid`` header of each push."""

    def __init__(self, vapid: Vapid02, subject: str) -> None:
        self.vapid = vapid  # py_vapid's key pair
        self.subject = subject  # the ``sub`` claim (mailto: or https: contact)
        point = vapid.public_key.public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
        #: The public key as browsers take it (``applicationServerKey``): base64url.
        self.public_key = b64url_encode(point)

    @classmethod
    def load_or_create(cls, path: Path, subject: str, *, create: bool = True) -> VapidKeys:
        """Read the PEM private key at ``path``; without one, generate it (mode 0600).

        Raises:
            VapidKeyError: unreadable or malformed file, or it cannot be written.
        """
        try:
            pem = path.read_bytes()
        except FileNotFoundError:
            if not create:
                raise VapidKeyError(f"{path}: no such file") from None
            return cls(_generate(path), subject)
        except OSError as exc:
            raise VapidKeyError(f"{path}: cannot read: {exc.strerror}") from exc
        try:
            return cls(Vapid02.from_pem(pem), subject)
        except (VapidException, ValueError, TypeError) as exc:
            raise VapidKeyError(f"{path}: not a PEM P-256 private key: {exc}") from exc

    def authorization(self, endpoint: str, now: float | None = None) -> str:
        """The ``Authorization`` header for a push to ``endpoint`` (``aud`` is its origin)."""
        parts = urlsplit(endpoint)
        claims = {
            "aud": f"{parts.scheme}://{parts.netloc}",
            "exp": int((time.time() if now is None else now) + JWT_LIFETIME),
            "sub": self.subject,
        }
        header: str = self.vapid.sign(claims)["Authorization"]
        return header


def _generate(path: Path) -> Vapid02:
    """A new key pair written to ``path`` atomically, readable by the owner only."""
    vapid = Vapid02()
    vapid.generate_keys()
    pem: bytes = vapid.private_pem()
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(pem)
            handle.flush()
            os.fsync(handle.fileno())
        os.link(temporary, path)  # fails if another process created it meanwhile
    except FileExistsError:
        return Vapid02.from_pem(path.read_bytes())
    except OSError as exc:
        raise VapidKeyError(f"{path}: cannot create: {exc.strerror}") from exc
    finally:
        with contextlib.suppress(OSError):
            temporary.unlink()
    return vapid
