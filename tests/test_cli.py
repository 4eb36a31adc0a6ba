"""The command line, run as subprocesses: serve, token, check-config."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import jwt
import orjson
from tornado.httpclient import AsyncHTTPClient, HTTPRequest
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


async def test_serve_dev_serves_the_demo_and_dev_tokens(spawn: Any) -> None:
    """``serve --dev`` turns demo.enabled on and serves POST /dev/token (generated secret)."""
    server = spawn("--dev", env={"PUSHSVC_JWT_SECRET": ""})
    log = server.log()
    assert f"demo chat page: http://127.0.0.1:{server.port}/demo" in log
    match = re.search(r"generated JWT secret (\S+)", log)
    assert match is not None
    client = AsyncHTTPClient()
    page = await client.fetch(f"{server.base}/demo", raise_error=False)
    assert page.code == 200 and b"/client/demo.js" in page.body
    request = HTTPRequest(f"{server.base}/dev/token", method="POST", body=b'{"name": "dana"}')
    minted = orjson.loads((await client.fetch(request)).body)["token"]
    claims = jwt.decode(minted, match.group(1), algorithms=["HS256"])
    assert claims["sub"] == "dana" and claims["name"] == "dana"
    conn = await websocket_connect(f"{server.ws_url}?access_token={minted}")
    welcome = orjson.loads(await conn.read_message())
    assert welcome["type"] == "welcome" and welcome["user"] == "dana"
    conn.close()
    assert server.terminate() == 0
    assert minted not in server.log()


async def test_serve_without_dev_has_no_demo(spawn: Any) -> None:
    server = spawn()
    client = AsyncHTTPClient()
    for method, path, body in (
        ("GET", "/", None),
        ("GET", "/demo", None),
        ("POST", "/dev/token", b"{}"),
    ):
        response = await client.fetch(
            HTTPRequest(server.base + path, method=method, body=body), raise_error=False
        )
        assert response.code == 404, path
        assert orjson.loads(response.body)["error"] == "not_found"
    assert (await client.fetch(f"{server.base}/client/pushsvc.js")).code == 200
    assert "demo chat page" not in server.log()
