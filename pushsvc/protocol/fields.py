"""What a client frame's fields must look like, and the error a command answers with.

Pure declarations: :class:`Field` is read by :func:`pushsvc.protocol.frames.validate`;
:class:`CommandError` becomes an ``error`` frame. Both are re-exported from
:mod:`pushsvc` for plugin authors.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Field:
    """How one field of a client frame is validated.

    Args:
        types: accepted JSON types (``str``, ``int``, ``float``, ``bool``,
            ``dict``, ``list``); ``int`` is accepted where ``float`` is.
        required: a frame without it gets ``bad_request`` naming the field.
        max_length: most characters of a string, or items of a list.
        items: for a list, the type every item must have.

    Example::

        Field(str, max_length=4000)            # required string
        Field((str, list), items=str)          # a user id or a list of them
        Field(dict, required=False)            # optional object
    """

    types: type | tuple[type, ...]
    required: bool = True
    max_length: int | None = None
    items: type | None = None


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
