"""A batch of WebSocket messages to a hub, in one write.

trio-websocket writes each message on its own. A link's batch often holds two: an answer's chunk
records (binary) and then its ``end`` (text), which a short answer's last read of its engine brings
together. Written apart, they cost the worker two writes, and the hub two reads, two wake-ups of the
request and two writes to its client (the stream's last event apart from its end), each passed on
by a proxy as such. Here they go out in one write, framed by trio-websocket's own wsproto connection
under its own lock: private attributes of its ``WebSocketConnection`` (0.12); a release without
them gets the messages one by one, as before.
"""

from __future__ import annotations

from collections.abc import Sequence

import trio
import trio_websocket
from wsproto.events import BytesMessage, TextMessage


async def send_together(ws: trio_websocket.WebSocketConnection, messages: Sequence[str | bytes]) -> None:
    """Send ``messages`` in order, in one write of the socket when there are several."""
    framer, stream, lock = (getattr(ws, name, None) for name in ("_wsproto", "_stream", "_stream_lock"))
    if len(messages) == 1 or framer is None or stream is None or lock is None:
        for message in messages:
            await ws.send_message(message)
        return
    if ws.closed is not None:  # (as send_message: a link closing takes no more)
        raise trio_websocket.ConnectionClosed(ws.closed)
    data = b"".join(framer.send(TextMessage(data=message) if isinstance(message, str) else BytesMessage(data=message))
                    for message in messages)
    async with lock:
        try:
            await stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            await ws._abort_web_socket()  # (as trio-websocket's own send: the link is closed, and says why)
            raise trio_websocket.ConnectionClosed(ws.closed) from None
