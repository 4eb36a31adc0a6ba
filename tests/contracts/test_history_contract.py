"""The room history contract (:class:`pushsvc.store.HistoryStore`), for every store.

Runs once per entry of ``IMPLEMENTATIONS`` in ``test_store_contract.py`` (the
next store is one more entry there) and uses only the Protocol's methods.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import orjson
import pytest
from test_store_contract import (  # the implementations and their fixtures
    Implementation,
    impl,
    open_store,
    reopen,
    store,
    url,
)

from pushsvc.store import EPOCH_RETENTION, HistoryRetention, Store, StoreUnavailable

__all__ = ["impl", "open_store", "store", "url"]  # fixtures, imported for pytest

KEEP = HistoryRetention(size=1000, ttl=600.0)


def encoder(text: str) -> Callable[[int, str], bytes]:
    """A frame that carries its position, as the node's encoder makes it."""

    def encode(offset: int, epoch: str) -> bytes:
        return orjson.dumps({"type": "chat", "text": text, "offset": offset, "epoch": epoch})

    return encode


async def append(store: Store, room: str, text: str, keep: HistoryRetention = KEEP) -> int:
    return (await store.append(room, "chat", encoder(text), keep)).offset


def texts(page_entries: object) -> list[str]:
    return [orjson.loads(e.frame)["text"] for e in page_entries]  # type: ignore[attr-defined]


async def test_offsets_start_at_one_and_grow_by_one_per_room(store: Store) -> None:
    first = await store.append("a", "chat", encoder("a1"), KEEP)
    assert first.offset == 1 and first.epoch
    assert orjson.loads(first.frame) == {
        "type": "chat",
        "text": "a1",
        "offset": 1,
        "epoch": first.epoch,
    }
    assert await append(store, "a", "a2") == 2
    assert await append(store, "b", "b1") == 1  # rooms are independent
    other = await store.append("b", "chat", encoder("b2"), KEEP)
    assert other.epoch != first.epoch  # an epoch per room history


async def test_concurrent_appends_get_distinct_consecutive_offsets(store: Store) -> None:
    results = await asyncio.gather(
        *(store.append("r", "chat", encoder(str(i)), KEEP) for i in range(200))
    )
    assert sorted(r.offset for r in results) == list(range(1, 201))
    assert len({r.epoch for r in results}) == 1
    for result in results:  # each frame was encoded with its own position
        assert orjson.loads(result.frame)["offset"] == result.offset


async def test_history_forward_reverse_and_pagination(store: Store) -> None:
    for i in range(1, 11):
        await append(store, "r", f"m{i}")
    page = await store.history("r", None, 4)
    assert [e.offset for e in page.entries] == [1, 2, 3, 4]
    assert texts(page.entries) == ["m1", "m2", "m3", "m4"]
    assert (page.top, page.earliest) == (10, 1)
    page = await store.history("r", 4, 4)
    assert [e.offset for e in page.entries] == [5, 6, 7, 8]
    page = await store.history("r", 8, 4)
    assert [e.offset for e in page.entries] == [9, 10]
    back = await store.history("r", None, 3, reverse=True)
    assert [e.offset for e in back.entries] == [10, 9, 8]
    back = await store.history("r", 8, 3, reverse=True)
    assert [e.offset for e in back.entries] == [7, 6, 5]
    assert all(e.type == "chat" and e.created_at <= time.time() for e in back.entries)


async def test_unknown_room_has_no_epoch(store: Store) -> None:
    page = await store.history("never", None, 10)
    assert (page.epoch, page.top, page.earliest, list(page.entries)) == ("", 0, 1, [])


async def test_size_trims_the_oldest_entries(store: Store) -> None:
    small = HistoryRetention(size=3, ttl=600.0)
    for i in range(1, 8):
        await append(store, "r", f"m{i}", small)
    page = await store.history("r", 0, 100)
    assert [e.offset for e in page.entries] == [5, 6, 7]
    assert (page.top, page.earliest) == (7, 5)


async def test_ttl_hides_then_trims_entries_keeping_the_position(store: Store) -> None:
    short = HistoryRetention(size=100, ttl=0.2)
    first = await store.append("r", "chat", encoder("old"), short)
    await asyncio.sleep(0.3)
    page = await store.history("r", 0, 10)
    assert list(page.entries) == []  # expired entries are never served
    assert (page.epoch, page.top, page.earliest) == (first.epoch, 1, 2)
    stats = await store.trim_history(time.time())
    assert stats.entries == 0 and stats.rooms == 1  # the epoch stays for a while
    second = await store.append("r", "chat", encoder("new"), short)
    assert (second.offset, second.epoch) == (2, first.epoch)


async def test_a_forgotten_room_starts_a_new_epoch(store: Store) -> None:
    first = await store.append("r", "chat", encoder("x"), HistoryRetention(10, 1.0))
    stats = await store.trim_history(time.time() + 2 + EPOCH_RETENTION)
    assert (stats.rooms, stats.entries) == (0, 0)
    assert (await store.history("r", None, 10)).epoch == ""
    again = await store.append("r", "chat", encoder("y"), KEEP)
    assert again.offset == 1 and again.epoch != first.epoch


async def test_history_and_offsets_survive_a_restart(
    store: Store, open_store: Callable[[], Awaitable[Store]]
) -> None:
    for i in range(1, 6):
        await append(store, "r", f"m{i}")
    epoch = (await store.history("r", None, 1)).epoch
    store = await reopen(store, open_store)
    page = await store.history("r", 2, 10)
    assert page.epoch == epoch and [e.offset for e in page.entries] == [3, 4, 5]
    nxt = await store.append("r", "chat", encoder("m6"), KEEP)
    assert (nxt.offset, nxt.epoch) == (6, epoch)


async def test_a_failed_append_persists_nothing_and_reuses_no_offset(
    store: Store, impl: Implementation, url: str
) -> None:
    await append(store, "r", "m1")
    with impl.outage(url), pytest.raises(StoreUnavailable):
        await append(store, "r", "lost")
    assert await append(store, "r", "m2") == 2  # the failed one took no offset
    page = await store.history("r", None, 10)
    assert texts(page.entries) == ["m1", "m2"]


async def test_an_encoder_writing_its_position_twice(store: Store) -> None:
    def encode(offset: int, epoch: str) -> bytes:
        return orjson.dumps({"offset": offset, "epoch": epoch, "copy": [offset, epoch]})

    results = await asyncio.gather(*(store.append("r", "chat", encode, KEEP) for _ in range(20)))
    assert sorted(r.offset for r in results) == list(range(1, 21))
    for result in results:
        assert orjson.loads(result.frame) == {
            "offset": result.offset,
            "epoch": result.epoch,
            "copy": [result.offset, result.epoch],
        }
    page = await store.history("r", None, 100)
    assert [orjson.loads(e.frame)["copy"][0] for e in page.entries] == list(range(1, 21))
