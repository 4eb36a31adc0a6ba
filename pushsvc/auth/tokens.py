"""Token verification: JWT signature, algorithm allow-list, claims, key sources.

HS* tokens are checked with the shared secret only, RS*/ES* tokens with a PEM
public key or a JWKS key chosen by ``kid``; a key is never used for an
algorithm family it does not belong to, which rules out algorithm confusion
(an HS256 token signed with the RSA public key). ``alg: none`` is refused
before PyJWT sees the token.
"""

from __future__ import annotations

import asyncio
import logging
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jwt
import orjson
from tornado.httpclient import AsyncHTTPClient

from pushsvc.auth.principal import Principal
from pushsvc.config import AuthConfig

log = logging.getLogger("pushsvc.auth")
# PyJWT warns on every call with a short HMAC key; pushsvc says it once at startup.
warnings.filterwarnings("ignore", category=jwt.warnings.InsecureKeyLengthWarning)
MIN_SECRET_BYTES = 32
#: Verified tokens remembered (the oldest is dropped first) and for how long at most.
CACHE_SIZE = 10_000
CACHE_SECONDS = 300.0

SYMMETRIC = frozenset({"HS256", "HS384", "HS512"})
ASYMMETRIC = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)


class AuthError(Exception):
    """The token was refused; ``reason`` is the machine-readable why."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(detail or reason)
        self.reason = reason


def token_from_request(headers: Mapping[str, str], query_token: str | None) -> str | None:
    """The bearer token of a request: ``Authorization`` header, else ``access_token``."""
    header = headers.get("Authorization", "")
    if header[:7].lower() == "bearer ":
        return header[7:].strip() or None
    return query_token or None


@dataclass(frozen=True, slots=True)
class _KeySet:
    keys: dict[str, Any]  # kid -> key object usable by PyJWT
    fetched_at: float  # monotonic time of the fetch


class JwksCache:
    """JWKS keys fetched over HTTP without blocking the loop, refreshed by age or ``kid``.

    A fetch that fails (endpoint down, slow past 5 s, garbage) keeps the last
    good keys and is counted in :attr:`failures`. A refresh by age runs in
    the background: handshakes with a known ``kid`` never wait for it; only
    an unknown ``kid`` waits for its (rate-limited) refetch.
    """

    def __init__(self, url: str, refresh_interval: float, min_refetch_interval: float) -> None:
        self.url = url  # where the key set lives
        self.refresh_interval = refresh_interval  # seconds before keys are refetched
        self.min_refetch_interval = min_refetch_interval  # floor between kid-driven refetches
        self._keys = _KeySet({}, float("-inf"))  # the last good key set
        self._lock = asyncio.Lock()  # one fetch at a time
        self._last_attempt = float("-inf")  # monotonic time of the last fetch attempt
        self._refresh: asyncio.Task[None] | None = None  # a background refresh by age
        self.failures = 0  # fetches that failed since start

    async def _fetch(self) -> None:
        self._last_attempt = time.monotonic()
        try:
            response = await AsyncHTTPClient().fetch(self.url, request_timeout=5.0)
            data = orjson.loads(response.body)
            key_set = jwt.PyJWKSet.from_dict(data)
        except Exception as exc:  # keep the old keys on any failure
            self.failures += 1
            log.warning("JWKS fetch from %s failed: %s", self.url, exc)
            return
        keys = {k.key_id: k for k in key_set.keys if k.key_id}
        self._keys = _KeySet(keys, time.monotonic())
        log.info("JWKS: %d keys loaded from %s", len(keys), self.url)

    def _should_fetch(self, kid: str | None, now: float) -> bool:
        if now - self._last_attempt < self.min_refetch_interval:
            return False
        return now - self._keys.fetched_at > self.refresh_interval or kid not in self._keys.keys

    async def _refetch(self, kid: str | None) -> None:
        async with self._lock:
            if self._should_fetch(kid, time.monotonic()):
                await self._fetch()

    async def key(self, kid: str | None) -> Any:
        """The key for ``kid``; an unknown kid triggers one rate-limited refetch."""
        if self._should_fetch(kid, time.monotonic()):
            if kid in self._keys.keys:  # only old: refresh without making anyone wait
                if self._refresh is None or self._refresh.done():
                    self._refresh = asyncio.ensure_future(self._refetch(kid))
            else:
                await self._refetch(kid)
        found = self._keys.keys.get(kid or "")
        if found is None:
            raise AuthError("unknown_kid", f"no key with kid {kid!r}")
        return found.key


class Authenticator:
    """Verifies tokens against the configured keys and claim rules."""

    def __init__(self, config: AuthConfig, secret: str) -> None:
        self.config = config  # the [auth] section in force
        self.secret = secret  # the HS256 secret ("" when unset)
        self.algorithms = [a for a in config.algorithms if a.lower() != "none"]
        if secret and len(secret.encode()) < MIN_SECRET_BYTES:
            log.warning(
                "auth.jwt_secret is %d bytes; use at least %d random bytes",
                len(secret.encode()),
                MIN_SECRET_BYTES,
            )
        self._cache: dict[str, tuple[Principal, float]] = {}  # token -> (who, valid until)
        self.public_key: Any = None  # the PEM key, loaded once
        if config.public_key_file:
            with open(config.public_key_file, "rb") as handle:
                self.public_key = handle.read()
        self.jwks = (
            JwksCache(
                config.jwks_url, config.jwks_refresh_interval, config.jwks_min_refetch_interval
            )
            if config.jwks_url
            else None
        )

    async def _key_for(self, alg: str, kid: str | None) -> Any:
        if alg in SYMMETRIC:
            if not self.secret:
                raise AuthError("bad_signature", "no shared secret configured")
            return self.secret
        if alg in ASYMMETRIC:
            if self.jwks is not None and (kid or self.public_key is None):
                return await self.jwks.key(kid)
            if self.public_key is not None:
                return self.public_key
        raise AuthError("algorithm_not_allowed", f"algorithm {alg} not accepted")

    async def verify(self, token: str | None) -> Principal:
        """Verify ``token`` and return who it names (cached for repeated tokens).

        A token verified once is remembered until its ``exp`` (at most
        :data:`CACHE_SECONDS`), so a reconnect storm of clients holding the
        same tokens costs a dict lookup each instead of a signature check.

        Raises:
            AuthError: with a reason (``missing_token``, ``malformed``,
                ``algorithm_not_allowed``, ``bad_signature``, ``expired``,
                ``not_yet_valid``, ``bad_audience``, ``bad_issuer``,
                ``missing_claim``, ``unknown_kid``).
        """
        if not token:
            raise AuthError("missing_token", "no token")
        cached = self._cache.get(token)
        if cached is not None:
            principal, valid_until = cached
            if time.time() < valid_until:
                return principal
            del self._cache[token]
        principal = await self._verify(token)
        self._remember(token, principal)
        return principal

    def _remember(self, token: str, principal: Principal) -> None:
        now = time.time()
        valid_until = now + CACHE_SECONDS
        if principal.expires_at is not None:
            valid_until = min(valid_until, principal.expires_at)
        if valid_until <= now:
            return
        cache = self._cache
        if len(cache) >= CACHE_SIZE:
            del cache[next(iter(cache))]  # the oldest entry
        cache[token] = (principal, valid_until)

    async def _verify(self, token: str) -> Principal:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise AuthError("malformed", str(exc)) from exc
        alg = header.get("alg")
        if not isinstance(alg, str) or alg.lower() == "none" or alg not in self.algorithms:
            raise AuthError("algorithm_not_allowed", f"algorithm {alg!r} not accepted")
        kid = header.get("kid")
        key = await self._key_for(alg, kid if isinstance(kid, str) else None)
        return self.decode(token, alg, key)

    def decode(self, token: str, alg: str, key: Any) -> Principal:
        """Check signature and claims with a known key (no I/O)."""
        config = self.config
        required = ["sub", "exp"] if config.require_exp else ["sub"]
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[alg],
                audience=config.audience or None,
                issuer=config.issuer or None,
                leeway=config.leeway,
                options={"require": required, "verify_aud": bool(config.audience)},
            )
        except jwt.ExpiredSignatureError as exc:
            raise AuthError("expired", "token expired") from exc
        except jwt.ImmatureSignatureError as exc:
            raise AuthError("not_yet_valid", "token not yet valid") from exc
        except jwt.InvalidAudienceError as exc:
            raise AuthError("bad_audience", "wrong audience") from exc
        except jwt.InvalidIssuerError as exc:
            raise AuthError("bad_issuer", "wrong issuer") from exc
        except jwt.MissingRequiredClaimError as exc:
            raise AuthError("missing_claim", f"missing claim {exc.claim}") from exc
        except jwt.InvalidSignatureError as exc:
            raise AuthError("bad_signature", "signature does not match") from exc
        except (jwt.InvalidKeyError, jwt.InvalidAlgorithmError) as exc:
            raise AuthError("algorithm_not_allowed", str(exc)) from exc
        except jwt.PyJWTError as exc:
            raise AuthError("malformed", str(exc)) from exc
        return principal_from_claims(claims)


def _words(value: Any, claim: str) -> tuple[str, ...]:
    if isinstance(value, str):
        return tuple(value.split())
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise AuthError("malformed", f"claim {claim} must be a string or a list of strings")


def principal_from_claims(claims: Mapping[str, Any]) -> Principal:
    """Build a :class:`Principal` from verified claims."""
    sub = claims.get("sub")
    if not isinstance(sub, str) or not sub:
        raise AuthError("missing_claim", "missing claim sub")
    name = claims.get("name")
    exp = claims.get("exp")
    rooms = claims.get("rooms")
    return Principal(
        user=sub,
        name=name if isinstance(name, str) else None,
        scopes=frozenset(_words(claims.get("scope", ""), "scope")),
        rooms=None if rooms is None else _words(rooms, "rooms"),
        expires_at=float(exp) if isinstance(exp, int | float) else None,
        claims=dict(claims),
    )


def mint(
    secret: str,
    sub: str,
    *,
    ttl: float = 3600,
    scope: str = "",
    rooms: list[str] | None = None,
    name: str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> str:
    """Sign an HS256 token (``pushsvc token``, tests, development)."""
    now = int(time.time())
    claims: dict[str, Any] = {"sub": sub, "iat": now, "exp": now + int(ttl)}
    if scope:
        claims["scope"] = scope
    if rooms is not None:
        claims["rooms"] = rooms
    if name:
        claims["name"] = name
    if extra:
        claims.update(extra)
    return jwt.encode(claims, secret, algorithm="HS256")
