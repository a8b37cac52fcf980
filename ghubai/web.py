"""Serving a quart-trio app with hypercorn's trio worker, inside the caller's nursery.

Carries fixes to hypercorn 0.18's trio server and HTTP/2, a cap, and one shortcut:
- quart-trio runs a connection's close inside the request's already-cancelled scope, so
  ``send_eof`` is skipped and a client that sent ``Connection: close`` (or speaks HTTP/1.0) never
  sees EOF (hypercorn issues #330, #106). The close is run shielded here.
- every socket write is shielded from cancellation and has no timeout, so a client that stops
  reading blocks its request (and the worker slot behind it) for ever, and a server with such a
  client can never stop. Here a write that makes no progress for ``write_timeout_s`` (it goes in
  pieces of 64 KiB, so a slow but steady reader of a large answer is not cut) closes the
  connection, and when the server is cancelled every pending write is cut at once. A write the
  socket takes whole at once skips all that (``ghubai.sockets.write_now``).
- over HTTP/2 a stream's answer waits for the client's flow-control window, but a window that
  stays shut did not hold the app back: a stream's buffer grew without bound (an app that stopped
  reading one stream, or ``SETTINGS_INITIAL_WINDOW_SIZE`` 0, made the hub hold the whole answer
  while the worker generated on). Here the buffer holds the app back, and a stream whose window
  lets no piece of 64 KiB through for ``write_timeout_s`` is reset, its request cancelled as when
  its client leaves.
- over HTTP/2, each stream a client reset before its answer began (a client that leaves, one
  request at a time), and each stream a PRIORITY frame named, kept a node in hypercorn's priority
  tree for the connection's life; at 1,000 the tree raised out of the server and the whole process
  ended. A reset stream's buffer is closed here, so that hypercorn drops it, and PRIORITY frames
  (deprecated by RFC 9113) are ignored. And any fault inside hypercorn or h2 now costs its one
  connection (logged with its traceback), never the server.
- an ASGI app hears that its client left only from ``receive()``, so a request that must stop when
  its client leaves needs a task of its own waiting on it (measured: 11 % of the hub's CPU for a
  short answer). Here a request's stream calls ``scope[CLIENT_GONE]``, when the app put one there,
  the moment hypercorn sees its client's connection close (not before the response ends when the
  client has already sent a next, pipelined request: hypercorn then stops reading that connection).
- hypercorn takes every connection it is offered, so clients that open connections and idle or
  trickle (each may hold a request body of up to ``max_body_bytes``) can take every file descriptor
  and the memory behind them. Past ``max_connections`` open at once, a new connection gets a 503
  with ``Retry-After`` and is closed, as the proxy turns them away.
- hypercorn upper-cases a request's method for the app, but h11 frames the answer by the method as
  sent: a ``head`` request got a HEAD's answer (no body) that h11 refused, so the connection broke
  with a traceback in the log, and a proxy took the hub for broken. HTTP methods are case-sensitive:
  one that is not all capitals gets a 501, and its connection is closed.
- a request answered before its body ended (a 401, a 413) reads no more of it. Over HTTP/2 the
  rest of its DATA frames filled the request's queue, and the reader of the whole connection waited
  on it for good; once its stream closed, the next frame raised KeyError in hypercorn and killed the
  connection with all its streams. The rest of such a body is dropped here, its bytes given back to
  the flow-control windows, and each frame restarts the keep-alive countdown (hypercorn counts the
  connection idle once the answer is sent: a client still uploading after 5 s lost its answer).
- HTTP/2 with prior knowledge (no TLS) begins with a preface that hypercorn's h11 reads as a request,
  which stops the keep-alive countdown; once it knew the connection for HTTP/2, only a stream's end
  started it again. Connections that open none were never closed (four such held a hub at
  ``max_connections = 4`` for good, every client and worker link answered 503). The countdown
  starts again once it is HTTP/2 with no stream open.

- a WebSocket whose peer closed it with the closing handshake was told to the app as code 1006, a
  connection that broke, as much as one that did break, and one hypercorn closed itself (a message
  over its size limit: 1009) as 1006 too: a hub could not log which its worker did. Here the app's
  disconnect carries the close's code and reason, and ``WS_CLOSED_BY`` says who began it.

- over HTTP/1.1 hypercorn writes each piece of an answer as it goes: the head, every body message,
  and the chunked end, each a write (a syscall and a wake-up of the client, or the proxy, to read
  it): four or five for a short stream, two for a whole answer. Here one ASGI message is one write,
  its end included, and a head whose start message says ``BODY_FOLLOWS`` waits for the body that
  the app sends at once after it.

- HTTP/2 has frames that cost the server work and carry no request, and streams a client may reset
  as soon as it began them: a flood of either held the loop (one connection's PINGs, 24 s after they
  stopped) or started generations by the hundred. Past a budget a connection gets GOAWAY with
  ENHANCE_YOUR_CALM and is closed (``CONTROL_BURST``, ``RESETS_BURST``).

Besides, ``server_config`` lifts hypercorn's end of a connection after 1,000 requests (over
HTTP/2 a GOAWAY that failed the request past it) and logs what escapes the app at WARNING. So that
a connection's requests cost nothing that grows, h2 remembers the last 1,024 closed streams of a
connection, not 65,536 (its check of a frame that was in flight when its stream closed; 8.6 MB held
by each long-lived HTTP/2 client, an Envoy upstream, say).

The fixes patch private methods of hypercorn's ``TCPServer``, ``HTTPStream``, ``H11Protocol``,
``H2Protocol``, ``StreamBuffer``, ``ProtocolWrapper`` and ``WSStream``:
``pyproject.toml`` pins hypercorn to the minor version they were written for, and this module
refuses to import when those methods are gone or have changed shape, rather than serve without them.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import ssl
import sys
import time
from importlib.metadata import version
from typing import Any

import h11
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import trio
import wsproto
from hypercorn.config import Config
from hypercorn.trio import serve
from hypercorn.events import Closed, Event, RawData, Updated
from hypercorn.protocol import ProtocolWrapper
from hypercorn.protocol.events import Body, Data, EndBody, EndData, StreamClosed, Trailers
from hypercorn.protocol.events import Event as StreamEvent
from hypercorn.protocol.h11 import H11Protocol
from hypercorn.protocol.h2 import BUFFER_LOW_WATER, H2Protocol, StreamBuffer
from hypercorn.protocol.http_stream import ASGIHTTPState, HTTPStream
from hypercorn.protocol.ws_stream import ASGIWebsocketState, WSStream
from hypercorn.trio.tcp_server import TCPServer
from wsproto.events import CloseConnection
from wsproto.events import Event as WSProtoEvent

import ghubai.http11.grammar  # noqa: F401  (h11's grammars, linear: see the module)
from ghubai.config import renew_certificate, split_hostport
from ghubai.http11.server import turn_away
from ghubai.protocol import MAX_MESSAGE_BYTES
from ghubai.sockets import open_listeners, write_now

_PATCHED = {TCPServer: {"_close": ["self"], "protocol_send": ["self", "event"], "run": ["self"],
                        "_read_data": ["self"]},
            HTTPStream: {"handle": ["self", "event"], "app_send": ["self", "message"]},
            StreamBuffer: {"pop": ["self", "max_length"]},
            H11Protocol: {"_create_stream": ["self", "request"], "_maybe_recycle": ["self"],
                          "_send_h11_event": ["self", "event"]},
            H2Protocol: {"_handle_events": ["self", "events"], "stream_send": ["self", "event"]},
            ProtocolWrapper: {"handle": ["self", "event"]},
            WSStream: {"handle": ["self", "event"], "_send_wsproto_event": ["self", "event"]}}
# hypercorn's 60 s let a client that sends half a ClientHello hold a connection (and the cap's slot)
# for a minute; the proxy gives a whole request head 10 s
HANDSHAKE_TIMEOUT_S = 10.0
WRITE_PIECE_BYTES = 64 * 1024  # a write's deadline moves on after each piece the client took
log = logging.getLogger("ghubai.web")
SERVER_LOG = logging.getLogger("ghubai.web.server")
SERVER_LOG.setLevel(logging.WARNING)
CLIENT_GONE = "ghubai.client_gone"  # an ASGI scope's key: called (no arguments) when the client's connection closes
WS_CLOSED_BY = "ghubai.closed_by"  # a WebSocket disconnect's key: "peer" or "server", who began the close
BODY_FOLLOWS = "ghubai.body_follows"  # an http.response.start's key, true when its app sends the body at once


def _check_patchable() -> None:
    for owner, methods in _PATCHED.items():
        for name, parameters in methods.items():
            method = getattr(owner, name, None)
            if not callable(method) or list(inspect.signature(method).parameters) != parameters:
                raise ImportError(f"ghubai.web patches {owner.__name__}.{name}({', '.join(parameters)}) of hypercorn "
                                  f"0.18, which hypercorn {version('hypercorn')} does not have: install hypercorn 0.18.x")


_check_patchable()
_unshielded_close = TCPServer._close


async def _shielded_close(self: TCPServer) -> None:
    with trio.CancelScope(shield=True):
        await _unshielded_close(self)


TCPServer._close = _shielded_close  # type: ignore[method-assign]

_hypercorn_run = TCPServer.run
_hypercorn_read_data = TCPServer._read_data


async def _read_then_stop_idling(self: TCPServer) -> None:
    """Once the client has closed its side, the connection ends: hypercorn's keep-alive countdown
    went on, and held the closed connection (its file, its place under ``max_connections``) for 5 s."""
    await _hypercorn_read_data(self)
    await self.idle_task.stop()


TCPServer._read_data = _read_then_stop_idling  # type: ignore[method-assign]


async def _guarded_run(self: TCPServer) -> None:
    try:
        await _hypercorn_run(self)
    except* Exception as faults:  # (hypercorn closed the connection on its way out; a cancel goes on)
        log.error("a connection failed inside the HTTP server; it is closed, the server serves on",
                  exc_info=_wordless(faults))


def _wordless(fault: BaseException) -> BaseException:
    """``fault`` as a log may show it: its types and where each arose, without their words or what
    they chained, which may quote the client's bytes (hypercorn's HTTP/2 detection carries the
    connection's first read: an HTTP/2 request's API key reached the log with a fault it caused)."""
    for inner in fault.exceptions if isinstance(fault, BaseExceptionGroup) else ():
        _wordless(inner)
    if not isinstance(fault, BaseExceptionGroup):
        fault.args = ()
    fault.__cause__ = fault.__context__ = None
    fault.__suppress_context__ = True
    return fault


async def _capped_run(self: TCPServer) -> None:
    config = self.config
    if not isinstance(config, GhubConfig) or not config.max_connections:
        await _guarded_run(self)
    elif config.connections >= config.max_connections:
        await turn_away(self.stream, config.who)
    else:
        config.connections += 1
        try:
            await _guarded_run(self)
        finally:
            config.connections -= 1


TCPServer.run = _capped_run  # type: ignore[method-assign]

_hypercorn_protocol_send = TCPServer.protocol_send


class GhubConfig(Config):
    """hypercorn's Config, plus what the patched writes need."""

    write_timeout_s: float = 120.0
    max_connections: int = 0  # open at once; 0: no cap
    who: str = "server"  # names the server in the 503 past the cap

    def __init__(self) -> None:
        super().__init__()
        self.pending_writes: set[trio.CancelScope] = set()
        self.connections = 0
        self.ssl_context: ssl.SSLContext | None = None
        self._headers: dict[str, list[tuple[bytes, bytes]]] = {}  # response_headers, by protocol, of one second
        self._headers_at = 0

    def response_headers(self, protocol: str) -> list[tuple[bytes, bytes]]:
        """hypercorn's, made once a second (it formatted the date for every answer: 0.6 % of the hub's CPU)."""
        if (now := int(time.time())) != self._headers_at:
            self._headers, self._headers_at = {}, now
        if (headers := self._headers.get(protocol)) is None:
            headers = self._headers[protocol] = super().response_headers(protocol)
        return list(headers)

    def create_ssl_context(self) -> ssl.SSLContext | None:
        self.ssl_context = super().create_ssl_context()  # (kept: a reload renews its certificate)
        return self.ssl_context

    def renew_certificate(self) -> str:
        """A reload's: the TLS files read again into the context the server listens with (what it
        says of it, or nothing without TLS); ConfigError when they are no longer a pair."""
        if self.ssl_context is None or self.certfile is None:
            return ""
        return renew_certificate(self.ssl_context, self.certfile, self.keyfile or "")

    def cut_pending_writes(self) -> None:
        for write in list(self.pending_writes):
            write.cancel()


