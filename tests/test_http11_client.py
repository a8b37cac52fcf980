"""The keep-alive h11 client pool the worker calls its engine with (and the proxy its hubs), against
the simulator and against a raw server that misbehaves: connections are reused only after a clean
answer, one cut mid-answer or closed by the server is dropped, and leaving early closes it at once."""

from __future__ import annotations

import contextlib
import errno
import json
import socket
from collections.abc import Callable
from functools import partial

import h11
import pytest
import trio

from conftest import WAIT_S, Grid, chat, eventually, next_request, read_until
from ghubai.errors import MAX_RETRY_AFTER_S
from ghubai.http11.client import (KEEPALIVE_IDLE_S, KEEPALIVE_RACE_S, UNACKNOWLEDGED_S, ConnectionPool, Response,
                                  open_stream)


def pool_for(url: str, max_idle: int = 4, idle_reuse_s: float = 4.0) -> ConnectionPool:
    host, port = url.removeprefix("http://").split(":")
    return ConnectionPool(host, int(port), ssl_context=None, connect_timeout_s=WAIT_S, max_idle=max_idle,
                          idle_reuse_s=idle_reuse_s)


async def post(pool: ConnectionPool, body: dict, path: str = "/api/chat") -> tuple[int, bytes]:
    async with pool.request("POST", path, [("content-type", "application/json")], json.dumps(body).encode(),
                            WAIT_S) as response:
        return response.status, await response.read(1 << 20)


async def test_a_clean_answer_leaves_its_connection_for_the_next_request(grid: Grid) -> None:
    sim_url, sim = await grid.sim(tokens=3)
    pool = pool_for(sim_url)
    status, body = await post(pool, chat(stream=True))
    assert status == 200 and body.count(b"\n") == 4 and len(pool.idle) == 1
    first = pool.idle[0]
    status, _ = await post(pool, chat(stream=False))
    assert status == 200 and pool.idle == [first]  # the same connection, back again
    assert sim.stats.completed == 2


async def test_an_error_answer_read_whole_keeps_the_connection_too(grid: Grid) -> None:
    sim_url, _ = await grid.sim()
    pool = pool_for(sim_url)
    status, body = await post(pool, chat(model="nope"))
    assert status == 404 and b"not found" in body and len(pool.idle) == 1


async def test_leaving_mid_answer_closes_the_connection_and_stops_the_engine(grid: Grid) -> None:
    sim_url, sim = await grid.sim(tokens=100_000, itl_ms=1)
    pool = pool_for(sim_url)
    with trio.move_on_after(0.3):
        async with pool.request("POST", "/api/chat", [], json.dumps(chat(stream=True)).encode(), WAIT_S) as response:
            async for _ in response.chunks():
                pass
    assert pool.idle == []

    async def stopped() -> bool:
        return sim.stats.cancelled == 1 and sim.stats.active == 0

    await eventually(stopped, "the simulator to see the cancel")


async def test_no_more_idle_connections_than_max_idle(grid: Grid) -> None:
    sim_url, sim = await grid.sim(tokens=2, itl_ms=20)
    pool = pool_for(sim_url, max_idle=2)
    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(post, pool, chat(stream=True))
    assert sim.stats.completed == 5 and len(pool.idle) == 2


async def test_idle_connections_past_their_reuse_window_are_closed_when_the_owner_sweeps(grid: Grid) -> None:
    """Regression (hunt): after a burst, a proxy gone quiet kept 64 idle connections a hub, each in
    CLOSE-WAIT once the hub closed its end, until its next request; only ``connection`` dropped them."""
    sim_url, _ = await grid.sim(tokens=2, itl_ms=20)
    pool = pool_for(sim_url, max_idle=8, idle_reuse_s=4.0)
    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(post, pool, chat(stream=True))
    assert len(pool.idle) == 5
    for conn in pool.idle[:4]:
        conn.idle_since -= 5.0  # idle longer than they may be reused
    kept, stale = pool.idle[4], pool.idle[:4]
    pool.close_stale()
    assert pool.idle == [kept] and all(conn.socket is not None and conn.socket.fileno() == -1 for conn in stale)
    status, _ = await post(pool, chat(stream=False))
    assert status == 200 and pool.idle == [kept]


