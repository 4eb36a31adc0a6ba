"""Logs: text or JSON lines, session and user on connection lines, tokens never written."""

from __future__ import annotations

import logging
import sqlite3
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest
from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest
from tornado.websocket import websocket_connect

from conftest import Client, ServerProcess, token
from pushsvc.ops import logs

JWT = token("alice")
OPAQUE = "opaque-query-secret-0123456789"


def record(message: str, *args: Any, **extra: Any) -> logging.LogRecord:
    out = logging.LogRecord("pushsvc.test", logging.WARNING, __file__, 1, message, args, None)
    for key, value in extra.items():
        setattr(out, key, value)
    return out


def test_redact_query_tokens_bearer_headers_and_bare_jwts() -> None:
    text = (
        f"GET /ws?x=1&access_token={OPAQUE}&y=2 "
        f"Authorization: Bearer {OPAQUE} and {JWT} "
        f"ACCESS_TOKEN={JWT}"
    )
    redacted = logs.redact(text)
    assert OPAQUE not in redacted and JWT not in redacted
    assert "access_token=[redacted]&y=2" in redacted
    assert "Bearer [redacted]" in redacted and "ACCESS_TOKEN=[redacted]" in redacted


def test_json_formatter_fields_and_redaction() -> None:
    line = logs.JsonFormatter().format(
        record("refused %s", f"?access_token={JWT}", session="s1", user="alice")
    )
    parsed = orjson.loads(line)
    assert set(parsed) == {"ts", "level", "logger", "message", "session", "user"}
    assert parsed["level"] == "warning" and parsed["logger"] == "pushsvc.test"
    assert parsed["message"] == "refused ?access_token=[redacted]"
    assert (parsed["session"], parsed["user"]) == ("s1", "alice")
    assert parsed["ts"].endswith("Z") and "T" in parsed["ts"]
    assert JWT not in line


def test_json_formatter_exception_is_redacted() -> None:
    try:
        raise ValueError(f"bad token {JWT}")
    except ValueError:
        failing = record("failed")
        failing.exc_info = sys.exc_info()
    parsed = orjson.loads(logs.JsonFormatter().format(failing))
    assert "ValueError: bad token [redacted]" in parsed["exc"]
    assert "session" not in parsed  # only where known


def test_text_formatter_appends_session_and_user() -> None:
    formatter = logs.TextFormatter(logs.TEXT_FORMAT)
    line = formatter.format(record("closing: %s", "rate", session="s9", user="bob"))
    assert line.endswith("WARNING pushsvc.test: closing: rate [session=s9 user=bob]")
    assert formatter.format(record("plain")).endswith("pushsvc.test: plain")


def test_announce_follows_the_format(capsys: pytest.CaptureFixture[str]) -> None:
    try:
        logs.setup("info", "json")
        logs.announce("pushsvc listening on http://127.0.0.1:1")
        parsed = orjson.loads(capsys.readouterr().out)
        assert parsed["message"] == "pushsvc listening on http://127.0.0.1:1"
        assert parsed["level"] == "info" and parsed["logger"] == "pushsvc"
        logs.setup("info", "text")
        logs.announce("plain banner")
        assert capsys.readouterr().out.rstrip().endswith("INFO pushsvc: plain banner")
    finally:
        for handler in list(logging.getLogger().handlers):
            logging.getLogger().removeHandler(handler)