async def _bounded_protocol_send(self: TCPServer, event: Event) -> None:
    if not isinstance(event, RawData) or not isinstance(self.config, GhubConfig):
        # an Updated shielded: the keep-alive countdown is started by the request's own task as its
        # answer ends, and quart-trio cancels that task's scope then; the countdown, begun under it,
        # died at once (an idle connection stayed open for good, and a stopping server waited out its grace)
        with trio.CancelScope(shield=isinstance(event, Updated)):
            await _hypercorn_protocol_send(self, event)
        return
    # shielded as hypercorn's: a request's cancel must not cut a write, nor the rest of one the
    # socket took in part; but its own deadline (a stalled client) or a stopping server may
    data = event.data if self.send_lock.locked() else await write_now(self.stream, event.data, shielded=True)
    if not data:
        return
    try:
        with trio.CancelScope(shield=True) as write:
            self.config.pending_writes.add(write)
            try:
                async with self.send_lock:  # a write ahead of this one has its own deadline
                    view = memoryview(data)
                    for start in range(0, len(view), WRITE_PIECE_BYTES):
                        write.deadline = trio.current_time() + self.config.write_timeout_s
                        await self.stream.send_all(view[start:start + WRITE_PIECE_BYTES])
            finally:
                self.config.pending_writes.discard(write)
        if write.cancelled_caught:
            raise trio.BrokenResourceError("the client took no data in time")
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        # closing may cancel this very task (CLIENT_GONE): shielded, so that every stream hears of it
        with trio.CancelScope(shield=True, deadline=trio.current_time() + self.config.write_timeout_s):
            await self.protocol.handle(Closed())
        # and the socket closed: hypercorn would go on reading a client that sends nothing, which
        # then waits for the rest of its answer (through a proxy, for response_timeout_s)
        await trio.aclose_forcefully(self.stream)