async def _serve_once_then(close_after: bool, cut: bool, stream: trio.SocketStream) -> None:
    """A server answering one request: whole, or cut in the middle; closing or keeping the socket."""
    conn = h11.Connection(h11.SERVER)
    while not isinstance(event := conn.next_event(), h11.EndOfMessage):
        if event is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(65536))
    headers = [("content-length", "10")] + ([("connection", "close")] if close_after else [])
    head = conn.send(h11.Response(status_code=200, headers=headers))
    await stream.send_all(head + b"12345" + (b"" if cut else b"67890"))
    if cut or close_after:
        await stream.aclose()
    else:
        await trio.sleep_forever()


@pytest.mark.parametrize("close_after, cut", [(True, False), (False, True)])
async def test_a_connection_the_server_closes_or_cuts_is_never_reused(nursery: trio.Nursery, close_after: bool,
                                                                       cut: bool) -> None:
    [listener] = await nursery.start(partial(trio.serve_tcp, partial(_serve_once_then, close_after, cut), 0,
                                             host="127.0.0.1"))
    pool = pool_for(f"http://127.0.0.1:{listener.socket.getsockname()[1]}")
    if cut:
        with pytest.raises(h11.RemoteProtocolError):
            await post(pool, {})
    else:
        assert await post(pool, {}) == (200, b"1234567890")
    assert pool.idle == []


async def test_a_kept_connection_the_server_dropped_is_replaced_by_a_fresh_one(nursery: trio.Nursery) -> None:
    """The server closes an idle connection (as uvicorn does after 5 s): the next request does not fail."""
    closed = trio.Event()

    async def answer_then_close(stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        while not isinstance(event := conn.next_event(), h11.EndOfMessage):
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(65536))
        await stream.send_all(conn.send(h11.Response(status_code=200, headers=[("content-length", "2")])) + b"ok")
        await stream.aclose()  # keep-alive was not refused: the client keeps the connection
        closed.set()

    [listener] = await nursery.start(partial(trio.serve_tcp, answer_then_close, 0, host="127.0.0.1"))
    pool = pool_for(f"http://127.0.0.1:{listener.socket.getsockname()[1]}")
    assert await post(pool, {}) == (200, b"ok") and len(pool.idle) == 1
    await closed.wait()
    assert await post(pool, {}) == (200, b"ok")


@pytest.mark.parametrize("held_s, distant", [(0.0, False), (KEEPALIVE_RACE_S + 1.0, False),
                                             (KEEPALIVE_RACE_S + 0.2, True)])
async def test_a_request_a_server_took_and_dropped_is_sent_again_once_at_most(nursery: trio.Nursery,
                                                                              held_s: float, distant: bool) -> None:
    """Regression (hunt): a server that reads a request and closes without a word (a crash, a gateway's
    timeout) had it sent again on every idle connection, then a fresh one: one generation run up to 65
    times at the proxy. A close at once, the keep-alive race, is sent again once, on a fresh connection;
    a later one may have run the request, and is the caller's error. On a distant link (its connection
    took 0.3 s to make) the race lasts three such round trips (review: a slow WAN's close came later)."""
    received = 0

    async def answer_once_then_drop(stream: trio.SocketStream) -> None:
        nonlocal received
        conn = h11.Connection(h11.SERVER)
        answered = False
        while await next_request(conn, stream) is not None:
            received += 1
            if answered:
                await trio.sleep(held_s)
                await stream.aclose()
                return
            await stream.send_all(conn.send(h11.Response(status_code=200, headers=[("content-length", "2")])) +
                                  conn.send(h11.Data(data=b"ok")) + conn.send(h11.EndOfMessage()))
            conn.start_next_cycle()
            answered = True

    [listener] = await nursery.start(partial(trio.serve_tcp, answer_once_then_drop, 0, host="127.0.0.1"))
    pool = pool_for(f"http://127.0.0.1:{listener.socket.getsockname()[1]}")
    async with trio.open_nursery() as four:  # four kept connections
        for _ in range(4):
            four.start_soon(post, pool, {})
    assert len(pool.idle) == 4 and received == 4
    for conn in pool.idle:
        conn.connect_s = 0.3 if distant else conn.connect_s
    if held_s and not distant:  # (a hunt: h11's words, "can't handle event type ConnectionClosed when ...")
        with pytest.raises(h11.RemoteProtocolError, match="^server closed the connection before its answer ended$"):
            await post(pool, {})
        assert received == 5 and len(pool.idle) == 3  # (the others may well be sound)
    else:
        assert await post(pool, {}) == (200, b"ok")  # (a fresh connection's first request is answered)
        assert received == 6 and len(pool.idle) == 1  # the fresh one: those beside the closed one dropped


