"""HTTP/1.1 client connections on h11 and trio streams, kept alive in a small pool per server.

Used on the hot path where httpx/httpcore cost too much per request: the proxy's hop to a hub and
the worker's calls to its engine. h11 frames the requests and reads the answers' heads; a chunked
body is decoded by ``ghubai.http11.chunked`` (h11 costs 6-7 µs a chunk: a third of the worker's
cost per token). A ``ClientConnection`` carries one request at a time; a
``ConnectionPool`` hands out idle ones that are surely still open and takes back only those whose
exchange ended cleanly on both sides — one that ends mid-answer, or that the server closed, is
dropped, never reused. Leaving ``request()`` early (a cancel) closes the connection at once, which
is how a server such as Ollama learns to stop generating.
"""

from __future__ import annotations

import contextlib
import datetime
import email.utils
import errno
import logging
import math
import select
import socket
import ssl
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import h11
import trio

import ghubai.http11.grammar  # noqa: F401  (h11's grammars, linear: see the module)
from ghubai.errors import MAX_RETRY_AFTER_S
from ghubai.http11.chunked import ChunkedDecoder
from ghubai.sockets import RECEIVE_SIZE, read_now, write_now

log = logging.getLogger("ghubai.tls")

# The server's states once its answer has ended: after one that ends at the close (no length, not
# chunked), h11 says MUST_CLOSE, then ConnectionClosed for ever (CLOSED), never DONE.
_ANSWERED = (h11.DONE, h11.MUST_CLOSE, h11.CLOSED)
# What a broken or misbehaving server raises (a timeout is ``trio.TooSlowError``).
TRANSPORT_ERRORS = (OSError, trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError)


def tls_client_context(ca_file: str = "", allow_invalid_certs: bool = False) -> ssl.SSLContext:
    """The context every role dials TLS with: the system's CAs or ``ca_file``; no checks at all only
    when the operator asked for it (``allow_invalid_certs``, for tests and self-signed labs)."""
    context = ssl.create_default_context(cafile=ca_file or None)
    if allow_invalid_certs:  # (said: a hunt found a worker linked to an expired stranger's certificate silently)
        log.warning("allow_invalid_certs: TLS certificates are not checked; whoever is on the path can read "
                    "and change this traffic")
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


# TCP keepalive: a peer that vanished (powered off, cut from the network) sends no reset, and an
# answer waits for it for the whole response timeout (an hour at the proxy); probes find it in about
# KEEPALIVE_IDLE_S + 3 * KEEPALIVE_INTERVAL_S instead, and the wait fails with a broken connection.
KEEPALIVE_IDLE_S, KEEPALIVE_INTERVAL_S, KEEPALIVE_PROBES = 30, 10, 3
# Keepalive probes only an idle connection: a request sent on one that went dark (a blackholed link, a
# machine gone) waited for its answer while the kernel retransmitted it for some 15 minutes. Bytes
# unacknowledged this long (or not sent for a window shut this long) end the connection instead, as a
# link's peer silent for three heartbeats is gone: the request is sent again (``ConnectionPool.exchange``).
UNACKNOWLEDGED_S = 15
# A server's keep-alive close meets a request sent on the connection while it is sent or within a
# round trip after; a failure later than this (or three times what making the connection took, on a
# distant link) after the whole request was written is a server that took it and hung up on it (a
# crash, a gateway's timeout), which may have run it: not sent again (RFC 9110 §9.2.2). (A request not
# sent whole was run by no server.)
KEEPALIVE_RACE_S = 0.5
RACE_AT_MOST_S = 2.0  # (making a connection counts a name's lookup and TLS too: not a round trip's bound)