TCPServer.protocol_send = _bounded_protocol_send  # type: ignore[method-assign]

_hypercorn_stream_handle = HTTPStream.handle


async def _stream_handle(self: HTTPStream, event: StreamEvent) -> None:
    if isinstance(event, Body):  # (see _app_send)
        if self.state is ASGIHTTPState.REQUEST:
            with trio.CancelScope() as self.ghubai_body_put:  # type: ignore[attr-defined]
                await _hypercorn_stream_handle(self, event)
        return
    if isinstance(event, StreamClosed):  # its app hears it by CLIENT_GONE: a full queue must not hold the reader
        # (a bounded wait, not none: a queue with room takes the disconnect at once)
        with trio.move_on_after(1):
            await _stream_closed(self, event)
        return
    await _hypercorn_stream_handle(self, event)


async def _stream_closed(self: HTTPStream, event: StreamEvent) -> None:
    if not self.closed and self.state is not ASGIHTTPState.CLOSED and \
            (gone := getattr(self, "scope", {}).get(CLIENT_GONE)):
        gone()  # the connection closed before the response ended (after it, this is the stream's recycling)
    await _hypercorn_stream_handle(self, event)


HTTPStream.handle = _stream_handle  # type: ignore[method-assign]

_hypercorn_ws_handle = WSStream.handle
_hypercorn_ws_send_event = WSStream._send_wsproto_event


