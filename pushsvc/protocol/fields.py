"""What a client frame's fields must look like, and the error a command answers with.

Pure declarations: :class:`Field` is read by :func:`pushsvc.protocol.frames.validate`;
:class:`CommandError` becomes an ``error`` frame. Both are re-exported from
:mod:`pushsvc` for plugin authors.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class Field:
    """How one field of a client frame is validated.

    Args:
        types: accepted JSON types (``str``, ``int``, ``float``, ``bool``,
            ``dict``, ``list``); ``int`` is accepted where ``float`` is.
        required: a frame without it gets ``bad_request`` naming the field.
        max_length: most characters of a string, or items of a list.
        items: for a list, the type every item must have.
        min_length: fewest characters of a string, or items of a list.
        pattern: a regular expression a string must match in full
            (:func:`re.fullmatch`); compiled once, when the field is declared.
        choices: the allowed values (any collection; kept as a frozenset when
            every value is hashable). Compared with ``==``, as Python does, so
            ``1``, ``1.0`` and ``True`` are the same choice.
        validator: ``callable(value) -> None`` run last, on a value that passed
            every other check; a ``ValueError`` it raises becomes
            ``bad_request`` "``<field>: <message>``". Any other exception is a
            bug in the validator and propagates.

    Lengths count Unicode code points (``len(str)``), like JSON Schema's
    ``maxLength`` and most databases' character limits: cheap, predictable,
    and independent of the Unicode version. A user-perceived character (an
    emoji with a skin tone, a flag) may be several code points.

    The checks beyond ``types``/``required``/``max_length``/``items`` cost
    nothing for a field that uses none of them.

    Example::

        Field(str, max_length=4000)            # required string
        Field((str, list), items=str)          # a user id or a list of them
        Field(dict, required=False)            # optional object
        Field(str, pattern=r"[a-z0-9-]{1,64}")  # a slug
        Field(str, choices={"low", "high"})    # an enumeration
    """

    types: type | tuple[type, ...]
    required: bool = True
    max_length: int | None = None
    items: type | None = None
    min_length: int | None = None
    pattern: str | None = None
    choices: Collection[Any] | None = None
    validator: Callable[[Any], None] | None = None
    #: True when any of min_length, pattern, choices, validator is set.
    extra: bool = field(init=False, repr=False, compare=False, default=False)
    compiled: re.Pattern[str] | None = field(init=False, repr=False, compare=False, default=None)

    def __post_init__(self) -> None:
        if self.min_length is not None and self.min_length < 0:
            raise ValueError("Field: min_length must be >= 0")
        if (
            self.min_length is not None
            and self.max_length is not None
            and self.min_length > self.max_length
        ):
            raise ValueError("Field: min_length is greater than max_length")
        if self.pattern is not None:
            object.__setattr__(self, "compiled", re.compile(self.pattern))
        if self.choices is not None:
            choices = tuple(self.choices)
            try:
                normalized: Collection[Any] = frozenset(choices)
            except TypeError:  # unhashable values (lists, dicts): a linear scan
                normalized = choices
            object.__setattr__(self, "choices", normalized)
        if self.validator is not None and not callable(self.validator):
            raise TypeError("Field: validator must be callable")
        extra = (
            self.min_length is not None
            or self.pattern is not None
            or self.choices is not None
            or self.validator is not None
        )
        object.__setattr__(self, "extra", extra)


class CommandError(Exception):
    """Raised by a handler to answer the frame with an ``error`` frame.

    Args:
        code: an error code of PROTOCOL §2 (``bad_request``, ``forbidden``...).
        message: a human-readable explanation.
        retry_after: seconds, for ``rate_limited`` and ``unavailable``.
    """

    def __init__(self, code: str, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry_after = retry_after