async def test_json_logs_of_a_real_run_never_contain_tokens(spawn: Any, tmp_path: Path) -> None:
    server: ServerProcess = spawn(
        env={
            "PUSHSVC_LOG__FORMAT": "json",
            "PUSHSVC_LOG__LEVEL": "debug",
            "PUSHSVC_LOG__ACCESS_LOG": "true",
            "PUSHSVC_STORE__BUSY_TIMEOUT": "0.2",
            "PUSHSVC_RATELIMIT__RATE": "1",
            "PUSHSVC_RATELIMIT__BURST": "3",
            "PUSHSVC_RATELIMIT__ABUSE_VIOLATIONS": "2",
        }
    )
    alice = Client(await websocket_connect(f"{server.ws_url}?access_token={JWT}"))
    welcome = await alice.recv()
    assert welcome is not None and welcome["type"] == "welcome"
    for bad in (OPAQUE, JWT[:-4] + "AAAA"):  # refused: opaque and badly signed query tokens
        with pytest.raises(HTTPClientError) as refused:
            await websocket_connect(f"{server.ws_url}?access_token={bad}")
        assert refused.value.code == 401
    status = await AsyncHTTPClient().fetch(
        HTTPRequest(f"{server.base}/readyz", headers={"Authorization": f"Bearer {JWT}"}),
        raise_error=False,
    )
    assert status.code == 200
    # An error line: the store refuses a write while another process holds the lock.
    holder = sqlite3.connect(tmp_path / "data" / "pushsvc.sqlite3", timeout=0)
    holder.execute("BEGIN IMMEDIATE")
    try:
        await alice.send({"type": "private", "to": "bob", "text": "x", "ref": "p"})
        assert (await alice.recv_type("error"))["code"] == "unavailable"
    finally:
        holder.rollback()
        holder.close()
    # Rate-limit abuse: the server closes the connection and says why.
    for _ in range(8):
        await alice.send({"type": "ping"})
    assert await alice.closed() == 1008
    assert server.terminate() == 0

    text = server.log()
    for secret in (JWT, OPAQUE, JWT[:-4] + "AAAA", JWT.split(".")[1], JWT.split(".")[2]):
        assert secret not in text
    lines = [orjson.loads(line) for line in text.splitlines() if line.strip()]
    for line in lines:
        assert {"ts", "level", "logger", "message"} <= set(line), line
    assert any("listening on" in line["message"] for line in lines)
    assert any(line["level"] == "error" and line["logger"] == "pushsvc.store" for line in lines)
    session = welcome["session"]
    mine = [line for line in lines if line.get("session") == session]
    assert mine and all(line["user"] == "alice" for line in mine)
    assert any("opened" in line["message"] for line in mine)
    assert sum("rate limit abuse" in line["message"] for line in mine) == 1
    access = [line["message"] for line in lines if line["logger"] == "tornado.access"]
    assert any("/ws?access_token=[redacted]" in message for message in access), access
    assert any(message.startswith("401 ") for message in access), access


#: Every spelling of the token parameter that the query parsers decode to ``access_token``.
TOKEN_SPELLINGS = (
    "access_token",
    "access%5Ftoken",
    "access%5ftoken",
    "%61ccess_token",
    "%61%63%63%65%73%73%5F%74%6F%6B%65%6E",
    "ACCESS_TOKEN",
)


@pytest.mark.parametrize("name", TOKEN_SPELLINGS)
@pytest.mark.parametrize("logger", ["tornado.access", "tornado.application", "pushsvc.debug"])
def test_every_spelling_is_redacted_on_every_log_line(name: str, logger: str) -> None:
    uri = f"/ws?x=1&{name}={OPAQUE}&y=2"
    for level in (logging.DEBUG, logging.WARNING, logging.ERROR):
        line = logging.LogRecord(logger, level, __file__, 1, "GET %s (127.0.0.1)", (uri,), None)
        for formatter in (logs.TextFormatter(logs.TEXT_FORMAT), logs.JsonFormatter()):
            text = formatter.format(line)
            assert OPAQUE not in text, text
            assert f"{name}=[redacted]&y=2" in text, text


def test_percent_encoded_jwts_are_redacted() -> None:
    encoded = JWT.replace(".", "%2E")
    assert encoded not in logs.redact(f"/ws?t={encoded}")
    assert logs.redact("/ws?access+token=visible") == "/ws?access+token=visible"  # not a token


@pytest.mark.parametrize("name", TOKEN_SPELLINGS[1:5])
async def test_encoded_parameter_names_never_reach_the_log(
    spawn: Any, tmp_path: Path, name: str
) -> None:
    server: ServerProcess = spawn(
        env={"PUSHSVC_LOG__LEVEL": "debug", "PUSHSVC_LOG__ACCESS_LOG": "true"}
    )
    # Honoured: the decoded parameter carries the token (first request and keep-alive paths).
    alice = Client(await websocket_connect(f"{server.ws_url}?{name}={JWT.replace('.', '%2E')}"))
    assert (await alice.recv_type("welcome"))["user"] == "alice"
    with pytest.raises(HTTPClientError) as refused:  # refused, logged at warning
        await websocket_connect(f"{server.ws_url}?{name}={OPAQUE}")
    assert refused.value.code == 401
    assert server.terminate() == 0
    text = server.log()
    for secret in (OPAQUE, JWT, JWT.split(".")[1], JWT.split(".")[2]):
        assert secret not in text, text
    assert f"{name}=[redacted]" in text