async def _ws_send_event(self: WSStream, event: WSProtoEvent) -> None:
    if isinstance(event, CloseConnection) and self.state is ASGIWebsocketState.CONNECTED:  # (not the app's own)
        began = "peer" if self.connection.state is wsproto.ConnectionState.REMOTE_CLOSING else "server"
        close = {"code": int(event.code), "reason": event.reason or "", WS_CLOSED_BY: began}
        self.ghubai_close = close  # type: ignore[attr-defined]
    await _hypercorn_ws_send_event(self, event)


async def _ws_handle(self: WSStream, event: StreamEvent) -> None:
    if isinstance(event, (Body, Data)) and not self.closed and not self.handshake.accepted:
        # data sent before the handshake's answer (RFC 6455 §4.1 forbids it): hypercorn answers 400,
        # but the app's accept raced that answer (h11 refused it: three tracebacks a connection) or,
        # with no race, nothing closed the connection, which held a place under max_connections for
        # as long as a client with no key liked (a hunt: 53 of 100 such upgrades, at hub and registry)
        self.closed = True  # before the 400's first write: the app's accept is then dropped
        await self._send_error_response(400)
        await self.send(StreamClosed(stream_id=self.stream_id))  # with "connection: close": closed
        if self.app_put is not None:
            await self.app_put({"type": "websocket.disconnect", "code": 1006})  # (not the hello's wait)
        return
    if isinstance(event, StreamClosed) and self.app_put is not None and \
            (close := getattr(self, "ghubai_close", None)) is not None:  # (else hypercorn's: 1000, or 1006)
        self.closed = True
        await self.app_put({"type": "websocket.disconnect", **close})
        return
    await _hypercorn_ws_handle(self, event)


