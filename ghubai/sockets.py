"""Socket reads and writes the kernel serves at once, without trio's machinery around them.

trio's ``send_all`` costs a conflict check, a memoryview and two scheduler calls on every write,
and the callers here wrap it in a cancel scope with a deadline (the hub also in a lock); on loopback
and LAN sockets the kernel's buffer nearly always has room, so all that is for nothing.
``write_now`` tries one ``os.write`` first; only what the socket did not take goes the slow way,
with its timeout. It is still a checkpoint, as every trio I/O is: it raises ``Cancelled`` before
writing when the caller is cancelled (unless ``shielded``), and yields after, so that a task that
only writes (a simulator's burst, a relay) neither ignores a cancel nor starves the others — and
hypercorn, which may close the connection next, does not turn the answer into a RST that the
client never reads (a request body left unread makes a close a RST).

``read_now`` is the same for a read: a stream's reader that is behind (a worker under load reading
its engine) finds bytes waiting, and then needs no deadline and none of ``receive_some``'s
wrappers; only a read that must wait pays for them.

``open_listeners`` is every role's listening sockets.
"""

from __future__ import annotations

import errno
import os

import trio

from ghubai.config import listen_host

RECEIVE_SIZE = 65536  # the most one read takes


async def write_now(stream: trio.abc.Stream, data: bytes, *, shielded: bool = False) -> bytes:
    """Write what the socket takes without waiting; return what is left (all of it for a TLS
    stream, a full buffer or a broken socket, whose error the caller's slow path then raises).
    ``shielded``: the caller's own scope decides cancellation (the hub's writes are never cut)."""
    if not data or type(stream) is not trio.SocketStream:
        return data
    if not shielded:
        await trio.lowlevel.checkpoint_if_cancelled()
    try:
        data = data[os.write(stream.socket.fileno(), data):]
    except OSError:  # would block, or broken
        return data
    if not data:
        await trio.lowlevel.cancel_shielded_checkpoint()
    return data


async def open_listeners(host: str, port: int, backlog: int | None = None) -> list[trio.SocketListener]:
    """Listeners on every address ``host`` names (``[::]``: every address, IPv4 too), as trio opens
    them, and all on one port: with port 0 trio gives each address its own (``[::]:0`` listened on
    IPv4 and IPv6 at two ports, and the IPv6 one was never said)."""
    bind = listen_host(host)
    for _ in range(3):  # (another process may take the port between the two opens)
        listeners = await trio.open_tcp_listeners(port, host=bind, backlog=backlog)
        if port or len(listeners) < 2:
            return listeners
        chosen = listeners[0].socket.getsockname()[1]
        for listener in listeners:
            await listener.aclose()
        try:
            return await trio.open_tcp_listeners(chosen, host=bind, backlog=backlog)
        except OSError as error:
            if error.errno != errno.EADDRINUSE:
                raise
    raise OSError(errno.EADDRINUSE, f"no port free on every address of {host}")


async def read_now(stream: trio.abc.Stream, max_bytes: int) -> bytes | None:
    """What has arrived on the socket (b"" once the peer closed), without waiting; None when nothing
    has (or for a TLS stream, or a socket closed here): then the caller waits the slow way, with
    its timeout. A broken connection raises trio.BrokenResourceError at once, as ``receive_some``
    would: the kernel reports a reset to one read only. A checkpoint, as ``write_now``."""
    if type(stream) is not trio.SocketStream:
        return None
    await trio.lowlevel.checkpoint_if_cancelled()
    try:
        data = os.read(stream.socket.fileno(), max_bytes)
    except BlockingIOError:  # nothing yet
        return None
    except OSError as error:
        if error.errno == errno.EBADF:  # closed here: the slow path says so (trio.ClosedResourceError)
            return None
        await trio.lowlevel.cancel_shielded_checkpoint()
        raise trio.BrokenResourceError(f"socket connection broken: {error}") from error
    await trio.lowlevel.cancel_shielded_checkpoint()
    return data
