"""Eager coroutines behave like tasks: results, errors, cancellation, bare yields."""

from __future__ import annotations

import asyncio

import pytest

from pushsvc.transport import eager


async def test_finishes_synchronously_without_a_future() -> None:
    seen: list[int] = []

    async def quick() -> None:
        seen.append(1)

    assert eager.start(quick()) is None
    assert seen == [1]


async def test_waits_and_returns_the_result() -> None:
    gate: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    async def slow() -> int:
        await asyncio.sleep(0)  # a bare yield
        return await gate + 1

    future = eager.start(slow())
    assert future is not None and not future.done()
    asyncio.get_running_loop().call_later(0.01, gate.set_result, 41)
    assert await future == 42


async def test_errors_and_cancellation_reach_the_future() -> None:
    gate: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def failing() -> None:
        await gate
        raise ValueError("boom")

    future = eager.start(failing())
    assert future is not None
    gate.set_result(None)
    with pytest.raises(ValueError, match="boom"):
        await future

    other: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def waiting() -> None:
        await other

    cancelled = eager.start(waiting())
    assert cancelled is not None
    other.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled


async def test_errors_before_the_first_wait_raise_at_once() -> None:
    async def broken() -> None:
        raise RuntimeError("early")

    with pytest.raises(RuntimeError, match="early"):
        eager.start(broken())