WSStream.handle = _ws_handle  # type: ignore[method-assign]
WSStream._send_wsproto_event = _ws_send_event  # type: ignore[method-assign]

_hypercorn_app_send = HTTPStream.app_send


async def _app_send(self: HTTPStream, message: Any) -> None:
    """An answer that begins before its request's body ended (a 401, a 413) drops the rest of the
    body: the app reads no more of it, and over HTTP/2 a put into its full queue held the reader of
    the whole connection (every stream's answers and window updates) for good. A request whose app
    was cancelled before it answered, as the server stops, gets a 503, which a proxy takes to another
    server, not hypercorn's 500, which it passed on to its client (a hub's restart failed requests)."""
    if message is not None and message["type"] == "http.response.start" and \
            (put := getattr(self, "ghubai_body_put", None)) is not None:
        put.cancel()
    elif message is None and not self.closed and self.state is ASGIHTTPState.REQUEST and \
            trio.current_effective_deadline() == -math.inf:  # (an app's own fault stays hypercorn's 500)
        await self._send_error_response(503)
    protocol = getattr(self.send, "__self__", None)  # (the stream's connection: its send is a bound method)
    if not isinstance(protocol, H11Protocol):
        await _hypercorn_app_send(self, message)
        return
    if protocol.ghubai_held is None:  # type: ignore[attr-defined]
        kind = None if message is None else message["type"]
        if not (kind == "http.response.body" and not message.get("more_body", False) or  # (its end with it)
                kind == "http.response.start" and message.get(BODY_FOLLOWS)):  # (its body with it)
            await _hypercorn_app_send(self, message)  # (a stream's next piece: written as it is)
            return
        protocol.ghubai_held = bytearray()  # type: ignore[attr-defined]
    try:
        await _hypercorn_app_send(self, message)
    finally:
        if message is None or message["type"] != "http.response.start" or not message.get(BODY_FOLLOWS):
            await _write_held(protocol)


HTTPStream.app_send = _app_send  # type: ignore[method-assign]

_hypercorn_h2_events = H2Protocol._handle_events

# Frames a client may send that cost the server work and carry no request (PING, SETTINGS,
# WINDOW_UPDATE, PRIORITY, empty DATA: the 2019 floods, CVE-2019-9512 and -9515): past a burst, this
# many a second, beyond two window updates for each DATA frame of answer sent (a stream's and the
# connection's, which some clients send for every frame); and streams it resets within a second of
# their start (Rapid Reset, CVE-2023-44487: each a request begun, often an engine's generation), once
# there are this many and they are half the streams it began, as Envoy judges them (a multiplexer
# that cancels some of its users' requests is no flood). Past either, the connection is closed with
# ENHANCE_YOUR_CALM. Measured before: one connection's PINGs held the hub's loop for 24 s after they
# stopped (honest clients waited 15 s), and one's resets started 694 generations in 15 s.
CONTROL_BURST, CONTROL_PER_S = 1000, 100.0
RESETS_BURST = 100
PREMATURE_S = 1.0
DATA_FRAME_BYTES = 16384  # (h2's default SETTINGS_MAX_FRAME_SIZE: what a piece of answer is cut into)
_CONTROL = (h2.events.PingReceived, h2.events.PingAckReceived, h2.events.RemoteSettingsChanged,
            h2.events.SettingsAcknowledged, h2.events.WindowUpdated, h2.events.PriorityUpdated)
_calmed_at = -math.inf  # when a flood was last logged (once a minute at most: each is one connection)


class _Bucket:
    """A token bucket: ``take`` is false once ``burst`` were taken faster than ``rate`` a second."""
    __slots__ = ("burst", "rate", "tokens", "at")

    def __init__(self, burst: float, rate: float) -> None:
        self.burst, self.rate, self.tokens, self.at = burst, rate, burst, trio.current_time()

    def take(self) -> bool:
        now = trio.current_time()
        self.tokens, self.at = min(self.burst, self.tokens + (now - self.at) * self.rate), now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True

    def give(self, count: int) -> None:
        self.tokens = min(self.burst, self.tokens + count)