def _keep_alive(sock: trio.socket.SocketType) -> None:
    """Keepalive with these times where the system lets us set them (Linux; macOS names the idle
    time TCP_KEEPALIVE); a system that refuses one keeps its own, and the connection is made anyway."""
    idle = getattr(socket, "TCP_KEEPIDLE", getattr(socket, "TCP_KEEPALIVE", None))
    unacknowledged = getattr(socket, "TCP_USER_TIMEOUT", None)
    for level, option, value in ((socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
                                 (socket.IPPROTO_TCP, idle, KEEPALIVE_IDLE_S),
                                 (socket.IPPROTO_TCP, getattr(socket, "TCP_KEEPINTVL", None), KEEPALIVE_INTERVAL_S),
                                 (socket.IPPROTO_TCP, getattr(socket, "TCP_KEEPCNT", None), KEEPALIVE_PROBES),
                                 (socket.IPPROTO_TCP, unacknowledged, UNACKNOWLEDGED_S * 1000)):
        if option is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(level, option, value)


async def open_stream(host: str, port: int, ssl_context: ssl.SSLContext | None, timeout_s: float) -> trio.abc.Stream:
    """A TCP connection, with its TLS handshake done when ``ssl_context`` is given, within
    ``timeout_s``: a refused certificate fails here, with its reason, not later as a timeout."""
    with trio.fail_after(timeout_s):
        tcp = await trio.open_tcp_stream(host, port)
        _keep_alive(tcp.socket)
        stream: trio.abc.Stream = tcp
        if ssl_context is not None:
            stream = trio.SSLStream(stream, ssl_context, server_hostname=host, https_compatible=True)
            try:
                await stream.do_handshake()
            except BaseException:
                await trio.aclose_forcefully(stream)
                raise
    return stream


class ClientConnection:
    """One connection to a server, spoken with h11. Invariant: ``h11`` is the state of this very
    stream up to the answer's head, and to its end unless ``chunked`` decodes the body; the
    connection is reused only when ``reusable`` (both sides done, nothing unread)."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.h11 = h11.Connection(h11.CLIENT)
        self.method = b""  # of the request being sent
        self.chunked: ChunkedDecoder | None = None  # the answer's chunked body, once its head is read
        self.idle_since = 0.0
        self.reused = False  # came from the pool: a failure may be the server's keep-alive close, not a fault
        self.heard = False  # a byte came back in this exchange: the server took the request (no second send)
        self.cut = False  # the request's body could not all be sent: the connection ends with this exchange
        self.sent_at = math.inf  # when the whole request was written (trio time; not yet: inf)
        self.connect_s = 0.0  # what making the connection took: a round trip or more (TLS: two)

    @property
    def socket(self) -> trio.socket.SocketType | None:
        stream = getattr(self.stream, "transport_stream", self.stream)
        return getattr(stream, "socket", None)

    @property
    def reusable(self) -> bool:
        conn = self.h11
        if self.cut:
            return False
        if self.chunked is not None:
            return conn.our_state is h11.DONE and self.chunked.done and not self.chunked.leftover
        return conn.our_state is h11.DONE and conn.their_state is h11.DONE and not conn.trailing_data[0]

    def next_cycle(self) -> None:
        """Ready for the next request, once ``reusable``."""
        if self.chunked is not None:  # h11 saw only the head: a fresh state machine, as after a clean end
            self.h11, self.chunked = h11.Connection(h11.CLIENT), None
        else:
            self.h11.start_next_cycle()
        self.heard = False

    async def send(self, *events: h11.Event) -> None:
        """The events in one write: a request's head leaves with its body."""
        for event in events:
            if isinstance(event, h11.Request):
                self.method = event.method
        if data := await write_now(self.stream, b"".join(self.h11.send(event) or b"" for event in events)):
            await self.stream.send_all(data)

    async def exchange(self, *events: h11.Event) -> h11.Response:
        """Send a request and read its answer's head. A server may answer (413, 401) and close before
        it reads the whole body: that answer is the request's, not a broken connection."""
        self.sent_at = math.inf
        try:
            await self.send(*events)
            self.sent_at = trio.current_time()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.cut = True  # look for its answer
        return await self.read_head()

    async def read_head(self) -> h11.Response:
        """The answer's head (1xx skipped); h11.RemoteProtocolError if the server closed or sent no
        valid head. Nothing of the body is read: a broken body fails in ``body_part``."""
        event = await self.next_event()
        while isinstance(event, h11.InformationalResponse):  # 100, 103: the answer follows
            event = await self.next_event()
        if not isinstance(event, h11.Response):
            raise h11.RemoteProtocolError(f"server closed the connection ({type(event).__name__})")
        bodiless = self.method == b"HEAD" or event.status_code in (204, 304)
        if not bodiless and any(key == b"transfer-encoding" for key, _ in event.headers):
            self.chunked = ChunkedDecoder()  # h11 accepts no transfer coding but chunked
            self.chunked.buffer += self.h11.trailing_data[0]  # decoded by body_part: its errors are the body's
        return event

    async def body_part(self, timeout_s: float = math.inf) -> tuple[bytes, bool]:
        """The body's payload that has arrived, waiting for it if none has (trio.TooSlowError after
        ``timeout_s``, however many reads it takes), and whether the body has ended;
        h11.RemoteProtocolError if the server breaks its framing or closes mid-body."""
        deadline = trio.current_time() + timeout_s
        if (chunked := self.chunked) is None:  # a length, or to the close: h11 frames it
            events = [await self.next_event(deadline), *self.buffered_events()]
            data = b"".join(event.data for event in events if isinstance(event, h11.Data))
            if any(isinstance(event, h11.EndOfMessage) for event in events):
                return data, True
            if not all(isinstance(event, h11.Data) for event in events):
                raise h11.RemoteProtocolError("server closed the connection mid-answer")
            return data, False
        data = chunked.feed(b"") if chunked.buffer else b""  # what came with the head, the first time
        while not data and not chunked.done:
            received = await self.receive(deadline)
            if not received:
                raise h11.RemoteProtocolError("server closed the connection mid-answer")
            data = chunked.feed(received)
        return data, chunked.done

    async def next_event(self, deadline: float = math.inf) -> h11.Event:
        closed = False
        while True:
            try:
                event = self.h11.next_event()
            except h11.RemoteProtocolError as error:
                if not closed:  # the server's bytes broke HTTP
                    raise
                # (h11's words were "can't handle event type ConnectionClosed when role=SERVER and
                # state=SEND_RESPONSE": what a proxy's operator read of a hub that had died)
                raise h11.RemoteProtocolError("server closed the connection before its answer ended") from error
            if event is not h11.NEED_DATA:
                return event  # type: ignore[return-value]
            data = await self.receive(deadline)
            closed = not data
            self.h11.receive_data(data)

    async def receive(self, deadline: float) -> bytes:
        """What has arrived, else the next network read, waiting until ``deadline`` at most
        (trio.TooSlowError): only a wait pays for a cancel scope."""
        data: bytes | bytearray | None = await read_now(self.stream, RECEIVE_SIZE)
        if data is None:
            with trio.fail_at(deadline):
                data = await self.stream.receive_some(RECEIVE_SIZE)
        self.heard = self.heard or bool(data)
        return data  # type: ignore[return-value]

    def buffered_events(self) -> list[h11.Event]:
        """The events h11 can parse from what has already been received, without waiting, up to
        the answer's end; h11.RemoteProtocolError if that is malformed."""
        events: list[h11.Event] = []
        while self.h11.their_state not in _ANSWERED:
            event = self.h11.next_event()
            if event is h11.NEED_DATA or event is h11.PAUSED:
                break
            events.append(event)  # type: ignore[arg-type]
        return events

    def readable(self) -> bool:
        """Something waits to be read (bytes, or the server's close), without waiting for it."""
        if self.socket is None:
            return True
        poller = select.poll()  # not select.select: it fails on descriptors above 1023
        poller.register(self.socket.fileno(), select.POLLIN)
        return bool(poller.poll(0))

    def closed_by_peer(self) -> bool:
        """An idle connection that is readable (with nothing asked) was closed by the server."""
        return self.readable()

    def close_now(self) -> None:
        """Close synchronously, for an idle connection (nothing is in flight on it)."""
        if self.socket is not None:
            self.socket.close()

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            await self.stream.aclose()


class ConnectionPool:
    """Keep-alive connections to one server (``host``:``port``, TLS when ``ssl_context`` is set).
    Invariant: ``idle`` holds only connections whose last exchange ended cleanly, newest last."""

    def __init__(self, host: str, port: int, *, ssl_context: ssl.SSLContext | None, connect_timeout_s: float,
                 max_idle: int, idle_reuse_s: float) -> None:
        self.host, self.port = host, port
        self.authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"  # the Host header (IPv6 bracketed)
        self.ssl_context = ssl_context
        self.connect_timeout_s = connect_timeout_s
        self.max_idle = max_idle
        self.idle_reuse_s = idle_reuse_s  # reuse only while the server surely still keeps it open
        self.idle: list[ClientConnection] = []

    async def connection(self) -> ClientConnection:
        """An idle connection that is still open, or a new one (``connect_timeout_s`` to connect)."""
        while self.idle:
            conn = self.idle.pop()
            if trio.current_time() - conn.idle_since <= self.idle_reuse_s and not conn.closed_by_peer():
                conn.reused = True
                return conn
            await conn.aclose()
        started = trio.current_time()
        try:
            conn = ClientConnection(await open_stream(self.host, self.port, self.ssl_context, self.connect_timeout_s))
            conn.connect_s = trio.current_time() - started
            return conn
        except trio.TooSlowError:  # a connection that could not be made, not a server slow to answer
            raise TimeoutError(f"no connection to {self.authority} within {self.connect_timeout_s:g} s") from None
        except OSError as error:
            raise ConnectFailed(str(error)) from error

    async def release(self, conn: ClientConnection, keep: bool = True) -> None:
        """Keep the connection for the next request if both sides finished cleanly, else close it."""
        if keep and conn.reusable and len(self.idle) < self.max_idle:
            conn.next_cycle()
            conn.idle_since = trio.current_time()
            conn.reused = False
            self.idle.append(conn)
        else:
            await conn.aclose()

    async def exchange(self, events: list[h11.Event], timeout_s: float) -> tuple[ClientConnection, h11.Response]:
        """Send a request and read its answer's head, every wait for the server bounded by ``timeout_s``
        (trio.TooSlowError: the server may be at work on it, so it is not sent again). A kept-alive
        connection that fails before a byte of answer comes back, while the request was sent or at
        once after (``KEEPALIVE_RACE_S``), or because the kernel gave up on its unacknowledged bytes,
        was closed by the server meanwhile or went dark (the server never took the request): a fresh
        one takes the request, once, and the idle ones beside it, surely closed too, are dropped. What
        fails on a fresh connection, later, or once the server answered, is raised: one request that
        a server took and dropped was sent again on every idle connection, a generation run up to 65
        times."""
        again = True
        while True:
            conn = await self.connection()
            try:
                with trio.fail_after(timeout_s):
                    return conn, await conn.exchange(*events)
            except TRANSPORT_ERRORS as error:
                await conn.aclose()
                dark = _timed_out(error)
                race_s = min(RACE_AT_MOST_S, max(KEEPALIVE_RACE_S, 3 * conn.connect_s))
                at_once = conn.cut or trio.current_time() - conn.sent_at < race_s  # (a request not sent whole)
                if conn.reused and not conn.heard and again and (dark or at_once):
                    again = False
                    self.close_idle()
                    continue
                if dark:
                    self.close_idle()  # it went dark: those idle beside it surely did too, not one wait each
                if conn.cut and not conn.heard and isinstance(conn.stream, trio.SSLStream):
                    raise BodyCut("the server closed the connection before it took the whole request") from error
                raise
            except BaseException:
                await conn.aclose()
                raise

    @asynccontextmanager
    async def request(self, method: str, target: str, headers: list[tuple[str, str]], body: bytes,
                      timeout_s: float) -> AsyncIterator[Response]:
        """Send one request (``exchange``) and yield its response once its head arrived; every wait
        for the server is bounded by ``timeout_s``."""
        fields = [("host", self.authority), ("content-length", str(len(body))), *headers]
        conn, head = await self.exchange(
            [h11.Request(method=method, target=target, headers=fields), h11.Data(data=body), h11.EndOfMessage()],
            timeout_s)
        response = Response(conn, head, timeout_s)
        try:
            yield response
        except BaseException:
            await conn.aclose()
            raise
        await self.release(conn)

    def close_idle(self) -> None:
        for conn in self.idle:
            conn.close_now()
        self.idle.clear()

    def close_stale(self) -> None:
        """Close the idle connections past their reuse window, which ``connection`` would not reuse:
        called now and then by the pool's owner, so that a pool gone quiet after a burst does not hold
        them (64 a hub at the proxy, each in CLOSE-WAIT once the server closed its end) for good."""
        now = trio.current_time()
        while self.idle and now - self.idle[0].idle_since > self.idle_reuse_s:  # (oldest first)
            self.idle.pop(0).close_now()


class Response:
    """The answer to one ``ConnectionPool.request``: its head, then its body as it arrives."""

    def __init__(self, conn: ClientConnection, head: h11.Response, timeout_s: float) -> None:
        self.conn = conn
        self.status = head.status_code
        self.headers = head.headers
        self.timeout_s = timeout_s
        self.ended = False  # the body has been read to its end
        self.until: float | None = None  # when set, the rest of the body must come by then (trio.TooSlowError)

    @property
    def retry_after(self) -> int | None:
        """The server's ``Retry-After`` in whole seconds from now (it may give seconds or an HTTP
        date), at most an hour; None without one, or with one that is neither."""
        value = next((value for name, value in self.headers if name == b"retry-after"), b"").strip()
        if value.isdigit():  # (bytes: ASCII digits only; int() refuses over 4,300 of them)
            seconds = int(value) if len(value.lstrip(b"0")) < 10 else MAX_RETRY_AFTER_S
        else:
            try:
                when = email.utils.parsedate_to_datetime(value.decode("latin-1"))
            except (TypeError, ValueError):
                return None
            if when.tzinfo is None:  # ("-0000": UTC, which a naive datetime is not)
                when = when.replace(tzinfo=datetime.timezone.utc)
            seconds = math.ceil(when.timestamp() - time.time())
        return min(max(seconds, 0), MAX_RETRY_AFTER_S)

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body, one piece per network read (however many chunks it held); each wait bounded by
        ``timeout_s``, and all of them by ``until`` once it is set."""
        while not self.ended:
            timeout_s = self.timeout_s if self.until is None else self.until - trio.current_time()
            data, self.ended = await self.conn.body_part(timeout_s)
            if data:
                yield data

    async def read(self, limit: int) -> bytes:
        """The whole body; TooLarge past ``limit`` bytes."""
        body = bytearray()
        async for chunk in self.chunks():
            body += chunk
            if len(body) > limit:
                raise TooLarge(f"the answer is larger than {limit} bytes")
        return bytes(body)


def _timed_out(error: BaseException) -> bool:
    """The kernel gave up on the connection (``UNACKNOWLEDGED_S``, keepalive): trio raises its
    OSError as the cause of a BrokenResourceError."""
    cause = error if isinstance(error, OSError) else error.__cause__
    return isinstance(cause, OSError) and cause.errno == errno.ETIMEDOUT


class ConnectFailed(OSError):
    """No connection could be made: refused, unreachable, a name that does not resolve, a refused
    TLS certificate (the server is not there for us, as against one that failed a request)."""


class BodyCut(trio.BrokenResourceError):
    """Over TLS, the server closed the connection while the request's body was sent, and its answer, if
    it gave one first, could not be read (a broken send breaks a TLS stream): a body too large for it,
    or a refused key, or a server that went down; which one, nothing tells. (Over plain TCP its answer
    is read, and a cut without one is a broken connection.)"""


class TooLarge(ValueError):
    """What a server sent is larger than its caller accepts: not a broken connection, and no other
    server would do better with the same request."""
