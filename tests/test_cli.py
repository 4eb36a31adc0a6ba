"""The command line, run as subprocesses: serve, token, check-config."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import jwt
import orjson
from tornado.websocket import websocket_connect

from conftest import BIN, SECRET


def pushsvc(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "pushsvc"), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={"PATH": "/usr/bin:/bin", "PUSHSVC_JWT_SECRET": SECRET, **(env or {})},
    )


async def test_serve_subprocess_accepts_a_minted_token(spawn: Any) -> None:
    server = spawn()
    assert f"listening on http://127.0.0.1:{server.port}" in server.log()
    minted = pushsvc(
        "token",
        "--sub",
        "cli-user",
        "--name",
        "Cli",
        "--rooms",
        "a b*",
        "--scope",
        "publish notify",
        "--ttl",
        "120",
    ).stdout.strip()
    claims = jwt.decode(minted, SECRET, algorithms=["HS256"])
    assert claims["sub"] == "cli-user" and claims["rooms"] == ["a", "b*"]
    assert claims["scope"] == "publish notify" and claims["exp"] - claims["iat"] == 120
    conn = await websocket_connect(f"{server.ws_url}?access_token={minted}")
    welcome = orjson.loads(await conn.read_message())
    assert welcome["type"] == "welcome" and welcome["user"] == "cli-user"
    conn.close()
    assert server.terminate() == 0
    assert minted not in server.log()


def test_check_config_names_bad_key(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[ratelimit]\nrate = -5\n")
    result = pushsvc("check-config", "--config", str(path))
    assert result.returncode == 2
    assert "ratelimit.rate: must be at least 0" in result.stderr
    env_result = pushsvc("check-config", env={"PUSHSVC_SERVER__PORT": "http"})
    assert env_result.returncode == 2 and "server.port" in env_result.stderr
    good = pushsvc("check-config", env={"PUSHSVC_RATELIMIT__RATE": "5"})
    assert good.returncode == 0 and "rate = 5.0" in good.stdout
    assert SECRET not in good.stdout


def test_token_needs_a_secret() -> None:
    result = subprocess.run(
        [str(BIN / "pushsvc"), "token", "--sub", "x"],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin"},
        check=False,
    )
    assert result.returncode == 2 and "no JWT secret" in result.stderr