class _Floods:
    """A connection's account of what it sent that ``CONTROL_BURST`` and ``RESETS_BURST`` bound."""
    __slots__ = ("control", "begun", "premature", "started")

    def __init__(self) -> None:
        self.control = _Bucket(CONTROL_BURST, CONTROL_PER_S)
        self.begun = self.premature = 0
        self.started: dict[int, float] = {}  # open streams' start (trio time), pruned to those still open


def _floods(self: H2Protocol) -> _Floods:
    if (floods := getattr(self, "ghubai_floods", None)) is None:
        floods = self.ghubai_floods = _Floods()  # type: ignore[attr-defined]
    return floods


def _flooding(self: H2Protocol, event: h2.events.Event) -> str | None:
    """What ``event`` is too many of on this connection, or None."""
    floods = _floods(self)
    if isinstance(event, _CONTROL) or (isinstance(event, h2.events.DataReceived) and not event.data
                                       and event.stream_ended is None):
        return None if floods.control.take() else "control frames (PING, SETTINGS, WINDOW_UPDATE ...)"
    if isinstance(event, h2.events.RequestReceived):
        floods.begun += 1
        if len(floods.started) > len(self.streams) + 100:  # (streams that ended since: forgotten)
            floods.started = {key: at for key, at in floods.started.items() if key in self.streams}
        floods.started[event.stream_id] = trio.current_time()
    elif isinstance(event, h2.events.StreamReset) and event.stream_id in self.streams and \
            trio.current_time() - floods.started.pop(event.stream_id, -math.inf) < PREMATURE_S:
        floods.premature += 1
        if floods.premature >= RESETS_BURST and 2 * floods.premature >= floods.begun:
            return "streams reset within a second of their start"
    return None


async def _calm(self: H2Protocol, what: str) -> None:
    """End a connection that floods the server: GOAWAY with ENHANCE_YOUR_CALM, then the close."""
    global _calmed_at
    if trio.current_time() - _calmed_at >= 60:
        _calmed_at = trio.current_time()
        log.warning("an HTTP/2 client sent too many %s: its connection is closed (ENHANCE_YOUR_CALM; said once "
                    "a minute at most)", what)
    with contextlib.suppress(h2.exceptions.ProtocolError):
        self.connection.close_connection(error_code=h2.errors.ErrorCodes.ENHANCE_YOUR_CALM)
    await self._flush()
    await self.send(Closed())


async def _h2_events(self: H2Protocol, events: list[h2.events.Event]) -> None:
    for event in events:  # one at a time: passing one on may yield, and a request's answer end its stream
        if (flood := _flooding(self, event)) is not None:
            await _calm(self, flood)
            return
        if isinstance(event, h2.events.DataReceived) and event.stream_id not in self.streams:
            # (not reset: a RST_STREAM would overtake the answer, which hypercorn sends from a queue)
            self.connection.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            if all(stream.idle for stream in self.streams.values()):  # hypercorn's own test of idleness
                await self.send(Updated(idle=True))  # the keep-alive countdown restarts: the body goes on
        elif isinstance(event, h2.events.RequestReceived) and all(name != b":path" for name, _ in event.headers):
            # a CONNECT (h2 lets it have no path; the extended one of a WebSocket has one): none is served,
            # and hypercorn, which reads a path from every request, failed the whole connection on it
            self.connection.reset_stream(event.stream_id, h2.errors.ErrorCodes.PROTOCOL_ERROR)
        elif not isinstance(event, h2.events.PriorityUpdated):  # (deprecated by RFC 9113, ignored here)
            if isinstance(event, h2.events.StreamReset) and \
                    (buffer := self.stream_buffers.get(event.stream_id)) is not None:
                await buffer.close()  # so that the send task's visit drops it (h2 keeps a closed stream a while)
            await _hypercorn_h2_events(self, [event])
    await self._flush()


H2Protocol._handle_events = _h2_events  # type: ignore[method-assign]


async def _pop(self: StreamBuffer, max_length: int) -> bytes:
    """hypercorn's, but the app is let go on only once the buffer is low, not whenever a pop took
    little: with a shut window every pop takes nothing, and so let every push through."""
    data = bytes(self.buffer[:max_length])
    del self.buffer[:max_length]
    if len(self.buffer) < BUFFER_LOW_WATER:
        await self._paused.set()
    if not self.buffer:
        await self._is_empty.set()
    return data


