"""Host name lookups that a name whose DNS hangs cannot starve.

trio looks names up in threads (the C library's resolver blocks), 40 at most by default, and a
lookup its caller gave up on keeps its thread until the resolver gives up too (about 10 s with
glibc's defaults). A proxy checks every hub each round and dials hubs for requests: a dozen hub
names whose DNS servers do not answer filled those 40 places within a few rounds, and then no name
resolved at all, ``localhost`` included; the healthy hubs were marked down and every client got 503.

Here each name has one place of its own: a lookup of a name that is already being looked up waits
for that one (or for its caller's timeout) instead of starting another thread, and names never wait
for one another. Threads are bounded by the names being looked up at once, which configuration
gives (hubs, engines), not clients.
"""

from __future__ import annotations

import socket
from typing import Any

import trio


class NameLookups(trio.abc.HostnameResolver):
    """``trio.socket.set_custom_hostname_resolver(NameLookups())`` in a daemon's run."""

    def __init__(self) -> None:
        self._running: dict[bytes | str | None, trio.CapacityLimiter] = {}

    async def getaddrinfo(self, host: bytes | None, port: bytes | str | int | None, family: int = 0, type: int = 0,
                          proto: int = 0, flags: int = 0) -> list[Any]:
        # the thread holds its name's place until it returns, even when its caller gave up on it
        place = self._running.setdefault(host, trio.CapacityLimiter(1))
        try:
            return await trio.to_thread.run_sync(socket.getaddrinfo, host, port, family, type, proto, flags,
                                                 abandon_on_cancel=True, limiter=place)
        finally:
            taken = place.statistics()
            if not taken.borrowed_tokens and not taken.tasks_waiting and self._running.get(host) is place:
                del self._running[host]

    async def getnameinfo(self, sockaddr: tuple[Any, ...], flags: int) -> tuple[str, str]:
        return await trio.to_thread.run_sync(socket.getnameinfo, sockaddr, flags, abandon_on_cancel=True)