async def _answer_with(answer: bytes | Callable[[bytes], bytes], stream: trio.SocketStream) -> None:
    """A server sending ``answer`` verbatim to each request (or what it gives for the request's
    target), keeping the socket until the client goes."""
    conn = h11.Connection(h11.SERVER)
    while (target := await next_request(conn, stream)) is not None:
        await stream.send_all(answer(target) if callable(answer) else answer)
        conn = h11.Connection(h11.SERVER)  # what it sent may not be HTTP: a fresh state for the next


CHUNKED = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n"


@pytest.mark.parametrize("answer, body, kept", [
    (CHUNKED + b"\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\ntrailer: 1\r\n\r\n", b"abcde", True),
    (CHUNKED + b"connection: close\r\n\r\n3\r\nabc\r\n0\r\n\r\n", b"abc", False),  # refused keep-alive
    (CHUNKED + b"\r\n3\r\nabc\r\n0\r\n\r\nHTTP/1.1 200 OK\r\n", b"abc", False),  # an answer nobody asked for
])
async def test_a_chunked_answer_is_decoded_and_kept_only_when_it_ended_cleanly(
        nursery: trio.Nursery, answer: bytes, body: bytes, kept: bool) -> None:
    [listener] = await nursery.start(partial(trio.serve_tcp, partial(_answer_with, answer), 0, host="127.0.0.1"))
    pool = pool_for(f"http://127.0.0.1:{listener.socket.getsockname()[1]}")
    assert await post(pool, {}) == (200, body)
    assert len(pool.idle) == (1 if kept else 0)
    if kept:  # and the connection serves the next request as well as the first
        first = pool.idle[0]
        assert await post(pool, {}) == (200, body) and pool.idle == [first]


async def test_a_chunked_answer_cut_mid_chunk_fails_and_is_not_reused(nursery: trio.Nursery) -> None:
    async def cut(stream: trio.SocketStream) -> None:
        await stream.receive_some(65536)
        await stream.send_all(CHUNKED + b"\r\n5\r\nab")
        await stream.aclose()

    [listener] = await nursery.start(partial(trio.serve_tcp, cut, 0, host="127.0.0.1"))
    pool = pool_for(f"http://127.0.0.1:{listener.socket.getsockname()[1]}")
    with pytest.raises(h11.RemoteProtocolError, match="mid-answer"):
        await post(pool, {})
    assert pool.idle == []


async def test_a_body_broken_in_the_head_s_packet_fails_the_body_and_is_never_sent_again(
        nursery: trio.Nursery) -> None:
    """Regression: the decoder ran inside read_head, so a framing error that came with the head
    looked like a connection lost before any answer: the pool sent the request again (a second
    generation), and the proxy marked its hub down."""
    seen: list[bytes] = []

    def answer(target: bytes) -> bytes:
        seen.append(target)
        return b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok" if len(seen) == 1 else CHUNKED + b"\r\n5\r\nhelloXX"

    [listener] = await nursery.start(partial(trio.serve_tcp, partial(_answer_with, answer), 0, host="127.0.0.1"))
    pool = pool_for(f"http://127.0.0.1:{listener.socket.getsockname()[1]}")
    assert await post(pool, {}, path="/first") == (200, b"ok") and len(pool.idle) == 1  # a kept connection
    async with pool.request("POST", "/generate", [], b"{}", WAIT_S) as response:
        assert response.status == 200
        with pytest.raises(h11.RemoteProtocolError, match="CRLF"):
            await response.read(1 << 20)
    assert seen == [b"/first", b"/generate"] and pool.idle == []


