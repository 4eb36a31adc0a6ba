"""Logging: text or JSON lines, with tokens redacted from every line.

The redaction runs in the formatter, so it covers Tornado's access and error
logs too (they print request URIs, which may carry ``?access_token=``).
"""

from __future__ import annotations

import logging
import re
import sys
import time
import urllib.parse
from http import HTTPStatus
from typing import Any

import orjson
import tornado.web

#: Query parameters whose values are secrets, by their decoded, lower-cased name.
SECRET_PARAMETERS = frozenset({"access_token"})
# A query parameter: the name as written (any percent-encoding), then its value.
_PARAMETER = re.compile(r"(?:^|(?<=[?&;\s\"'(,]))([^=&;\s\"'#?]+)(=)([^&;\s\"'#]*)")
_SECRETS = re.compile(
    r"(Bearer\s+)[^\s\"']+"  # Authorization headers
    # anything that looks like a JWT, its dots written plain or percent-encoded
    r"|eyJ(?:[\w-]|%2[dD]|%5[fF]){4,}(?:\.|%2[eE])(?:[\w-]|%2[dD]|%5[fF]){4,}"
    r"(?:\.|%2[eE])(?:[\w-]|%2[dD]|%5[fF])*",
    re.IGNORECASE,
)
_FIELDS = ("session", "user")


def _redact_parameter(match: re.Match[str]) -> str:
    name = urllib.parse.unquote_plus(match.group(1)).strip().lower()
    if name in SECRET_PARAMETERS:
        return f"{match.group(1)}=[redacted]"
    return match.group(0)


def redact(text: str) -> str:
    """Replace tokens in ``text`` with ``[redacted]``.

    A query parameter is matched by its decoded name, so every spelling the
    query parsers accept (``access_token``, ``access%5Ftoken``,
    ``%61ccess_token``, ``ACCESS_TOKEN``...) is redacted; so are bearer
    headers and anything shaped like a JWT.
    """
    if "=" in text:
        text = _PARAMETER.sub(_redact_parameter, text)
    return _SECRETS.sub(lambda m: (m.group(1) or "") + "[redacted]", text)


class TextFormatter(logging.Formatter):
    """``time level logger: message [session=… user=…]``, redacted."""

    def format(self, record: logging.LogRecord) -> str:
        """Format and redact one record."""
        line = super().format(record)
        extra = " ".join(f"{k}={getattr(record, k)}" for k in _FIELDS if hasattr(record, k))
        return redact(f"{line} [{extra}]" if extra else line)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, message, session, user, exc."""

    def format(self, record: logging.LogRecord) -> str:
        """Format and redact one record."""
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in _FIELDS:
            if hasattr(record, key):
                out[key] = getattr(record, key)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return redact(orjson.dumps(out).decode())


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
#: The formatter :func:`setup` installed, also used by :func:`announce`.
_formatter: list[logging.Formatter] = [TextFormatter(TEXT_FORMAT)]


def setup(level: str = "info", fmt: str = "text") -> None:
    """Send all logs to stderr in the chosen format (replaces earlier handlers)."""
    handler = logging.StreamHandler(sys.stderr)
    formatter = JsonFormatter() if fmt == "json" else TextFormatter(TEXT_FORMAT)
    _formatter[0] = formatter
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    set_level(level)


def announce(text: str, logger: str = "pushsvc") -> None:
    """Print ``text`` on stdout in the log format, whatever the log level.

    For the lines people and scripts wait for (``pushsvc listening on ...``):
    with ``log.format = "json"`` it is a JSON object like every log line.
    """
    record = logging.LogRecord(logger, logging.INFO, __file__, 0, text, None, None)
    print(_formatter[0].format(record), flush=True)


def set_level(level: str) -> None:
    """Change the log level (config reload)."""
    logging.getLogger().setLevel(level.upper())


def access_log(handler: tornado.web.RequestHandler) -> None:
    """Tornado ``log_function``: one line per request, query tokens redacted.

    Successful WebSocket upgrades (101) log at debug level: one line per
    connection would dominate the log (and the handshake's cost) in a
    reconnect storm; refused handshakes log at warning.
    """
    request = handler.request
    log_request(
        handler.get_status(),
        request.method or "",
        request.uri or "",
        request.remote_ip or "",
        request.request_time(),
    )


def log_request(status: int, method: str, uri: str, remote_ip: str, seconds: float) -> None:
    """One access-log line (``tornado.access``), the URI redacted."""
    if status == HTTPStatus.SWITCHING_PROTOCOLS:
        level = logging.DEBUG
    else:
        level = logging.INFO if status < 400 else logging.WARNING if status < 500 else logging.ERROR
    logger = logging.getLogger("tornado.access")
    if logger.isEnabledFor(level):
        logger.log(
            level, "%d %s %s (%s) %.2fms", status, method, redact(uri), remote_ip, 1000.0 * seconds
        )
