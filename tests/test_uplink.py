"""A worker's batch of messages to its hub goes out in one write (``ghubai.worker.uplink``), over a
real trio-websocket link on loopback."""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio_websocket

from conftest import WAIT_S
from ghubai.worker.uplink import send_together


async def test_a_batch_of_messages_is_one_write_and_arrives_in_order(monkeypatch: pytest.MonkeyPatch) -> None:
    """Before, an answer's chunks and its end were two writes: two reads and two wake-ups at the hub,
    and the stream's last event written to its client apart from its end."""
    heard: list[str | bytes] = []
    closed = trio.Event()

    async def hub(request: trio_websocket.WebSocketRequest) -> None:
        ws = await request.accept()
        for _ in range(3):
            heard.append(await ws.get_message())
        await ws.aclose()
        closed.set()

    async with trio.open_nursery() as nursery:
        server = await nursery.start(trio_websocket.serve_websocket, hub, "127.0.0.1", 0, None)
        writes: list[int] = []
        send_all = trio.SocketStream.send_all

        async def counted(self: trio.SocketStream, data: Any) -> None:
            writes.append(len(data))
            await send_all(self, data)

        async with trio_websocket.open_websocket_url(f"ws://127.0.0.1:{server.port}/") as ws:
            monkeypatch.setattr(trio.SocketStream, "send_all", counted)
            with trio.fail_after(WAIT_S):
                await send_together(ws, [b"chunk records", '{"type":"end"}'])
                assert len(writes) == 1
                await send_together(ws, ["one alone"])
                await closed.wait()
            assert heard == [b"chunk records", '{"type":"end"}', "one alone"]
            with pytest.raises(trio_websocket.ConnectionClosed):  # as trio-websocket's own send says it
                await send_together(ws, [b"late", "too late"])
        nursery.cancel_scope.cancel()
