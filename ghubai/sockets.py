"""A socket write the kernel takes at once, without trio's machinery around it.

trio's ``send_all`` costs a conflict check, a memoryview and a cancel check on every write, and the
callers here wrap it in a cancel scope with a deadline (the hub also in a lock); on loopback and
LAN sockets the kernel's buffer nearly always has room, so all that is for nothing. ``write_now``
tries one ``os.write`` first; only what the socket did not take goes the slow way, with its
timeout. It still yields once, as every trio I/O does: a task that only writes (a simulator's
burst, a relay) must not starve the others, and hypercorn may close the connection next (with a
request body unread, that close is a RST that can destroy the answer before its client reads it).
"""

from __future__ import annotations

import os

import trio


async def write_now(stream: trio.abc.Stream, data: bytes) -> bytes:
    """Write what the socket takes without waiting; what is left (all of it for a TLS stream, a
    full buffer or a broken socket, whose error the caller's slow path then raises)."""
    if not data or type(stream) is not trio.SocketStream:
        return data
    try:
        data = data[os.write(stream.socket.fileno(), data):]
    except OSError:  # would block, or broken
        return data
    if not data:
        await trio.lowlevel.cancel_shielded_checkpoint()
    return data
