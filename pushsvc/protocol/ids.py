"""Message ids: unique across processes and nodes, sortable by creation time.

An id is a ULID: 48 bits of milliseconds since the epoch and 80 random bits,
written as 26 characters of Crockford base32, so the string order is the time
order. Within one process ids are strictly increasing even inside the same
millisecond (the random part is incremented), which keeps a user's inbox in
send order.
"""

from __future__ import annotations

import itertools
import os
import random
import time

_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_RANDOM_BITS = 80
_RANDOM_MAX = (1 << _RANDOM_BITS) - 1
#: Every pair of digits (10 bits), so the 80 random bits are 8 lookups.
_PAIRS = [first + second for first in _ALPHABET for second in _ALPHABET]


class IdGenerator:
    """Makes monotonic ULIDs; one generator per process is enough."""

    def __init__(self) -> None:
        # Ids must be unique, not secret: a generator seeded from the OS draws the
        # random parts (a getrandbits call, not a getrandom syscall per millisecond).
        self._random = random.Random(os.urandom(32))
        self._last_ms = -1  # millisecond of the previous id
        self._last_random = 0  # random part of the previous id
        self._prefix_ms = -1  # millisecond whose encoding is in _prefix
        self._prefix = ""  # the 10 time characters of an id
        self._head_ms = -1  # millisecond of the id whose first 24 characters are in _head
        self._head_random = -1  # its random part without the last 10 bits
        self._head = ""  # those 24 characters

    def new(self, now_ms: int | None = None) -> str:
        """Return a new id, greater than every id this generator made before."""
        ms = int(time.time() * 1000) if now_ms is None else now_ms
        if ms <= self._last_ms:
            ms = self._last_ms
            rand = self._last_random + 1
            if rand > _RANDOM_MAX:  # 2**80 ids in one millisecond: move to the next
                ms += 1
                rand = self._random.getrandbits(_RANDOM_BITS - 1)
        else:
            # Keep the top bit clear so increments in this millisecond never overflow.
            rand = self._random.getrandbits(_RANDOM_BITS - 1)
        self._last_ms, self._last_random = ms, rand
        pairs = _PAIRS  # 80 bits are exactly 16 digits (and 48 fit in 10): encode()'s digits
        high = rand >> 10
        if ms != self._head_ms or high != self._head_random:
            # A new millisecond (or 1,024 increments): encode all but the last two digits.
            # Ids made in the same millisecond share them, so they are encoded once.
            if ms != self._prefix_ms:
                self._prefix_ms = ms
                self._prefix = "".join((pairs[ms >> 40], pairs[(ms >> 30) & 1023],
                                        pairs[(ms >> 20) & 1023], pairs[(ms >> 10) & 1023],
                                        pairs[ms & 1023]))  # fmt: skip
            self._head_ms, self._head_random = ms, high
            self._head = "".join((self._prefix,
                                  pairs[rand >> 70], pairs[(rand >> 60) & 1023],
                                  pairs[(rand >> 50) & 1023], pairs[(rand >> 40) & 1023],
                                  pairs[(rand >> 30) & 1023], pairs[(rand >> 20) & 1023],
                                  pairs[(rand >> 10) & 1023]))  # fmt: skip
        return self._head + pairs[rand & 1023]


def encode(ms: int, rand: int) -> str:
    """Encode a timestamp and random part as a 26-character ULID string."""
    value = (ms << _RANDOM_BITS) | rand
    chars = []
    for _ in range(26):
        chars.append(_ALPHABET[value & 31])
        value >>= 5
    return "".join(reversed(chars))


def timestamp_ms(message_id: str) -> int:
    """The creation time (milliseconds since the epoch) stored in an id."""
    value = 0
    for char in message_id[:10]:
        value = value * 32 + _ALPHABET.index(char)
    return value


_default = IdGenerator()
new_id = _default.new

_SESSION_PREFIX = os.urandom(6).hex()  # this process; random, so unique across nodes
_session_counter = itertools.count(1)


def session_id() -> str:
    """A connection id unique across processes and nodes (random prefix, counter)."""
    return f"{_SESSION_PREFIX}{next(_session_counter):x}"


def epoch() -> str:
    """A new random room-history epoch: 16 hex digits (64 random bits)."""
    return os.urandom(8).hex()
