"""The example plugin's own tests, written with pushsvc.testing as a plugin author would.

They run against a real pushsvc started in-process (the ``pushsvc_server``
fixture comes with pushsvc), with this distribution installed.
"""

from __future__ import annotations

from typing import Any

from pushsvc.testing import TestServer


async def test_poke_is_delivered_and_acked(pushsvc_server: TestServer) -> None:
    ann = await pushsvc_server.connect("ann")
    ben = await pushsvc_server.connect("ben")
    reply = await ann.request({"type": "poke", "to": "ben", "emoji": "👋"})
    assert reply["type"] == "reply", reply
    poke = await ben.recv_type("poke")
    assert poke["id"] == reply["id"] and poke["from"] == "ann" and poke["ack"] is True
    assert await ben.ack(poke["id"]) == 1


async def test_poke_validates_its_fields(pushsvc_server: TestServer) -> None:
    ann = await pushsvc_server.connect("ann")
    error = await ann.request({"type": "poke", "to": "ben", "emoji": "x" * 9})
    assert error["code"] == "bad_request" and error["message"].startswith("emoji:")


async def test_stats_route(pushsvc_start: Any) -> None:
    server = await pushsvc_start(ratelimit={"rate": 100, "burst": 100})
    ann = await server.connect("ann")
    await ann.request({"type": "poke", "to": "ann"})
    response = await server.http("GET", "/poke/stats", token="")
    assert response.status == 200 and response.body["pokes"]["ann"] >= 1
