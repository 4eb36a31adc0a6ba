"""``pushsvc new-plugin NAME``: write a working plugin distribution to start from.

The distribution has a package with one message type and one hook, the
``pushsvc`` entry point, a test written with :mod:`pushsvc.testing` that
passes as generated, and a README. Nothing is installed.
"""

from __future__ import annotations

import re
from pathlib import Path

from pushsvc.plugin.api import PLUGIN_API_VERSION
from pushsvc.protocol.commands import CORE_TYPES
from pushsvc.version import __version__

#: A plugin name: its entry-point name, message type and (``pushsvc_<name>``) package.
NAME = re.compile(r"^[a-z][a-z0-9_]{0,39}$")

SETUP_CFG = """\
[metadata]
name = pushsvc-{dist}
version = 0.1.0
description = pushsvc plugin: the "{name}" message type

[options]
packages = pushsvc_{name}
python_requires = >=3.11
install_requires =
    pushsvc>={pushsvc_version}

[options.extras_require]
test =
    pushsvc[testing]>={pushsvc_version}

[options.entry_points]
pushsvc =
    {name} = pushsvc_{name}
"""

PYPROJECT = """\
[build-system]
requires = ["setuptools>=64", "wheel"]
build-backend = "setuptools.build_meta"

[tool.pytest.ini_options]
testpaths = ["tests"]
asyncio_mode = "auto"
asyncio_default_fixture_loop_scope = "function"
"""

MODULE = '''\
"""pushsvc plugin ``{name}``: a text to the other members of a room.

Registered through the ``pushsvc`` entry point in setup.cfg. pushsvc's
docs/plugins.md describes every hook and the plugin API.
"""

from __future__ import annotations

import logging

from pushsvc import CommandError, Field, FrameContext, MessageType, Principal, Reply, hookimpl

log = logging.getLogger(__name__)

#: The plugin API this plugin needs (pushsvc refuses to load it on an older one).
PUSHSVC_PLUGIN_API = "{api_version}"
MAX_TEXT = 1000


async def handle_{name}(ctx: FrameContext) -> Reply:
    """Send ``text`` to the other connections in ``room``; the reply carries the id."""
    room = ctx.frame["room"]
    if not ctx.node.is_member(ctx.session, room):
        raise CommandError("forbidden", f"join {{room!r}} first")
    message = {{
        "type": "{name}",
        "room": room,
        "user": ctx.principal.user,
        "text": ctx.frame["text"],
    }}
    message_id = await ctx.publish(room, message, exclude=ctx.session)
    return Reply({{"id": message_id}})


@hookimpl
def pushsvc_register_message_types() -> list[MessageType]:
    """Declare ``{name}``: at most once, 5 per second per user (bursts of 10)."""
    return [
        MessageType(
            "{name}",
            handle_{name},
            {{"room": Field(str, max_length=200), "text": Field(str, max_length=MAX_TEXT)}},
            rate=5,
            burst=10,
            description="text to the other members of a room",
        )
    ]


@hookimpl
def pushsvc_joined(principal: Principal, session: str, room: str) -> None:
    """Log every join (a notification hook: an exception here stops no one else)."""
    log.info("%s joined %s", principal.user, room)
'''

TEST = '''\
"""Tests of the ``{name}`` plugin, against a real pushsvc (``pushsvc.testing``)."""

from __future__ import annotations

from pushsvc.testing import TestServer


async def test_{name}_reaches_the_other_members(pushsvc_server: TestServer) -> None:
    ann = await pushsvc_server.connect("ann", rooms=["*"])
    ben = await pushsvc_server.connect("ben", rooms=["*"])
    await ann.join("room1")
    await ben.join("room1")
    reply = await ann.request({{"type": "{name}", "room": "room1", "text": "hello"}})
    assert reply["type"] == "reply", reply
    frame = await ben.recv_type("{name}")
    assert frame["id"] == reply["id"]
    assert frame["user"] == "ann" and frame["text"] == "hello"
    await ann.expect_nothing(0.2, ignore=("presence",))  # the sender is left out


async def test_{name}_needs_the_room(pushsvc_server: TestServer) -> None:
    ann = await pushsvc_server.connect("ann", rooms=["*"])
    error = await ann.request({{"type": "{name}", "room": "elsewhere", "text": "hi"}})
    assert error["type"] == "error" and error["code"] == "forbidden"
'''

README = """\
# pushsvc-{dist}

A [pushsvc](https://pypi.org/project/pushsvc/) plugin adding the `{name}`
message type: a text to the other members of a room.

    {{"type": "{name}", "room": "room1", "text": "hello", "ref": "1"}}

## Install

    pip install .

`pushsvc plugins` then lists `{name}`; restart pushsvc to load it. Disable
it with `plugins.disabled = ["{name}"]`.

## Develop

    pip install -e '.[test]'
    pytest

The tests start a real pushsvc in-process with this plugin installed
(`pushsvc.testing`, whose pytest fixtures come with pushsvc).
"""


def check_name(name: str) -> str | None:
    """Why ``name`` cannot name a plugin, or None when it can."""
    if not NAME.match(name):
        return "a plugin name is lowercase letters, digits and _, starting with a letter (<= 40)"
    if name in CORE_TYPES:
        return f"{name!r} is a core command"
    return None


def write(name: str, parent: Path) -> Path:
    """Write the distribution of plugin ``name`` as ``parent/pushsvc-<name>``; returns it.

    Raises:
        ValueError: a bad name (:func:`check_name`).
        FileExistsError: the folder exists already (nothing is overwritten).
    """
    problem = check_name(name)
    if problem:
        raise ValueError(problem)
    dist = name.replace("_", "-")
    root = parent / f"pushsvc-{dist}"
    root.mkdir(parents=True)
    values = {
        "name": name,
        "dist": dist,
        "pushsvc_version": __version__,
        "api_version": PLUGIN_API_VERSION,
    }
    files = {
        "setup.cfg": SETUP_CFG,
        "pyproject.toml": PYPROJECT,
        "README.md": README,
        f"pushsvc_{name}/__init__.py": MODULE,
        f"tests/test_{name}.py": TEST,
    }
    for relative, template in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(template.format(**values))
    return root
