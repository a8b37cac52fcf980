"""The worker: dials out to every hub it is given, keeps each link alive, runs the hubs' requests
against the local engine and streams the answers back.

Ownership: ``run`` owns one task per hub link and the discovery loop. A link owns its writer, its
heartbeat and every request it received, so a broken link cancels its requests and closes their
engine connections. ``max_concurrency`` holds across all links: a request beyond it is answered
with a retryable ``error`` and the hub tries another worker.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import ssl
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial
from urllib.parse import urlsplit

import trio
import trio_websocket

from ghubai import __version__, dialects, protocol
from ghubai.link import deafness, heartbeat, pong_due, read_frames, write_batched
from ghubai.config import WorkerConfig
from ghubai.errors import describe
from ghubai.http11.client import open_stream, tls_client_context
from ghubai.observability import logs, tracing
from ghubai.observability.service import Service
from ghubai.worker.engine import NO_CONNECTION, Call, Cause, Engine, EngineError, Offer

log = logging.getLogger("ghubai.worker")

BACKOFF_FIRST_S = 0.5
DISCOVERY_RETRY_FIRST_S = 1.0
# A hub down for long is dialled every 5-10 s (with 30, a restarted hub had no worker for up to 17 s
# after it was back: a hunt); a refused connection costs it nothing
BACKOFF_MAX_S = 10.0
# After a hub said it stops (close code 1001), its port refusing connections is its restart, logged
# at info for this long, and dialled every 0.5-1 s, so that it has its workers back within a second;
# then at warning, as any hub that does not answer.
RESTART_GRACE_S = 60.0
RESTART_BACKOFF_S = 1.0
LASTING_S = 10.0  # a welcomed link that lasted less does not start the backoff afresh
# a link's writer behind by this much (a hub that does not read): the answers wait (``Link.room``)
QUEUED_BYTES = 4 * protocol.MAX_BATCH_BYTES + protocol.MAX_CHUNK_BYTES
UNREAD_BYTES = 64 << 20  # queued past this (frames no answer waits to send: refusals), the hub reads nothing
WELCOME_TIMEOUT_S = 10.0
FLUSH_TIMEOUT_S = 5.0
DISCONNECT_TIMEOUT_S = 2.0


def backoffs(backoff: float, restarting: bool) -> tuple[float, float]:
    """This dial's backoff and the next one's: twice the last, up to ``BACKOFF_MAX_S`` (both up to
    ``RESTART_BACKOFF_S`` while the hub restarts, whatever an earlier outage made it); each wait is
    drawn from the upper half of its backoff."""
    cap = RESTART_BACKOFF_S if restarting else BACKOFF_MAX_S
    now = min(backoff, cap)
    return now, min(now * 2, cap)


def _first(group: BaseException) -> BaseException:
    """The first exception a (possibly nested) group holds: the one a log line names."""
    while isinstance(group, BaseExceptionGroup):
        group = group.exceptions[0]
    return group


class Heard(trio.abc.Stream):
    """A link's stream that notes when bytes last came (``read_frames``'s ``heard``)."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.heard = trio.current_time()
        self.send_all = stream.send_all  # type: ignore[method-assign]  # no layer on each message sent

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        data = await self.stream.receive_some(max_bytes)
        self.heard = trio.current_time()
        return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self.stream.aclose()


class RunningRequest:
    """A request this worker runs for one hub, from its ``request`` frame to its last frame.
    Invariant: it is in its link's ``running`` exactly while its task runs; ``scope`` cancels that
    task (the hub's ``cancel``, a lost link, a drain that timed out); ``unacked`` is what was sent
    of its answer that the hub has not yet passed on to its client (at most ``WINDOW_BYTES``,
    unless one piece is larger alone)."""

    def __init__(self, frame: protocol.Request) -> None:
        self.frame = frame
        self.scope = trio.CancelScope()
        self.unacked = 0
        self.logged = False  # its line is written (done, or an error): else it was cut off
        self._granted = trio.Event()

    async def reserve(self, size: int) -> None:
        """Wait until ``size`` more bytes fit in the window: a slow client stops us reading the engine."""
        while self.unacked and self.unacked + size > protocol.WINDOW_BYTES:
            await self._granted.wait()
            self._granted = trio.Event()
        self.unacked += size

    def grant(self, size: int) -> None:
        self.unacked = max(0, self.unacked - size)
        self._granted.set()


