"""Host name lookups that a name whose DNS hangs cannot starve.

trio looks names up in threads (the C library's resolver blocks), 40 at most by default, and a
lookup its caller gave up on keeps its thread until the resolver gives up too (about 10 s with
glibc's defaults). A proxy checks every hub each round and dials hubs for requests: a dozen hub
names whose DNS servers do not answer filled those 40 places within a few rounds, and then no name
resolved at all, ``localhost`` included; the healthy hubs were marked down and every client got 503.

Here a lookup runs in a thread of its own, owned by no caller, and every caller that asks the same
while it runs waits for its answer (or for its own timeout) instead of starting another: a name
whose DNS hangs holds one thread however often it is asked, a burst of new connections to one name
costs one lookup, and names never wait for one another. Threads are bounded by the distinct names
being looked up at once, which configuration gives (hubs, engines), not clients.
"""

from __future__ import annotations

import socket
from typing import Any

import trio

_Key = tuple[Any, ...]


class _Lookup:
    def __init__(self) -> None:
        self.done = trio.Event()
        self.addresses: list[Any] = []
        self.error: BaseException | None = None


class NameLookups(trio.abc.HostnameResolver):
    """``trio.socket.set_custom_hostname_resolver(NameLookups())`` in a daemon's run."""

    def __init__(self) -> None:
        self._running: dict[_Key, _Lookup] = {}

    async def getaddrinfo(self, host: bytes | None, port: bytes | str | int | None, family: int = 0,
                          socktype: int = 0, proto: int = 0, flags: int = 0) -> list[Any]:
        key = (host, port, family, socktype, proto, flags)
        if (lookup := self._running.get(key)) is None:
            lookup = self._running[key] = _Lookup()
            token = trio.lowlevel.current_trio_token()

            def deliver(result: Any) -> None:  # (an outcome, in the lookup's thread)
                try:
                    token.run_sync_soon(self._finished, key, lookup, result)
                except trio.RunFinishedError:
                    pass

            trio.lowlevel.start_thread_soon(lambda: socket.getaddrinfo(*key), deliver, name=f"lookup {host!r}")
        await lookup.done.wait()
        if (error := lookup.error) is not None:  # each caller its own copy: a raise adds to its traceback
            raise type(error)(*error.args) if isinstance(error, OSError) else error
        return list(lookup.addresses)  # (a copy: trio's open_tcp_stream reorders the list it gets)

    def _finished(self, key: _Key, lookup: _Lookup, result: Any) -> None:
        try:
            lookup.addresses = result.unwrap()
        except BaseException as error:  # (the lookup's, handed to each caller)
            lookup.error = error
        lookup.done.set()
        if self._running.get(key) is lookup:
            del self._running[key]

    async def getnameinfo(self, sockaddr: tuple[Any, ...], flags: int) -> tuple[str, str]:
        return await trio.to_thread.run_sync(socket.getnameinfo, sockaddr, flags, abandon_on_cancel=True)
