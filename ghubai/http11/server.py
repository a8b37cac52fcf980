"""HTTP/1.1 server connections written directly on h11 and trio streams.

Used where a framework would cost too much per byte (the simulator, the proxy). A request that
cannot be read (bad framing, too many or too large headers, too large a body) is answered with
its ``ApiError`` and the connection closed. One ``Connection``
serves requests one after another on a keep-alive socket. While a response streams, ``watch()`` is
the socket's only reader: it feeds pipelined bytes to h11 and reports EOF, so the caller can cancel
the work done for a client that left.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import resource
import time
from dataclasses import dataclass
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import urlsplit

import h11
import trio

from ghubai import cors
from ghubai.errors import CLIENT_CLOSED, CLOSE, ApiError, body_too_large
from ghubai.http11.grammar import BOTH_FRAMINGS, both_framings  # (and h11's grammars, linear: see the module)
from ghubai.observability import metrics
from ghubai.observability.logs import REQUEST_ID, REQUEST_ID_HEADER, request_id
from ghubai.sockets import RECEIVE_SIZE, write_now

log = logging.getLogger("ghubai.http")
TURNED_AWAY_LOG_S = 60.0
TURN_AWAY_READ_S = 0.5  # for the request line of a connection turned away (its error's dialect)
_warned: dict[str, float] = {}  # by role: when ``turn_away`` last logged

DRAIN_TIMEOUT_S = 0.5


@dataclass
class Request:
    """One request, read whole (its body bounded by ``max_body``)."""
    method: str
    target: str
    headers: list[tuple[bytes, bytes]]
    body: bytes

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]

    def header(self, name: bytes) -> bytes | None:
        return next((value for key, value in self.headers if key == name), None)


SMALL_PIECE_BYTES = 1024  # a slow link's packets carry 1.4 KB: only a sender that chooses to goes smaller


class RequestBody:
    """A request body as its pieces arrive, read alike by the proxy (h11) and the hub (hypercorn):
    a 413 past ``limit`` bytes, or in more small pieces (chunks, HTTP/2 frames, the reads it arrives
    in) than a thousandth of its limit: each costs an HTTP server's parser 5-18 µs, so a body in
    1-byte chunks would cost seconds of CPU a megabyte."""

    def __init__(self, limit: int) -> None:
        self.data, self.limit = bytearray(), limit
        self.small, self.max_small = 0, max(1024, limit // 1024)

    def add(self, piece: bytes) -> None:
        self.data += piece
        self.small += len(piece) < SMALL_PIECE_BYTES
        if len(self.data) > self.limit:
            raise body_too_large(self.limit)
        if self.small > self.max_small:
            raise ApiError(413, f"Request body sent in more than {self.max_small} small pieces", extra_headers=CLOSE)

    @staticmethod
    def too_slow() -> ApiError:
        return ApiError(408, "The request body did not arrive in time", extra_headers=CLOSE)


def origin_form(target: str) -> str:
    """A request target as its path and query: an absolute-form target (``http://host/path``,
    which RFC 9112 §3.2.2 says a server must accept) names its host too."""
    if target.startswith("/") or "://" not in target:
        return target
    try:
        parts = urlsplit(target)
    except ValueError:  # http://[bad/ ...: a 400, not a dropped connection
        raise ApiError(400, "malformed request target") from None
    return (parts.path or "/") + (f"?{parts.query}" if parts.query else "")


class Idlers:
    """A server's kept-alive connections waiting for their next request, which a stopping server
    closes at once (they held its stop for its whole grace, a second)."""

    def __init__(self) -> None:
        self.waiting: set[trio.CancelScope] = set()
        self.closed = False

    def close(self) -> None:
        self.closed = True
        for wait in self.waiting:
            wait.cancel()


class Connection:
    """One client's keep-alive socket. Invariant: requests are served one after another, and
    nobody but this class touches the h11 state machine; callers ask ``response_started``."""

    def __init__(self, stream: trio.abc.Stream, *, max_body: int = 4 * 1024 * 1024,
                 max_header_bytes: int = 16384, max_headers: int = 100, idle_timeout_s: float = 75.0,
                 header_timeout_s: float = 10.0, body_timeout_s: float = 60.0,
                 admit: Callable[[str, str, Sequence[tuple[bytes, bytes]]], None] | None = None,
                 origins: cors.Origins | None = None, idlers: Idlers | None = None) -> None:
        self.stream = stream
        self.idlers = idlers  # the server's kept connections waiting for a request: closed as it stops
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=max_header_bytes)
        self.max_body = max_body
        self.max_header_bytes = max_header_bytes
        self.max_headers = max_headers
        self.idle_timeout_s = idle_timeout_s  # bounds every wait on the client, for bytes in and out
        self.header_timeout_s = header_timeout_s  # bounds a whole request head, however it trickles in
        self.body_timeout_s = body_timeout_s  # and a whole body
        self.admit = admit  # (method, path, headers): raises the ApiError that refuses a request by its head
        self.head = ""  # "METHOD /path" of the request being read, once its head has arrived
        self.origins = origins  # web pages that may call (``ghubai.cors``); None: no page is judged
        self.cors: cors.Headers = []  # what every answer to this request adds for the page that sent it
        self.preflight: cors.Headers | None = None  # the request is a preflight: what its 204 adds
        self.peer_closed = False  # the client's end of the connection closed (EOF)
        self.cut_mid_write = False  # a write was cut with part of it sent: nothing more may follow
        sock = getattr(getattr(stream, "transport_stream", stream), "socket", None)
        try:
            self.peer = str(sock.getpeername()[0]) if sock is not None else ""
        except OSError:
            self.peer = ""

    async def _next_event(self) -> Any:
        while True:
            event = self.h11.next_event()
            if event is not h11.NEED_DATA:
                return event
            with trio.move_on_after(self.idle_timeout_s) as idle:
                data = await self.stream.receive_some(RECEIVE_SIZE)
            self.peer_closed = not idle.cancelled_caught and not data
            self.h11.receive_data(b"" if idle.cancelled_caught else data)  # type: ignore[arg-type]  # a bytearray too

    async def read_request(self) -> Request | None:
        """The next complete request, or None when the client closed or idled out."""
        if self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE:
            self.h11.start_next_cycle()
        self.head, self.cors, self.preflight = "", [], None
        try:
            if not self.h11.trailing_data[0]:  # an idle keep-alive connection: wait for the next head
                if self.idlers is not None and self.idlers.closed:
                    return None
                with trio.move_on_after(self.idle_timeout_s) as idle:
                    if self.idlers is not None:
                        self.idlers.waiting.add(idle)
                    try:
                        data = await self.stream.receive_some(RECEIVE_SIZE)
                    finally:
                        if self.idlers is not None:
                            self.idlers.waiting.discard(idle)
                if idle.cancelled_caught:
                    return None
                self.h11.receive_data(data)  # type: ignore[arg-type]  # h11 takes a bytearray too
            event = None
            with trio.move_on_after(self.header_timeout_s):  # from its first byte, a whole head in time
                event = await self._next_event()
            if not isinstance(event, h11.Request):
                return None  # closed, paused on a connection that must close, or too slow a head
            if not event.http_version.startswith(b"1."):  # (an HTTP/2 client's preface, PRI *, got a 404
                self.head = f"{event.method.decode('latin-1')} {event.target.decode('latin-1')[:100]}"  # and a 400)
                raise ApiError(505, f"HTTP/{event.http_version.decode('latin-1')} is not served here: HTTP/1.1 only")
            target = origin_form(event.target.decode("latin-1"))
            self.head = f"{event.method.decode('latin-1')} {target.split('?', 1)[0]}"
            # every line about it carries its id, a refusal's too (a 431 had none)
            request_id(next((value for key, value in event.headers if key == b"x-request-id"), None))
            if event.method != event.method.upper():  # (see ``ghubai.web``: hypercorn upper-cases them)
                raise ApiError(501, f"method {event.method.decode('latin-1')[:20]!r} is not implemented: "
                                    "HTTP methods are case-sensitive")
            if len(event.headers) > self.max_headers:
                raise ApiError(431, f"more than {self.max_headers} header lines")
            # h11 bounds only a head still arriving; one that came whole in a single read is measured here
            if sum(len(key) + len(value) + 4 for key, value in event.headers) > self.max_header_bytes:
                raise ApiError(431, f"request head larger than {self.max_header_bytes} bytes")
            method = event.method.decode("latin-1")
            if self.origins is not None and (page := cors.stranger(self.origins, event.headers)):
                raise ApiError(403, cors.refusal(page))
            if self.origins:
                self.cors = self.origins.allow(event.headers)
                self.preflight = cors.preflight(method, event.headers) if cors.allowed(self.cors) else None
            if self.admit is not None and self.preflight is None:  # keys first, before the body (a preflight has none)
                self.admit(method, self.head.partition(" ")[2], event.headers)
            if both_framings(event.headers):
                raise ApiError(400, BOTH_FRAMINGS)
            length = next((value for key, value in event.headers if key == b"content-length"), None)
            if int(length or b"0") > self.max_body:
                raise body_too_large(self.max_body)
            if self.h11.they_are_waiting_for_100_continue:  # (never an HTTP/1.0 client: RFC 9110 §15.2)
                await self.send(h11.InformationalResponse(status_code=100, headers=[]))
            body = RequestBody(self.max_body)
            with trio.move_on_after(self.body_timeout_s) as slow:
                while True:
                    part = await self._next_event()
                    if isinstance(part, h11.EndOfMessage):
                        break
                    if isinstance(part, h11.ConnectionClosed):
                        return None
                    body.add(part.data)
            if slow.cancelled_caught:
                raise RequestBody.too_slow()
        except h11.RemoteProtocolError as error:  # its text may quote a header line: never echo it
            if self.peer_closed:  # not malformed: its client left in the middle of it
                if not self.head:  # (of its head: no request, as a connection that sent nothing)
                    return None
                raise ApiError(CLIENT_CLOSED, "the client left before its request was whole") from None
            raise ApiError(error.error_status_hint, "unsupported Transfer-Encoding: only chunked is taken"
                           if error.error_status_hint == 501 else "malformed HTTP request") from None
        except (trio.BrokenResourceError, trio.ClosedResourceError):  # a reset: as an EOF above
            if self.head:  # (a hunt: one that reset its connection mid-body had no line and no count)
                raise ApiError(CLIENT_CLOSED, "the client left before its request was whole") from None
            return None
        return Request(event.method.decode(), target, list(event.headers), bytes(body.data))

    async def send(self, *events: Any) -> None:
        """Send h11 events in one write: fewer syscalls, and a head that leaves with its first data.
        A client that takes none of it for ``idle_timeout_s`` is gone (BrokenResourceError)."""
        data = await write_now(self.stream, b"".join(self.h11.send(event) or b"" for event in events))
        if data:
            self.cut_mid_write = True  # until the rest is out: cancelled now, part of an event may have gone
            with trio.move_on_after(self.idle_timeout_s) as stalled:
                await self.stream.send_all(data)
            self.cut_mid_write = False
            if stalled.cancelled_caught:
                raise trio.BrokenResourceError("the client took no data in time")

    async def respond(self, status: int, body: bytes, content_type: str = "application/json",
                      headers: dict[str, str] | None = None) -> None:
        """A whole answer; to a HEAD request, its head alone (h11 refuses a body there)."""
        fields: list[Any] = [("content-type", content_type), ("content-length", str(len(body))), *self.cors]
        # one of each name, the last said (an error's "Connection: close" and the server's own were two)
        fields += list({name.lower(): value for name, value in (headers or {}).items()}.items())
        data = [] if self.head.startswith("HEAD ") else [h11.Data(data=body)]
        await self.send(h11.Response(status_code=status, headers=fields), *data, h11.EndOfMessage())

    async def respond_json(self, status: int, value: Any, headers: dict[str, str] | None = None) -> None:
        await self.respond(status, json.dumps(value).encode(), headers=headers)

    async def start_stream(self, status: int, content_type: str) -> None:
        """Headers of a chunked response; then ``write`` each piece and ``finish``."""
        fields: list[Any] = [("content-type", content_type), ("cache-control", "no-cache"),
                             ("transfer-encoding", "chunked"), *self.cors]
        await self.send(h11.Response(status_code=status, headers=fields))

    async def write(self, data: bytes) -> None:
        await self.send(h11.Data(data=data))

    async def finish(self) -> None:
        await self.send(h11.EndOfMessage())

    async def watch(self, gone: trio.CancelScope, until: trio.CancelScope) -> None:
        """Read the socket while a response is produced; cancel ``gone`` when the client leaves. The
        caller ends the watch by cancelling ``until``, not the nursery's scope: a task that ends in
        ``Cancelled`` costs its nursery the repr of that and of the task (7 µs a request, trio 0.35)."""
        with until:
            try:
                while True:
                    data = await self.stream.receive_some(RECEIVE_SIZE)
                    if not data:
                        self.peer_closed = True
                        break
                    self.h11.receive_data(data)  # type: ignore[arg-type]  # h11 takes a bytearray too
                    if len(self.h11.trailing_data[0]) > self.max_body + self.max_header_bytes:
                        break  # more than one whole request ahead of us: a client we stop serving
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self.peer_closed = True
            self.h11.receive_data(b"")
            gone.cancel()

    @property
    def response_started(self) -> bool:
        """The head of the answer has gone out: an error can only end the answer, not replace it."""
        return self.h11.our_state not in (h11.IDLE, h11.SEND_RESPONSE)

    @property
    def response_ended(self) -> bool:
        return self.h11.our_state in (h11.DONE, h11.MUST_CLOSE, h11.CLOSED)

    async def respond_error(self, error: ApiError, path: str, headers: dict[str, str] | None = None) -> None:
        """``error`` in the dialect of ``path``, unless an answer has already begun."""
        if not self.response_started:
            await self.respond(error.status, error.body_for(path), headers={**error.headers(), **(headers or {})})

    @property
    def reusable(self) -> bool:
        return self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE

    async def close(self) -> None:
        """EOF, then a bounded drain so that unread input does not turn into a RST that eats the
        end of the response, then close. Shielded: it runs on the way out of cancelled work."""
        with trio.CancelScope(shield=True):
            with trio.move_on_after(DRAIN_TIMEOUT_S):
                try:
                    await self.stream.send_eof()  # type: ignore[attr-defined]
                    while await self.stream.receive_some(RECEIVE_SIZE):
                        pass
                except (trio.BrokenResourceError, trio.ClosedResourceError, AttributeError, trio.BusyResourceError):
                    pass
            with trio.move_on_after(DRAIN_TIMEOUT_S) as closing:  # (a TLS close writes: to a reader gone)
                await self.stream.aclose()
            if closing.cancelled_caught:
                await trio.aclose_forcefully(self.stream)


def connection_cap(wanted: int, descriptors_each: int, key: str) -> int:
    """``wanted`` open client connections, but no more than the file limit allows when each takes
    ``descriptors_each`` file descriptors, with some kept for the process itself. The soft limit is
    raised first as far as the hard one allows: a shell's or a unit's default soft limit is 1024,
    which would cap a proxy at 480 clients while the hard limit (524288 under systemd) allows all."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)  # (Linux allows no infinite one)
    if soft < (raised := min(wanted * descriptors_each + 64, hard)):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
            soft = raised
        except (ValueError, OSError):  # (a sandbox may refuse)
            pass
    allowed = max(1, (soft - 64) // descriptors_each)
    if wanted > allowed:
        log.info("%s %d is more than the file limit allows: %d", key, wanted, allowed)
    return min(wanted, allowed)


async def turn_away(stream: trio.abc.Stream, who: str) -> None:
    """A connection past the cap: a 503 with ``Retry-After`` at once, then close, so that clients
    that trickle or idle cannot take every file descriptor and shut everyone else out. Counted
    (``ghubai_connections_turned_away_total``) and logged, at most a line a minute: no request was
    read, so no access line tells of it."""
    metrics.turned_away[who] = metrics.turned_away.get(who, 0) + 1
    if time.monotonic() >= _warned.get(who, -math.inf) + TURNED_AWAY_LOG_S:  # (a process's, not a trio run's)
        _warned[who] = time.monotonic()
        log.warning("%s: a connection turned away, past the cap of connections open at once (%d so far); "
                    "at most one such line a minute", who, metrics.turned_away[who])
    path = ""  # the error in the dialect of the request's path, when its line comes at once
    if not isinstance(stream, trio.SSLStream):  # (a read cut in its handshake breaks a TLS stream for the 503)
        with trio.move_on_after(TURN_AWAY_READ_S), \
                contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            words = (await stream.receive_some(RECEIVE_SIZE)).split(b" ", 2)
            path = words[1].decode("latin-1") if len(words) == 3 else ""
    error = ApiError(503, f"The {who} has too many open connections; try again shortly", retry_after=1)
    body = error.body_for(path)
    head = "".join(f"{name}: {value}\r\n" for name, value in error.headers().items()).encode()
    with trio.move_on_after(1):
        try:
            await stream.send_all(b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n%s"
                                  b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (head, len(body), body))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
    await Connection(stream).close()  # EOF, a short drain, then close: the answer is not lost to a reset


async def serve_connection(stream: trio.abc.Stream, handle: Any, *,
                           refused: Callable[[Connection, ApiError], None] | None = None, **limits: Any) -> None:
    """Serve requests on one socket until it closes: ``await handle(conn, request)`` each. A request
    that cannot be read is answered here, in the dialect of its path, and ``refused(conn, error)``
    hears of it (``conn.head``: "METHOD /path", or "" when not even the head could be read)."""
    conn = Connection(stream, **limits)
    try:
        if isinstance(stream, trio.SSLStream):  # bounded as a head is: half a ClientHello held it for idle_timeout_s
            with trio.move_on_after(conn.header_timeout_s) as slow:
                await stream.do_handshake()
            if slow.cancelled_caught:
                return
        while True:
            REQUEST_ID.set("")  # the next request is another one, named as its head is read
            try:
                request = await conn.read_request()
            except ApiError as error:
                if refused is not None:
                    refused(conn, error)
                tag = {REQUEST_ID_HEADER: rid} if (rid := REQUEST_ID.get()) else {}
                await conn.respond_error(error, conn.head.partition(" ")[2], headers={"connection": "close", **tag})
                break
            if request is None:
                break
            if conn.preflight is not None:  # answered here, before any key check
                await conn.send(h11.Response(status_code=204, headers=[*conn.cors, *conn.preflight]), h11.EndOfMessage())
            else:
                await handle(conn, request)
            if not conn.reusable:
                break
    except* (trio.BrokenResourceError, trio.ClosedResourceError):
        pass  # the client left in the middle of an answer
    except* h11.LocalProtocolError:
        log.warning("an answer could not be framed; connection dropped", exc_info=True)
    except* Exception:
        log.exception("request handler failed; connection dropped")
    finally:
        await conn.close()
