"""pytest fixtures of :mod:`pushsvc.testing`, registered through the ``pytest11`` entry point.

Installed with pushsvc, so a plugin's tests use them without a conftest:

- ``pushsvc_start``: ``await pushsvc_start(*plugins, **sections)`` starts a
  server (:class:`~pushsvc.testing.TestServer`) with the installed plugins,
  the ``(name, object)`` plugins given and the config ``sections``; every
  server it started is stopped at the end of the test.
- ``pushsvc_server``: one server with the installed plugins and the default
  config.

The fixtures are ``async``: they need pytest-asyncio (``pip install
'pushsvc[testing]'``), in ``asyncio_mode = "auto"`` or with the tests marked
``@pytest.mark.asyncio``.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from pushsvc.testing import TestServer, serve

if TYPE_CHECKING:  # pytest-asyncio's fixture takes what pytest's does
    async_fixture = pytest.fixture
else:
    try:
        from pytest_asyncio import fixture as async_fixture
    except ImportError:  # the fixtures then fail when used, not when pytest starts
        async_fixture = pytest.fixture

Start = Callable[..., Awaitable[TestServer]]


@async_fixture
async def pushsvc_start(tmp_path: Path) -> AsyncIterator[Start]:
    """A factory of servers: ``await pushsvc_start(("name", plugin), ratelimit={...})``."""
    async with contextlib.AsyncExitStack() as stack:
        count = 0

        async def start(*plugins: tuple[str, object], **sections: dict[str, Any]) -> TestServer:
            nonlocal count
            count += 1
            return await stack.enter_async_context(
                serve(*plugins, config=sections, data_dir=tmp_path / f"pushsvc-{count}")
            )

        yield start


@async_fixture
async def pushsvc_server(pushsvc_start: Start) -> TestServer:
    """A server with the installed plugins and the default config."""
    return await pushsvc_start()
