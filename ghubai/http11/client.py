"""HTTP/1.1 client connections on h11 and trio streams, kept alive in a small pool per server.

Used on the hot path where httpx/httpcore cost too much per request (the proxy's hop to a hub). A
``ClientConnection`` carries one request at a time; a ``ConnectionPool`` hands out idle ones that
are surely still open and takes back only those whose exchange ended cleanly on both sides.
"""

from __future__ import annotations

import select
import ssl

import h11
import trio

RECEIVE_SIZE = 65536


def tls_client_context(ca_file: str = "", allow_invalid_certs: bool = False) -> ssl.SSLContext:
    """The context every role dials TLS with: the system's CAs or ``ca_file``; no checks at all only
    when the operator asked for it (``allow_invalid_certs``, for tests and self-signed labs)."""
    context = ssl.create_default_context(cafile=ca_file or None)
    if allow_invalid_certs:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


class ClientConnection:
    """One connection to a server, spoken with h11. Invariant: ``h11`` is the state of this very
    stream; the connection is reused only when ``reusable`` (both sides DONE, nothing unread)."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.h11 = h11.Connection(h11.CLIENT)
        self.idle_since = 0.0
        self.reused = False  # came from the pool: a failure may be the server's keep-alive close, not a fault

    @property
    def socket(self) -> trio.socket.SocketType | None:
        stream = getattr(self.stream, "transport_stream", self.stream)
        return getattr(stream, "socket", None)

    @property
    def reusable(self) -> bool:
        conn = self.h11
        return conn.our_state is h11.DONE and conn.their_state is h11.DONE and not conn.trailing_data[0]

    async def send(self, *events: h11.Event) -> None:
        """The events in one write: a request's head leaves with its body."""
        await self.stream.send_all(b"".join(self.h11.send(event) or b"" for event in events))

    async def next_event(self) -> h11.Event:
        while True:
            event = self.h11.next_event()
            if event is not h11.NEED_DATA:
                return event  # type: ignore[return-value]
            self.h11.receive_data(await self.stream.receive_some(RECEIVE_SIZE))

    def buffered_events(self) -> list[h11.Event]:
        """The events h11 can parse from what has already been received, without waiting;
        h11.RemoteProtocolError if that is malformed."""
        events = []
        while self.h11.their_state is not h11.DONE:
            event = self.h11.next_event()
            if event is h11.NEED_DATA or event is h11.PAUSED:
                break
            events.append(event)
        return events  # type: ignore[return-value]

    def closed_by_peer(self) -> bool:
        """An idle connection that is readable (with nothing asked) was closed by the server."""
        if self.socket is None:
            return True
        poller = select.poll()  # not select.select: it fails on descriptors above 1023
        poller.register(self.socket.fileno(), select.POLLIN)
        return bool(poller.poll(0))

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
        with trio.fail_after(self.connect_timeout_s):
            stream: trio.abc.Stream = await trio.open_tcp_stream(self.host, self.port)
            if self.ssl_context is not None:
                stream = trio.SSLStream(stream, self.ssl_context, server_hostname=self.host, https_compatible=True)
                await stream.do_handshake()
        return ClientConnection(stream)

    async def release(self, conn: ClientConnection, keep: bool = True) -> None:
        """Keep the connection for the next request if both sides finished cleanly, else close it."""
        if keep and conn.reusable and len(self.idle) < self.max_idle:
            conn.h11.start_next_cycle()
            conn.idle_since = trio.current_time()
            conn.reused = False
            self.idle.append(conn)
        else:
            await conn.aclose()

    def close_idle(self) -> None:
        for conn in self.idle:
            conn.close_now()
        self.idle.clear()
