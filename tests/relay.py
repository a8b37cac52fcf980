"""A TCP relay between a worker and its hub, as networks treat a link: slow, late, cut or frozen."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import trio


class Relay:
    """A TCP relay between a worker and its hub at ``port``, as networks treat a link: hub → worker
    bytes at ``rate`` bytes/s (0: at once) and ``delay`` s late; ``frozen``: nothing more goes either
    way and nothing closes (a partition, as both ends see it); ``cut()`` closes every relayed
    connection (a reset), as a request carrying ``cut_on`` does; ``hello`` is set at the worker's second write (its hello, after the upgrade)."""

    def __init__(self, port: int, rate: int = 0, delay: float = 0.0, cut_on: bytes = b"") -> None:
        self.port, self.rate, self.delay, self.cut_on = port, rate, delay, cut_on
        self.cuts = 0  # how often ``cut_on``, seen on its way to the worker, cut the link
        self.streams: list[trio.SocketStream] = []
        self.frozen = False
        self.worker_sent = 0
        self.hello = trio.Event()

    async def serve(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        task_status.started(listeners[0].socket.getsockname()[1])
        await trio.serve_listeners(self._relay, listeners)

    async def _relay(self, worker: trio.SocketStream) -> None:
        async with await trio.open_tcp_stream("127.0.0.1", self.port) as hub, worker:
            self.streams += [worker, hub]
            late, due = trio.open_memory_channel[tuple[float, bytes]](1000)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._pump, worker, hub.send_all, self._from_worker)
                nursery.start_soon(self._pump, hub, lambda data: late.send((trio.current_time() + self.delay, data)),
                                   None)
                nursery.start_soon(self._paced, due, worker)

    def _from_worker(self) -> None:
        self.worker_sent += 1
        if self.worker_sent == 2:
            self.hello.set()

    async def _pump(self, source: trio.SocketStream, send: Callable[[bytes], Any], seen: Callable[[], None] | None) -> None:
        try:
            while data := await source.receive_some(16384):
                if self.frozen:
                    await trio.sleep_forever()
                if seen is not None:
                    seen()
                await send(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        await source.aclose()

    async def _paced(self, due: trio.MemoryReceiveChannel[tuple[float, bytes]], worker: trio.SocketStream) -> None:
        try:
            async for at, data in due:
                await trio.sleep_until(at)
                if self.frozen:
                    await trio.sleep_forever()
                if self.cut_on and self.cut_on in data:  # a request that breaks the link (a poison)
                    self.cuts += 1
                    await self.cut()
                    return
                await worker.send_all(data)
                if self.rate:
                    await trio.sleep(len(data) / self.rate)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    async def cut(self) -> None:
        streams, self.streams = self.streams, []
        for stream in streams:
            await stream.aclose()