class Link:
    """One live connection to one hub: frames out go through an unbounded channel to one writer,
    so a request task or a sync ``finally`` can send without waiting. Invariant: ``running`` holds
    the requests of this hub that run now, by id; ``queued`` counts the bytes in ``out`` not yet
    written, which answers wait on (``room``) past ``QUEUED_BYTES``."""

    def __init__(self, url: str, out: trio.MemorySendChannel[str | bytes], heartbeat_s: float) -> None:
        self.url = url
        self.out = out
        self.heartbeat_s = heartbeat_s
        self.running: dict[str, RunningRequest] = {}
        self.flushed = trio.Event()  # set once ``out`` is closed and everything in it was sent
        self.queued = 0
        self._written = trio.Event()
        self.ponged = -math.inf  # when it last answered the hub's ping
        self.pong_heard = trio.current_time()  # when the hub last answered its ping (``link.deafness``)
        self.frame_heard = trio.current_time()  # when its last whole message came (bytes since: one arrives)
        self.scope: trio.CancelScope | None = None  # the link's, while it serves

    def send(self, frame: protocol.Frame | bytes) -> None:
        data = frame if isinstance(frame, bytes) else protocol.encode(frame)
        try:
            self.out.send_nowait(data)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            return  # the link is gone; its requests are being cancelled with it
        self.queued += len(data)
        if self.queued > UNREAD_BYTES and self.scope is not None and not self.scope.cancel_called:
            # (what answers send waits for room: this is refusals, a hub flooding requests it does not read)
            log.warning("hub at %s reads nothing (%d bytes wait to be written): dropping the link", self.url,
                        self.queued)
            self.scope.cancel()

    async def room(self) -> None:
        """Wait while the writer is behind by more than ``QUEUED_BYTES``: a hub that stops reading
        (but grants credit, or pings) must not make the worker hold the engine's answers in memory
        (3 MB a second grew without bound)."""
        while self.queued > QUEUED_BYTES:
            await self._written.wait()

    def written(self, size: int) -> None:
        """A message of ``size`` was written (its frames' newlines too: ``queued`` may err low, never below 0)."""
        self.queued = max(0, self.queued - size)
        self._written.set()
        self._written = trio.Event()