StreamBuffer.pop = _pop  # type: ignore[method-assign]

_hypercorn_stream_send = H2Protocol.stream_send


async def _bounded_stream_send(self: H2Protocol, event: StreamEvent) -> None:
    if not isinstance(event, Body | Data | EndBody | EndData | Trailers) or \
            not isinstance(self.config, GhubConfig):
        await _hypercorn_stream_send(self, event)
        return
    if isinstance(event, Body | Data) and len(event.data) > WRITE_PIECE_BYTES:
        for start in range(0, len(event.data), WRITE_PIECE_BYTES):  # a deadline for each
            piece = event.data[start:start + WRITE_PIECE_BYTES]
            await _bounded_stream_send(self, type(event)(event.stream_id, piece))
        return
    if isinstance(event, Body | Data):  # (the client may answer each DATA frame with two window updates)
        _floods(self).control.give(2 * (1 + len(event.data) // DATA_FRAME_BYTES))
    with trio.move_on_after(self.config.write_timeout_s) as wait:  # for the client's window
        await _hypercorn_stream_send(self, event)
    if wait.cancelled_caught:  # reset as hypercorn handles a client's reset: its send_task, which may be
        stream_id = event.stream_id  # inside a write for this stream, is the one that drops its buffer
        with contextlib.suppress(h2.exceptions.ProtocolError):  # (closed meanwhile)
            self.connection.reset_stream(stream_id, h2.errors.ErrorCodes.CANCEL)
        if (buffer := self.stream_buffers.get(stream_id)) is not None:
            await buffer.close()
        await self._window_updated(stream_id)  # send_task visits it, finds it closed, and drops it
        await self._flush()
        # before the close: that cancels this very task (CLIENT_GONE), and the keep-alive countdown
        # would never restart on a connection left without a stream
        await self.send(Updated(idle=all(stream.idle for key, stream in self.streams.items()
                                         if key != stream_id)))
        await self._close_stream(stream_id)  # its request hears its client is gone


H2Protocol.stream_send = _bounded_stream_send  # type: ignore[method-assign]

_hypercorn_create_stream = H11Protocol._create_stream


async def _exact_method_stream(self: H11Protocol, request: h11.Request) -> None:
    if request.method != request.method.upper():  # (the stream is never made: its events go unread)
        await self._send_error_response(501)
        await self.send(Closed())
    else:
        await _hypercorn_create_stream(self, request)


H11Protocol._create_stream = _exact_method_stream  # type: ignore[method-assign]

# what an ASGI message (and a head that waits for its body) gave h11 to send, written once it is all
# there (``_app_send``); None outside an app's send
H11Protocol.ghubai_held = None  # type: ignore[attr-defined]
_hypercorn_send_h11_event = H11Protocol._send_h11_event
_hypercorn_maybe_recycle = H11Protocol._maybe_recycle


async def _held_h11_event(self: H11Protocol, event: Any) -> None:
    if self.ghubai_held is None:  # type: ignore[attr-defined]
        await _hypercorn_send_h11_event(self, event)
        return
    try:
        self.ghubai_held += self.connection.send(event)  # type: ignore[attr-defined, operator]
    except h11.LocalProtocolError:  # (as hypercorn's: the client's fault has ended the connection)
        if self.connection.their_state != h11.ERROR:
            raise
    if isinstance(event, h11.EndOfMessage):  # written while the stream still answers: a write that fails
        await _write_held(self)  # then is its client gone (CLIENT_GONE), not an answer already closed


async def _write_held(self: H11Protocol) -> None:
    data, self.ghubai_held = self.ghubai_held, None  # type: ignore[attr-defined]
    if data:
        await self.send(RawData(data=bytes(data)))


async def _written_then_recycled(self: H11Protocol) -> None:
    await _write_held(self)  # before the connection's next cycle, or its close
    await _hypercorn_maybe_recycle(self)


H11Protocol._send_h11_event = _held_h11_event  # type: ignore[method-assign]
H11Protocol._maybe_recycle = _written_then_recycled  # type: ignore[method-assign]

_hypercorn_wrapper_handle = ProtocolWrapper.handle


async def _idle_once_http2(self: ProtocolWrapper, event: Event) -> None:
    was = self.protocol
    await _hypercorn_wrapper_handle(self, event)
    if self.protocol is not was and isinstance(self.protocol, H2Protocol) and not self.protocol.streams \
            and not self.protocol.closed:  # (review: a connection closed on garbage needs no countdown)
        await self.send(Updated(idle=True))  # (h11 stopped the countdown for a preface it took for a request)


ProtocolWrapper.handle = _idle_once_http2  # type: ignore[method-assign]
h2.connection.H2Connection.MAX_CLOSED_STREAMS = 1024  # (frames in flight: 100 streams open at most)


def server_config(listen: str, *, tls_cert: str = "", tls_key: str = "", write_timeout_s: float = 120.0,
                  max_connections: int = 0, who: str = "server", idle_timeout_s: float = 75.0) -> GhubConfig:
    config = GhubConfig()
    # hypercorn's 5 s keep-alive was shorter than a front's: nginx (60 s by default) and haproxy sent
    # a request on a connection the hub was closing, and their client got a 502 (a hunt: 1 in 20
    # requests sent 5 s apart). As the proxy's, 75 s, above the common 60.
    config.keep_alive_timeout = idle_timeout_s
    config.write_timeout_s = write_timeout_s
    config.max_connections, config.who = max_connections, who
    config.bind = [listen]
    config.graceful_timeout = 1.0  # hypercorn's wait for open connections once told to stop
    # hypercorn listens with a backlog of 100: in a burst, the SYNs past it were dropped and their
    # clients came back 1, 3, 7 ... s later, or gave up (the proxy's connect_timeout_s). The kernel
    # caps this at net.core.somaxconn (4,096 on current Linux), as the proxy's own listener gets.
    config.backlog = 65535
    # hypercorn ends a connection after 1,000 requests; over HTTP/2 with a GOAWAY that fails the
    # request that came past it (httpx raises RemoteProtocolError): one request in a thousand of a
    # long-lived client. A connection's requests cost nothing that grows, so there is no such end.
    config.keep_alive_max_requests = sys.maxsize
    config.include_server_header = False
    config.accesslog = None
    config.errorlog = SERVER_LOG  # a fault that escapes the app: logged, not dropped (not its "Running on" lines)
    config.websocket_max_message_size = MAX_MESSAGE_BYTES
    config.ssl_handshake_timeout = HANDSHAKE_TIMEOUT_S
    if tls_cert:  # no key file: the key is in the certificate's file (as the proxy reads it too)
        config.certfile, config.keyfile = tls_cert, tls_key or tls_cert
    return config


async def serve_app(app: Any, config: GhubConfig, *, until: trio.Event | None = None,
                    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve until cancelled, or until ``until`` is set: then stop listening and give the requests
    being answered ``graceful_timeout`` to end. Reports the bound URLs (``["http://127.0.0.1:PORT"]``)."""
    await _bind(config)
    async with trio.open_nursery() as nursery:
        async def serving(task_status: trio.TaskStatus[list[str]]) -> None:
            await serve(app, config, shutdown_trigger=trio.sleep_forever if until is None else until.wait,
                        task_status=task_status)
            nursery.cancel_scope.cancel()  # (and the writes' watch with it)

        nursery.start_soon(_cut_writes_at_the_end, config, until)
        task_status.started(await nursery.start(serving))


async def _bind(config: GhubConfig) -> None:
    """Listen on ``config.bind``'s HOST:PORT as the proxy does: on every address the host resolves
    to, each in its own family, and an IPv6 zone kept. hypercorn took the family from the text (a
    host name was IPv4 alone, one with IPv6 addresses alone failed) and dropped a zone
    (``[fe80::1%eth0]`` failed): it is given the sockets."""
    host, port = split_hostport(config.bind[0])
    listeners = await open_listeners(host, port, config.backlog)
    config.bind = [f"fd://{listener.socket.detach()}" for listener in listeners]


async def _cut_writes_at_the_end(config: GhubConfig, until: trio.Event | None) -> None:
    """Once cancelled, or ``graceful_timeout`` after ``until``, cut the writes still pending, or a
    write to a client that stopped reading (shielded, with its own deadline) holds the server up."""
    try:
        await (until.wait() if until is not None else trio.sleep_forever())
        await trio.sleep(config.graceful_timeout)  # (hypercorn's grace for what it had accepted is over)
    finally:
        config.cut_pending_writes()