async def _stall_after(first: bytes, trickle: bool, stream: trio.SocketStream) -> None:
    """A server that sends ``first`` and then nothing, or for 5 s a byte every 50 ms that completes
    nothing, and then closes (a client that waited that long fails mid-answer, not with a timeout)."""
    await stream.receive_some(65536)
    await stream.send_all(first)
    if not trickle:
        await trio.sleep_forever()
    for _ in range(100):
        await trio.sleep(0.05)
        await stream.send_all(b"x")


@pytest.mark.parametrize("first, trickle", [
    (CHUNKED + b"\r\n3\r\nabc\r\n", False),
    (b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\nabc", False),
    (CHUNKED + b"\r\n3\r\nabc\r\n1;", True),  # a chunk-size line's extension, a byte at a time
])
async def test_a_body_that_stalls_fails_after_the_timeout_with_what_came_before_it(
        nursery: trio.Nursery, first: bytes, trickle: bool) -> None:
    """Each wait for the next part of a body is bounded (an engine that hangs mid-answer is a 504),
    even though a read that finds bytes already there sets no deadline at all; and the bound is
    the part's, however many reads bring bytes that complete nothing."""
    [listener] = await nursery.start(partial(trio.serve_tcp, partial(_stall_after, first, trickle), 0,
                                             host="127.0.0.1"))
    pool = pool_for(f"http://127.0.0.1:{listener.socket.getsockname()[1]}")
    received = []
    async with pool.request("POST", "/api/chat", [], b"{}", 0.3) as response:
        with pytest.raises(trio.TooSlowError):
            async for data in response.chunks():
                received.append(data)
    assert received == [b"abc"] and pool.idle == []


async def test_an_answer_that_ends_at_the_close_is_read_whole_and_not_kept(nursery: trio.Nursery) -> None:
    """Regression: after an answer without a length or chunks, h11 says ConnectionClosed for ever,
    and the loop that gathered the events already received never ended, freezing the process."""
    async def answer_then_close(stream: trio.SocketStream) -> None:
        await stream.receive_some(65536)
        await stream.send_all(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nwhole")
        await stream.aclose()

    [listener] = await nursery.start(partial(trio.serve_tcp, answer_then_close, 0, host="127.0.0.1"))
    pool = pool_for(f"http://127.0.0.1:{listener.socket.getsockname()[1]}")
    assert await post(pool, {}) == (200, b"whole") and pool.idle == []


def test_the_host_header_of_an_ipv6_address_is_bracketed() -> None:
    """Regression (review): ``host: ::1:11434`` (discovery, on httpx, sent ``[::1]:11434``): Ollama
    answers an unbracketed IPv6 host 403, which read as the engine refusing the worker's key."""
    assert pool_for("http://127.0.0.1:11434").authority == "127.0.0.1:11434"
    ipv6 = ConnectionPool("::1", 11434, ssl_context=None, connect_timeout_s=1, max_idle=1, idle_reuse_s=1)
    assert ipv6.authority == "[::1]:11434"


@pytest.mark.skipif(not hasattr(socket, "TCP_KEEPIDLE"), reason="Linux's keepalive options")
async def test_a_connection_probes_a_peer_that_vanished() -> None:
    """Regression (hunt): without TCP keepalive a hub powered off mid-answer sends no reset, and the
    proxy's read waited for it for response_timeout_s (an hour); probes now find it in about a minute."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    stream = await open_stream("127.0.0.1", port, None, 5.0)
    sock = stream.socket  # type: ignore[attr-defined]
    assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == KEEPALIVE_IDLE_S
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) * \
        sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) <= 60
    await stream.aclose()
    for listener in listeners:
        await listener.aclose()


async def test_an_answer_sent_before_the_body_was_read_is_the_answer(nursery: trio.Nursery) -> None:
    """Regression (hunt): an engine, or a gateway in front of it, that answered a large body with 413 or
    401 before reading it, and closed, cost the client a 502 "engine connection failed" (the send broke,
    and the answer waiting to be read was never read), and the body was sent twice."""
    heads = 0

    async def refuse_early(stream: trio.SocketStream) -> None:
        nonlocal heads
        if b"\r\n\r\n" not in await read_until(stream):
            return
        heads += 1
        await stream.send_all(b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 7\r\nconnection: close\r\n\r\n"
                              b"too big")
        await stream.aclose()

    [listener] = await nursery.start(partial(trio.serve_tcp, refuse_early, 0, host="127.0.0.1"))
    pool = pool_for(f"http://127.0.0.1:{listener.socket.getsockname()[1]}")
    async with pool.request("POST", "/api/chat", [], b"x" * (8 << 20), WAIT_S) as response:
        assert (response.status, await response.read(100)) == (413, b"too big")
    assert heads == 1 and pool.idle == []


@pytest.mark.parametrize("after", [b"HTTP/1.1 103 Early Hints\r\n\r\n", b"HTTP/1.1 200 OK\r\ncontent-le"])
async def test_a_kept_connection_that_fails_after_the_server_answered_is_not_sent_again(
        nursery: trio.Nursery, after: bytes) -> None:
    """Regression (hunt): a request on a kept-alive connection was sent again on a fresh one whatever the
    failure, though the server had begun to answer (a 103, half a head): the engine generated twice.
    Only a connection that failed before a byte came back is the server's keep-alive close."""
    requests = 0

    async def answer_then_fail(stream: trio.SocketStream) -> None:
        nonlocal requests
        received = b""
        for answer in (b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok", after):
            if b"\r\n\r\n" not in (received := await read_until(stream, data=received)):
                return
            received = received.split(b"\r\n\r\n", 1)[1].removeprefix(b"{}")  # (the body: {})
            requests += 1
            await stream.send_all(answer)
        await stream.aclose()

    [listener] = await nursery.start(partial(trio.serve_tcp, answer_then_fail, 0, host="127.0.0.1"))
    pool = pool_for(f"http://127.0.0.1:{listener.socket.getsockname()[1]}")
    assert await post(pool, {}) == (200, b"ok") and len(pool.idle) == 1
    with pytest.raises(h11.RemoteProtocolError):
        await post(pool, {})
    assert requests == 2


async def test_a_connection_that_cannot_be_made_in_time_is_a_transport_error_not_a_slow_answer() -> None:
    """Regression (review): a connect that timed out (a hub's host powered off: its SYNs dropped) raised
    trio.TooSlowError, which the proxy reads as a hub "slow to answer": 504, no other hub tried, the hub
    not marked down. It is an OSError now, as a refused connection is."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    try:
        for _ in range(4):  # the accept queue full: the next SYNs are dropped, as by a host gone dark
            filler = socket.socket()
            filler.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                filler.connect(("127.0.0.1", port))
            fillers.append(filler)
        pool = ConnectionPool("127.0.0.1", port, ssl_context=None, connect_timeout_s=0.3, max_idle=1, idle_reuse_s=4)
        with trio.fail_after(WAIT_S), pytest.raises(OSError, match="no connection"):
            await post(pool, {})
    finally:
        for sock in (*fillers, listener):
            sock.close()


async def test_a_connection_gives_up_on_bytes_unacknowledged_for_15_s(grid: Grid) -> None:
    """Regression (hunt): a request sent on a connection that went dark (a blackholed link, a machine
    gone: no reset) waited while the kernel retransmitted it for some 15 minutes, an hour at the
    proxy: keepalive probes only an idle connection. TCP_USER_TIMEOUT ends it after 15 s (Linux)."""
    sim_url, _ = await grid.sim()
    pool = pool_for(sim_url)
    await post(pool, chat())
    [conn] = pool.idle
    assert conn.socket is not None
    assert conn.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == UNACKNOWLEDGED_S * 1000


@pytest.mark.parametrize("size", [200_000, 20_000_000])
async def test_a_server_that_pauses_before_it_reads_the_body_is_waited_for(nursery: trio.Nursery, size: int) -> None:
    """Review: a live server that stopped reading for a while (CPU-starved, in a long pause) shut its
    window, and the unsent rest of the body, counted as unacknowledged, made a healthy hub look
    dark. Only bytes in flight that are never acknowledged are."""
    async def pause_then_answer(stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        conn.receive_data(await stream.receive_some(1024))  # the head, and a little of the body
        await trio.sleep(1.5)  # three times the pool's dark_s / 2
        await next_request(conn, stream)
        await stream.send_all(conn.send(h11.Response(status_code=200, headers=[("content-length", "2")])) +
                              conn.send(h11.Data(data=b"ok")) + conn.send(h11.EndOfMessage()))
        await trio.sleep_forever()

    [listener] = await nursery.start(partial(trio.serve_tcp, pause_then_answer, 0, host="127.0.0.1"))
    pool = ConnectionPool("127.0.0.1", listener.socket.getsockname()[1], ssl_context=None, connect_timeout_s=1.0,
                          max_idle=1, idle_reuse_s=4)
    with trio.fail_after(WAIT_S):
        async with pool.request("POST", "/", [], b"x" * size, WAIT_S) as response:
            assert (response.status, await response.read(100)) == (200, b"ok")


async def test_a_kept_connection_the_kernel_gave_up_on_is_passed_over_with_those_beside_it(
        nursery: trio.Nursery) -> None:
    """A request on a kept connection that went dark (the kernel's ETIMEDOUT, as trio raises it) is
    sent again on a new one, and the idle connections beside it, surely dark too, are dropped rather
    than tried one by one, each a wait of ``UNACKNOWLEDGED_S``."""
    connections = 0

    async def answer(stream: trio.SocketStream) -> None:
        nonlocal connections
        connections += 1
        conn = h11.Connection(h11.SERVER)
        while await next_request(conn, stream) is not None:
            await stream.send_all(conn.send(h11.Response(status_code=200, headers=[("content-length", "2")])) +
                                  conn.send(h11.Data(data=b"ok")) + conn.send(h11.EndOfMessage()))
            conn.start_next_cycle()

    [listener] = await nursery.start(partial(trio.serve_tcp, answer, 0, host="127.0.0.1"))
    pool = ConnectionPool("127.0.0.1", listener.socket.getsockname()[1], ssl_context=None, connect_timeout_s=1.0,
                          max_idle=2, idle_reuse_s=60)
    async with trio.open_nursery() as both:  # two at once: two kept connections
        for _ in range(2):
            both.start_soon(post, pool, {})
    older, dark = pool.idle

    async def timed_out(*events: h11.Event) -> h11.Response:
        raise trio.BrokenResourceError("socket connection broken") from TimeoutError(errno.ETIMEDOUT, "timed out")

    dark.exchange = timed_out  # type: ignore[method-assign]  # (loopback drops no packets)
    with trio.fail_after(WAIT_S):
        assert await post(pool, {}) == (200, b"ok")
    assert connections == 3 and older.socket is not None and older.socket.fileno() == -1


@pytest.mark.parametrize("value, seconds", [
    (b"7", 7), (b"0", 0), (b"86400", MAX_RETRY_AFTER_S),
    (b"9" * 5000, MAX_RETRY_AFTER_S),  # (int() refuses 4,301 digits)
    (b"Wed, 21 Oct 2015 07:28:00 GMT", 0), (b"Sun, 01 Jan 2090 00:00:00 -0000", MAX_RETRY_AFTER_S),  # past, far
    (b"-3", None), (b"1.5", None), (b"\xc2\xb2", None), (b"soon", None), (None, None),
])
def test_a_retry_after_is_whole_seconds_from_now_within_an_hour(value: bytes | None, seconds: int | None) -> None:
    head = h11.Response(status_code=429, headers=[] if value is None else [(b"Retry-After", value)])
    assert Response(None, head, 1.0).retry_after == seconds  # type: ignore[arg-type]  # (no body is read)