class Worker:
    """The worker daemon's state. Invariant: ``inflight`` is the number of requests running over all
    links, never above ``max_concurrency``, and every hub hears it (``load``) whenever it changes."""

    def __init__(self, config: WorkerConfig, engine: Engine) -> None:
        self.config = config
        self.engine = engine
        self.id = uuid.uuid4().hex
        self.offer = Offer()  # until the first survey, before any link is dialled
        self.inflight = 0
        self.links: set[Link] = set()
        self.linked: dict[str, str] = {}  # hub id → the hub_url its link was made to
        self.welcomed = trio.Event()
        self.draining = False
        self.idle = trio.Event()  # set while no request runs
        self.idle.set()
        self._rediscover = trio.Event()
        self._loaded_one = trio.Event()  # a request ran on a model that was not in memory
        self._surveyed_at = -math.inf  # when the last survey of the engine began
        self._unreached = False  # a request or the residency poll could not connect to the engine
        self._closed: set[str] = set()  # the hub URLs whose links it closed itself, drained

    @property
    def models(self) -> tuple[str, ...]:
        return self.offer.models

    @property
    def capacity(self) -> int:
        """Requests this worker runs at once: ``max_concurrency``, or fewer when the engine has fewer slots."""
        return min(self.config.engine.max_concurrency, self.offer.slots or self.config.engine.max_concurrency)

    # -- discovery -------------------------------------------------------------------------------

    async def refresh_offer(self) -> None:
        """Ask the engine what it offers and tell every hub when that changed. An engine that does
        not answer hosts nothing: the hubs stop sending it requests until it is back, and a client
        that asks for a model meanwhile hears why."""
        self._surveyed_at = trio.current_time()
        offer = await self.engine.survey()
        before, self.offer = self.offer, offer
        if offer.problem and offer.problem != before.problem:
            log.warning("engine at %s lists no models: %s%s", self.config.engine.url, offer.problem,
                        f" ({offer.detail})" if offer.detail else "")
        elif before.problem and not offer.problem:
            log.info("engine at %s answers again", self.config.engine.url)
        if offer.models != before.models:
            log.info("models: %s", ", ".join(offer.models) or "(none)")
        if offer.apis != before.apis and offer.apis is not None and len(offer.apis) < len(protocol.API_PATHS):
            log.warning("the engine does not serve %s: the hubs send those requests to other workers",
                        ", ".join(api for api in protocol.API_PATHS if api not in offer.apis))
        if offer.slots != before.slots and offer.slots:
            log.info("the engine has %d slots: running at most %d requests at once", offer.slots, self.capacity)
        if offer != before:
            self._announce()

    def _announce(self, links: list[Link] | None = None) -> None:
        offer = self.offer
        for link in list(self.links) if links is None else links:
            link.send(protocol.Models(offer.models, offer.apis, offer.loaded, offer.problem, self.capacity,
                                      offer.facts))

    async def residency_loop(self) -> None:
        """Which models Ollama holds in memory, for the hubs' scheduling: every
        ``residency_interval_s``, and at once after a request loaded a model (which may have
        evicted another). Other engines cannot tell: every model they list counts as loaded."""
        while True:
            with trio.move_on_after(self.config.engine.residency_interval_s) as timer:
                await self._loaded_one.wait()
            self._loaded_one = trio.Event()
            self.engine.pool.close_stale()  # (a quiet worker keeps no connection its engine closed)
            try:
                loaded = await self.engine.loaded()
            except NO_CONNECTION:
                self._unreachable()
                continue
            facts = self.engine.facts()
            # after a request for a model not in memory, the hubs hear it even unchanged: the hub
            # that sent it counted the model loaded here, and must learn so if the load never came
            if loaded is not None and not self.offer.problem and \
                    (loaded != self.offer.loaded or facts != self.offer.facts or not timer.cancelled_caught):
                self.offer = dataclasses.replace(self.offer, loaded=loaded, facts=facts)
                self._announce()

    def _unreachable(self) -> None:
        """The engine could not be reached: a survey now, not at the next discovery (the hubs went on
        listing its models, and sending it requests that failed, for up to ``discovery_interval_s``)."""
        if not self.offer.problem:  # (while it has one, discovery asks on its own schedule)
            self._unreached = True
            self._rediscover.set()

    def rediscover(self) -> None:
        """Ask the engine for its models now (SIGHUP, after an ``ollama pull``), in the discovery loop."""
        log.info("asking the engine for its models again")
        self._rediscover.set()

    async def discovery_loop(self) -> None:
        """Every ``discovery_interval_s``; sooner while the engine lists nothing because of a problem
        (it does not answer, refuses the key, sends no list): after 1 s, then twice as long each
        time. An engine that boots with its worker, or comes back, serves in seconds."""
        retry_s = DISCOVERY_RETRY_FIRST_S
        while True:
            wait_s = self.config.engine.discovery_interval_s
            if self.offer.problem:
                wait_s, retry_s = min(wait_s, retry_s), min(wait_s, retry_s * 2)
            else:
                retry_s = DISCOVERY_RETRY_FIRST_S
            with trio.move_on_after(wait_s):
                await self._rediscover.wait()
            self._rediscover = trio.Event()
            if self._unreached:  # at most a survey a second for those (a burst of failed requests made a storm)
                self._unreached = False
                await trio.sleep_until(self._surveyed_at + DISCOVERY_RETRY_FIRST_S)
            await self.refresh_offer()

    # -- links -----------------------------------------------------------------------------------

    async def link_loop(self, url: str) -> None:
        """Keep one link to ``url`` up for ever: reconnect with exponential backoff and jitter."""
        backoff = BACKOFF_FIRST_S
        headers = [(b"authorization", f"Bearer {self.config.provider_token}".encode())] \
            if self.config.provider_token else []
        tls = tls_client_context(self.config.ca_file, self.config.allow_invalid_certs) \
            if urlsplit(url).scheme == "wss" else None  # (any case: WSS:// passes the check)
        restarting_until = -math.inf  # a hub that said it stops is expected back: not a fault until then
        while True:
            try:
                async with self._dial(url, tls, headers) as (ws, stream):
                    welcome, said = await self._handshake(ws, url)
                    if (other := self.linked.setdefault(welcome.hub_id, url)) != url:
                        log.error("hub %s at %s is the hub this worker links to at %s: not linking to it twice "
                                  "(a hub takes one link per worker; list each hub once in hub_url)",
                                  welcome.hub_id, url, other)
                        return
                    restarting_until, linked_at = -math.inf, trio.current_time()
                    try:
                        await self._serve_link(ws, url, welcome.heartbeat_s, stream, said)
                    finally:
                        del self.linked[welcome.hub_id]
                        # (a hub that welcomes and drops at once was dialled twice a second for ever)
                        backoff = BACKOFF_FIRST_S if trio.current_time() - linked_at >= LASTING_S else backoff
            except* trio_websocket.ConnectionRejected as group:
                rejected = _first(group)
                assert isinstance(rejected, trio_websocket.ConnectionRejected)
                reason = (rejected.body or b"").decode(errors="replace").strip()[:200]
                if rejected.status_code == 404:  # a proxy's or registry's port for a hub's (first-run hunt)
                    reason = "no /gridhub there: hub_url must name a hub, not a proxy or a registry"
                log.error("hub %s refused this worker: HTTP %s %s", url, rejected.status_code, reason)
            except* trio_websocket.ConnectionClosed as group:
                closed = _first(group)
                assert isinstance(closed, trio_websocket.ConnectionClosed)
                why = closed.reason
                if why is not None and why.code == protocol.CLOSE_GOING_AWAY:  # a planned stop (a restart)
                    log.info("link to %s closed by the hub: %s", url, why.reason or "going away")
                    restarting_until = trio.current_time() + RESTART_GRACE_S
                elif url in self._closed:  # its own close, once it had drained (``_write``)
                    log.info("link to %s closed: the worker is stopping", url)
                else:
                    log.warning("link to %s closed: %s", url, f"code {why.code} ({why.name}) {why.reason or ''}"
                                if why is not None else "no reason given")
            except* (OSError, trio.BrokenResourceError, trio_websocket.HandshakeError, trio.TooSlowError,
                     protocol.ProtocolError) as group:
                level = logging.INFO if trio.current_time() < restarting_until else logging.WARNING
                log.log(level, "link to %s failed: %s", url, describe(_first(group)))
            except* Exception as group:  # a bug must cost this link a reconnect, never the worker process
                log.error("link to %s failed inside the worker", url, exc_info=_first(group))
            if self.draining:  # a stopping worker dials no hub again
                return
            backoff, following = backoffs(backoff, trio.current_time() < restarting_until)
            delay = backoff / 2 + random.uniform(0, backoff / 2)
            log.info("reconnecting to %s in %.1f s", url, delay)
            await trio.sleep(delay)
            if self.draining:  # (it began while this link waited)
                return
            backoff = following

    @asynccontextmanager
    async def _dial(self, url: str, tls: ssl.SSLContext | None,
                    headers: list[tuple[bytes, bytes]]) -> AsyncIterator[tuple[trio_websocket.WebSocketConnection, Heard]]:
        """A WebSocket to ``url`` on a stream whose TLS handshake we did ourselves (trio-websocket's
        own turns a refused certificate into a bare timeout), all within ``connect_timeout_s``."""
        parts = urlsplit(url)
        host, port = parts.hostname or "localhost", parts.port or (443 if tls else 80)
        named = f"[{host}]" if ":" in host else host  # the Host header: the URL's, port and all
        named += f":{parts.port}" if parts.port else ""
        # a hub's address without a path means its link (``ws://hub:7197``: a 404 at / for ever, before)
        resource = (parts.path if parts.path.strip("/") else protocol.GRIDHUB_PATH) + \
            (f"?{parts.query}" if parts.query else "")
        timeout_s = self.config.engine.connect_timeout_s
        stream = Heard(await open_stream(host, port, tls, timeout_s))
        try:
            async with trio.open_nursery() as nursery:
                with trio.fail_after(timeout_s):
                    ws = await trio_websocket.wrap_client_stream(
                        nursery, stream, named, resource, extra_headers=headers,  # type: ignore[arg-type]
                        max_message_size=protocol.MAX_MESSAGE_BYTES, message_queue_size=64)
                try:
                    yield ws, stream
                finally:
                    with trio.move_on_after(DISCONNECT_TIMEOUT_S):  # a closing handshake, unless we are cancelled
                        await ws.aclose()
                    nursery.cancel_scope.cancel()
        finally:  # a handshake that failed leaves the socket to us (else it waits for the garbage collector)
            await trio.aclose_forcefully(stream)

    async def _handshake(self, ws: trio_websocket.WebSocketConnection, url: str) -> tuple[protocol.Welcome, Offer]:
        """The hub's welcome, and the offer (and slots) the hello told it."""
        offer = self.offer
        await ws.send_message(protocol.encode(protocol.Hello(
            protocol.PROTOCOL, self.id, self.config.name, offer.models, self.capacity, self.config.engine.kind,
            __version__, offer.apis, offer.loaded, offer.problem, self.config.weight, offer.facts)))
        with trio.fail_after(WELCOME_TIMEOUT_S):
            frame = protocol.decode(await ws.get_message())
        if not isinstance(frame, protocol.Welcome):
            raise protocol.ProtocolError(f"expected welcome, got {protocol.type_of(frame)}")
        log.info("linked to hub %s at %s", frame.hub_id, url)
        self.welcomed.set()
        return frame, offer

    async def _serve_link(self, ws: trio_websocket.WebSocketConnection, url: str, heartbeat_s: float,
                          stream: Heard, said: Offer) -> None:
        out_send, out_receive = trio.open_memory_channel[str | bytes](math.inf)
        link = Link(url, out_send, heartbeat_s)
        self.links.add(link)
        # what changed while the hello waited for its welcome (the link was not yet told of it)
        if self.offer != said:
            self._announce([link])
        if self.inflight:
            link.send(protocol.Load(self.inflight))
        if self.draining:
            link.send(protocol.Draining())
        try:
            async with trio.open_nursery() as nursery:
                link.scope = nursery.cancel_scope
                nursery.start_soon(self._write, link, out_receive, ws)
                nursery.start_soon(heartbeat, link.send, lambda: self.inflight, heartbeat_s)
                nursery.start_soon(self._drop_when_deaf, link, stream)
                silent_s = await read_frames(ws.get_message, heartbeat_s, partial(self._dispatch, link, nursery),
                                             partial(self._refuse, link), lambda: stream.heard)
                log.warning("hub at %s silent for %.1f s: dropping the link", link.url, silent_s)
                nursery.cancel_scope.cancel()
        finally:
            self.links.discard(link)
            out_send.close()

    @staticmethod
    async def _drop_when_deaf(link: Link, stream: Heard) -> None:
        """(A hub that sent pings but read nothing held the engine's slots its requests took for good,
        and the worker's other hubs got 503s.) Its requests are cancelled with the link; it is dialled again."""
        late_s = await deafness(lambda: link.pong_heard, link.heartbeat_s, lambda: stream.heard > link.frame_heard)
        log.warning("hub at %s answered no ping for %.1f s (it reads nothing): dropping the link", link.url, late_s)
        if link.scope is not None:
            link.scope.cancel()

    async def _write(self, link: Link, frames: trio.MemoryReceiveChannel[str | bytes],
                     ws: trio_websocket.WebSocketConnection) -> None:
        async def send(message: str | bytes) -> None:
            await ws.send_message(message)
            link.written(len(message))

        await write_batched(frames, send)
        try:
            if self.draining:  # its last answers are out: a closing handshake, so that the hub hears a stop (a
                self._closed.add(link.url)  # drained worker's link, cut as it exited, was a "connection broke
                with trio.move_on_after(DISCONNECT_TIMEOUT_S):  # without a close" in every hub's log)
                    await ws.aclose()
        finally:  # (the hub's answer to the close ends the link's reader, and the link's tasks with it)
            link.flushed.set()

    def _refuse(self, link: Link, problem: protocol.ProtocolError) -> None:
        log.warning("bad frame from %s: %s", link.url, problem)
        if problem.request_id and problem.frame_type == "request":  # the hub waits: refuse it, don't drop it
            link.send(protocol.Error(problem.request_id, 400, f"refused by the worker: {problem}", False))

    def _dispatch(self, link: Link, nursery: trio.Nursery, frame: protocol.Frame | protocol.Unknown) -> None:
        """Synchronous, so that slots are counted and a cancel finds its request even when both
        arrive in one message, before the request's task has run at all."""
        link.frame_heard = trio.current_time()
        match frame:
            case protocol.Request():
                self._admit(link, nursery, frame)
            case protocol.Cancel(request_id):
                if running := link.running.get(request_id):
                    running.scope.cancel()
            case protocol.Credit(request_id, size):
                if running := link.running.get(request_id):
                    running.grant(size)
            case protocol.Ping():
                if pong_due(link.ponged, link.heartbeat_s):
                    link.ponged = trio.current_time()
                    link.send(protocol.Pong(self.inflight))
            case protocol.Pong():
                link.pong_heard = trio.current_time()
            case _:
                log.debug("ignoring a %s frame from %s", protocol.type_of(frame), link.url)

    def _admit(self, link: Link, nursery: trio.Nursery, frame: protocol.Request) -> None:
        """Start the request, or refuse it with an ``error`` frame saying why."""
        if frame.id in link.running:  # a hub's bug: both end, and the hub hears one error for the id
            log.warning("hub at %s sent request %s twice: ending it", link.url, frame.id)
            link.running[frame.id].scope.cancel()
            link.send(protocol.Error(frame.id, 400, "duplicate request id", retryable=False))
        # (an unload takes no slot of the engine's: taken however busy, and while it drains, as its
        # engine keeps the model when the worker stops)
        elif self.draining and not dialects.unloads(frame.api, frame.body):
            log.info("%s for %s: refused (request %s), the worker is draining", frame.api, frame.body.get("model"),
                     frame.trace.get("x-request-id", frame.id))
            link.send(protocol.Error(frame.id, 503, "worker is shutting down", retryable=True))
        elif self.inflight >= self.capacity and not dialects.unloads(frame.api, frame.body):  # (hubs share it)
            log.debug("%s for %s: refused (request %s), every slot is taken", frame.api, frame.body.get("model"),
                      frame.trace.get("x-request-id", frame.id))
            link.send(protocol.Error(frame.id, 503, "worker is at max_concurrency", retryable=True, busy=True))
        else:
            self._count(+1, link)
            link.running[frame.id] = running = RunningRequest(frame)
            nursery.start_soon(self._serve_request, link, running)

    # -- requests --------------------------------------------------------------------------------

    def _count(self, change: int, by: Link) -> None:
        """One request more or less. Every hub hears the new count, except the one that just sent a
        request: it counted that slot itself when it chose this worker (one frame less per request)."""
        self.inflight += change
        if self.inflight == 0:
            self.idle.set()
        elif self.idle.is_set():
            self.idle = trio.Event()
        for each in list(self.links):
            if change < 0 or each is not by:
                each.send(protocol.Load(self.inflight))

    async def drain(self) -> None:
        """Tell every hub to send nothing new, then let the running requests finish."""
        self.draining = True
        for link in list(self.links):
            link.send(protocol.Draining())
        log.info("draining: %d request(s) running, waiting up to %g s", self.inflight, self.config.drain_timeout_s)
        with trio.move_on_after(self.config.drain_timeout_s):
            await self.idle.wait()
        if not self.idle.is_set():
            log.warning("drain timeout: ending %d request(s) with an error", self.inflight)
            for link in list(self.links):
                for request_id, running in list(link.running.items()):
                    # retryable: before its first byte a request goes to another worker, as after a crash
                    link.send(protocol.Error(request_id, 503, "the worker is shutting down", retryable=True))
                    running.scope.cancel()
            await self.idle.wait()  # cancelled requests end at once
        with trio.move_on_after(FLUSH_TIMEOUT_S):  # the last answers must reach the hubs before we go
            links = list(self.links)
            for link in links:  # (all at once: each link's writer then closes it, a round trip to its hub)
                link.out.close()
            for link in links:
                await link.flushed.wait()
        log.info("drained: every request finished")

    async def _serve_request(self, link: Link, running: RunningRequest) -> None:
        frame, request_id = running.frame, running.frame.id
        trace = dict(frame.trace)
        trace["x-request-id"] = logs.request_id(trace.get("x-request-id"))  # on every line of this task
        call = Call(api=frame.api, body=frame.body, stream=frame.stream, headers=trace)
        started = trio.current_time()
        try:
            with running.scope, tracing.span(f"engine {call.api}", trace, kind="client",
                                             **{"gen_ai.request.model": call.body.get("model")}):
                tracing.inject(call.headers)  # the engine's parent is this span
                await self._call_engine(link, running, call)
        finally:
            if link.running.get(request_id) is running:
                del link.running[request_id]
            self._count(-1, link)
            if not running.logged:  # a line for every request, however it ended
                log.info("%s for %s: stopped after %.3f s, %s", call.api, call.body.get("model"),
                         trio.current_time() - started,
                         "cancelled (the client left, a timeout, a drain)" if running.scope.cancel_called
                         else "its link to the hub ended")

    async def _call_engine(self, link: Link, running: RunningRequest, call: Call) -> None:
        """Stream the engine's answer to the hub; whatever fails ends this request only, with an
        ``error`` frame, never the link and the other requests on it."""
        request_id, started = running.frame.id, trio.current_time()
        model = call.body.get("model")
        cold = self.offer.loaded is not None and model not in self.offer.loaded
        try:
            async for batch in self.engine.run(call):
                if cold:  # the engine loaded it for this request: ask it what it holds now
                    self._loaded_one.set()
                    cold = False
                for start in range(0, len(batch), protocol.MAX_CHUNK_BYTES):  # a big answer: many records
                    piece = batch[start:start + protocol.MAX_CHUNK_BYTES]  # the whole batch is no copy
                    await running.reserve(len(piece))  # a slow client stops us reading the engine
                    await link.room()  # and so does a hub that does not read
                    link.send(protocol.chunk(request_id, piece))
            link.send(protocol.End(request_id, call.usage))
            tracing.annotate(**{f"gen_ai.usage.{kind}_tokens": count for kind, count in (
                ("input", (call.usage or {}).get("prompt_tokens")),
                ("output", (call.usage or {}).get("completion_tokens")))})
            log.info("%s for %s: done in %.3f s, usage %s", call.api, model, trio.current_time() - started, call.usage)
            running.logged = True
        except EngineError as error:
            running.logged = True
            untranslatable = error.cause is Cause.UNTRANSLATABLE
            message, detail = self.engine.scrub(error.message), self.engine.scrub(error.detail)
            log.log(logging.INFO if error.cause in (None, Cause.UNREACHABLE) or untranslatable else logging.WARNING,
                    "%s for %s: engine error %d: %s%s", call.api, model, error.status, message,
                    f": {detail}" if detail else "")
            link.send(protocol.Error(request_id, error.status, message, error.retryable,
                                     untranslatable=untranslatable, retry_after=error.retry_after))
            tracing.annotate(**{"http.response.status_code": error.status})
            if error.cause is Cause.MODEL_MISSING:
                self._rediscover.set()
            elif error.cause is Cause.UNREACHABLE:
                self._unreachable()
            elif error.cause is Cause.UNSERVED and self.offer.apis != self.engine.apis():
                self.offer = dataclasses.replace(self.offer, apis=self.engine.apis())
                self._announce()
        except Exception:  # a bug here must cost this request only, never the link and its others
            running.logged = True
            log.exception("request %s failed inside the worker", request_id)
            link.send(protocol.Error(request_id, 500, "internal error in the worker", retryable=True))
        finally:
            if cold:  # it failed before a byte: whether the engine loaded the model or not, say what it holds
                self._loaded_one.set()


