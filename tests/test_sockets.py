"""``write_now``: what the socket takes at once leaves at once; the rest is left for trio's slow
path (a full buffer, a TLS stream, a broken socket), so no byte is lost or sent twice.
``read_now``: what has arrived is read at once; with nothing there the caller waits the slow way.
A request's watch on its client's socket: ended by its owner without a ``Cancelled``, or by the client."""

from __future__ import annotations

import socket
import struct

import pytest
import trio
import trio.testing

from ghubai.http11.server import Connection
from ghubai.sockets import open_listeners, read_now, write_now


async def test_a_write_with_room_leaves_whole_and_a_full_buffer_leaves_the_rest_in_order() -> None:
    left, right = trio.socket.socketpair()
    ours, theirs = trio.SocketStream(left), trio.SocketStream(right)
    assert await write_now(ours, b"hello") == b"" and await theirs.receive_some(100) == b"hello"
    data = bytes(range(256)) * 40_000  # 10 MB: more than any socket buffer
    rest = await write_now(ours, data)
    assert 0 < len(rest) < len(data) and data.endswith(rest)
    received = bytearray()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(ours.send_all, rest)  # the slow path takes the rest
        while len(received) < len(data):
            received += await theirs.receive_some(1 << 20)
    assert received == data


async def test_other_streams_and_broken_sockets_leave_everything_to_the_slow_path() -> None:
    left, right = trio.socket.socketpair()
    ours = trio.SocketStream(left)
    assert await write_now(trio.testing.MemorySendStream(), b"x") == b"x"  # not a socket: not ours to write
    right.close()
    assert await write_now(ours, b"lost?") in (b"", b"lost?")  # the first write after a close may still go
    assert await write_now(ours, b"again") == b"again"  # the peer is gone: the slow path will say so
    await ours.aclose()
    assert await write_now(ours, b"closed") == b"closed"


async def test_a_task_that_only_writes_still_lets_the_others_run() -> None:
    """As every trio I/O: a simulator's burst of tokens must not starve its other streams."""
    left, _right = trio.socket.socketpair()
    ours, ran = trio.SocketStream(left), []

    async def other() -> None:
        ran.append(True)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(other)  # ready to run, not run yet
        for _ in range(3):  # (trio runs the tasks of one batch in random order: two yields suffice)
            assert await write_now(ours, b"token") == b""
        assert ran


async def test_a_cancelled_writer_writes_nothing_unless_shielded() -> None:
    """As trio's send_all: a cancel point before the write (a simulator stopping mid-burst stops);
    the hub's writes, which a request's cancel must not cut, pass ``shielded``."""
    left, right = trio.socket.socketpair()
    ours, theirs = trio.SocketStream(left), trio.SocketStream(right)
    with trio.CancelScope() as scope:
        scope.cancel()
        await write_now(ours, b"lost")
    assert scope.cancelled_caught
    with trio.CancelScope() as scope:
        scope.cancel()
        assert await write_now(ours, b"kept", shielded=True) == b""
    assert await theirs.receive_some(100) == b"kept"


async def test_a_read_takes_what_has_arrived_and_leaves_a_wait_to_the_slow_path() -> None:
    left, right = trio.socket.socketpair()
    ours, theirs = trio.SocketStream(left), trio.SocketStream(right)
    assert await read_now(ours, 100) is None  # nothing yet: the caller waits, with its timeout
    await theirs.send_all(b"hello")
    await theirs.send_all(b" you")
    assert await read_now(ours, 100) == b"hello you" and await read_now(ours, 100) is None
    assert await read_now(trio.testing.MemoryReceiveStream(), 100) is None  # not a socket: not ours to read
    await theirs.aclose()
    assert await read_now(ours, 100) == b""  # the peer closed, as receive_some says it
    await ours.aclose()
    assert await read_now(ours, 100) is None  # closed here: the slow path raises


async def test_a_cancelled_reader_reads_nothing_and_a_reader_lets_the_others_run() -> None:
    left, right = trio.socket.socketpair()
    ours, theirs = trio.SocketStream(left), trio.SocketStream(right)
    await theirs.send_all(b"kept")
    with trio.CancelScope() as scope:
        scope.cancel()
        await read_now(ours, 100)
    assert scope.cancelled_caught
    ran = []

    async def other() -> None:
        ran.append(True)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(other)
        assert await read_now(ours, 2) == b"ke"  # the bytes the cancelled read left
        assert await read_now(ours, 2) == b"pt"
        assert ran


async def test_a_reset_connection_raises_once_read_not_a_quiet_end() -> None:
    """The kernel reports a reset to one read only: read_now must raise it, not leave the slow path
    a clean end of stream (a truncated answer taken for a whole one)."""
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    listener.listen()
    client = trio.socket.socket()
    await client.connect(listener.getsockname())
    server, _ = await listener.accept()
    await server.send(b"partial")
    server.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    server.close()  # a RST
    ours, received = trio.SocketStream(client), b""
    with pytest.raises(trio.BrokenResourceError, match="reset"):
        for _ in range(100):  # (what was sent before the reset may be read first)
            data = await read_now(ours, 100)
            assert data != b""
            if data is None:
                await trio.lowlevel.wait_readable(client)
            else:
                received += data
    assert received in (b"", b"partial")
    listener.close()


async def test_a_watch_ends_quietly_when_its_owner_ends_it_and_cancels_the_request_when_the_client_leaves() -> None:
    listener, = await trio.open_tcp_listeners(0, host="127.0.0.1")
    client = await trio.testing.open_stream_to_socket_listener(listener)
    conn = Connection(await listener.accept())
    gone, until = trio.CancelScope(), trio.CancelScope()
    with trio.fail_after(5):  # (a watch that missed its end would wait for ever)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(conn.watch, gone, until)
            await trio.testing.wait_all_tasks_blocked()
            until.cancel()  # the answer ended: the watcher returns (a Cancelled would reach the nursery)
        assert not gone.cancel_called and not conn.peer_closed and until.cancelled_caught
        until = trio.CancelScope()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(conn.watch, gone, until)
            await client.aclose()
    assert gone.cancel_called and conn.peer_closed
    await conn.stream.aclose()
    await listener.aclose()


async def test_listeners_on_several_addresses_share_the_port_the_first_was_given() -> None:
    """Regression (a hunt): ``[::]:0`` listened on IPv4 and IPv6 at two ports, as trio gives each
    address its own for port 0, and the IPv6 one was never said (hub, registry and proxy alike)."""
    listeners = await open_listeners("::", 0)
    try:
        assert len({listener.socket.getsockname()[1] for listener in listeners}) == 1
        assert {listener.socket.family for listener in listeners} >= {socket.AF_INET}
    finally:
        for listener in listeners:
            await listener.aclose()