async def _unless_set(event: trio.Event | None, work: Callable[[], Awaitable[object]]) -> bool:
    """Run ``work`` to its end, unless ``event`` is set first: then cancel it and say False."""
    if event is None:
        await work()
        return True
    async with trio.open_nursery() as nursery:
        async def cancel_when_set() -> None:
            await event.wait()
            nursery.cancel_scope.cancel()

        nursery.start_soon(cancel_when_set)
        await work()
        nursery.cancel_scope.cancel()
    return not event.is_set()


async def _ready_when_welcomed(worker: Worker, service: Service) -> None:
    await worker.welcomed.wait()
    service.ready()


async def run(config: WorkerConfig, *, drain: trio.Event | None = None, service: Service | None = None,
              task_status: trio.TaskStatus[Worker] = trio.TASK_STATUS_IGNORED) -> None:
    """Run the worker until cancelled, or until ``drain`` is set and its requests are done. It is
    ready once a hub has welcomed it; a reload (SIGHUP) asks the engine for its models at once."""
    async with Engine.client_for(config.engine) as client:
        worker = Worker(config, Engine(config.engine, client))
        service = service or Service({})
        service.summary = lambda: (f"linked to {len(worker.links)}/{len(config.hub_url)} hubs, "
                                   f"{worker.inflight}/{worker.capacity} inflight, "
                                   f"{len(worker.models)} models{', draining' if worker.draining else ''}")
        service.reload = worker.rediscover
        if not await _unless_set(drain, worker.refresh_offer):  # a SIGTERM while the engine keeps it waiting
            log.info("stopped before the engine answered")
            return
        log.info("worker %s (%s) for %s engine at %s, max_concurrency %d",
                 config.name, worker.id[:8], config.engine.kind, config.engine.url, config.engine.max_concurrency)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(worker.discovery_loop)
            if config.engine.kind == "ollama":
                nursery.start_soon(worker.residency_loop)
            for url in config.hub_url:
                nursery.start_soon(worker.link_loop, url)
            nursery.start_soon(_ready_when_welcomed, worker, service)
            task_status.started(worker)
            if drain is not None:
                await drain.wait()
                await worker.drain()
                nursery.cancel_scope.cancel()
