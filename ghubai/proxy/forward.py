"""Forwarding one request to a hub and its answer back, byte for byte as it arrives.

A request that has sent nothing to its client yet goes to the next hub when connecting fails, the
hub's connection breaks before it answers or after its answer's head but before any of the answer
was sent on (the hub is marked down at once), or the hub answers 502 or 503 (not one it marks as
a failure the request would meet again, ``dialects.FINAL``, or as its whole queue time), or 501 (its
workers' engines lack the API: another hub's may have it), or 404 to a request for a model (it lost the model,
or gained none yet, since its last health check) — up to ``max_attempts`` hubs. A hub that sends
nothing for ``response_timeout_s`` is slow, not down: a 504, and no other hub asked. Once the answer has
started, it is never retried: if the hub fails mid-stream, the client gets one final error event
(SSE or NDJSON) and a cleanly ended stream.
While the request runs, the client's socket is watched: a client that leaves closes the hub
connection at once, so the hub cancels the generation. An unload (``keep_alive`` 0, nothing to
generate) goes to every hub whose engines hold the model.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

import h11
import trio

from ghubai import affinity, cors, dialects, protocol
from ghubai.config import ProxyConfig
from ghubai.errors import CLIENT_CLOSED, LEFT_MID_ANSWER, ApiError, last_sequence_number
from ghubai.http11.client import BodyCut, ClientConnection
from ghubai.http11.server import Connection, Request
from ghubai.observability import tracing
from ghubai.proxy.hubs import Hub, HubSet

log = logging.getLogger("ghubai.proxy")

HOP_BY_HOP = {b"connection", b"keep-alive", b"proxy-connection", b"proxy-authenticate", b"proxy-authorization",
              b"te", b"trailer", b"transfer-encoding", b"upgrade"}
_PROXY_HOP = dialects.PROXY_HOP_HEADER.encode()
RETRY_STATUSES = {501, 502, 503}
MODEL_PATHS = frozenset(protocol.API_PATHS.values())  # where a hub's 404 means it has not the model
MAX_DRAIN_BYTES = 1 << 20
UNLOAD_PATHS = {protocol.API_PATHS[api]: api for api in dialects.PRELOADS}  # where an unload may come
UPSTREAM_ERRORS = (OSError, trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError,
                   trio.TooSlowError)


class UpstreamFailed(Exception):
    """The hub's side of an exchange broke (as opposed to the client's)."""


class NothingRelayed(UpstreamFailed):
    """The hub broke after its answer's head but before any of it reached the client (a hub killed
    between the two writes of a whole answer): another hub may still take the request."""


@dataclass
class Outcome:
    """What became of one proxied request, for its log line and metrics (``status`` 0: none yet)."""
    status: int = 0
    hub: str = ""
    answered_at: float | None = None  # trio time the hub's answer began
    streamed: bool = False  # a stream began: when, is its time to first token (a stream cut later too)
    model: str | None = None  # as the body names it, read once for routing and kept for the metrics
    reason: str = ""  # why the proxy failed it, for the log line (a hub's own answer says why in the hub's)


def _body_of(request: Request) -> dict[str, Any] | None:
    if request.method != "POST" or not request.body.lstrip().startswith(b"{"):
        return None
    try:
        return dialects.parse_body(request.body)
    except ApiError:  # the hub will say what is wrong with it
        return None


def model_named(request: Request) -> str:
    """The model a ``GET /v1/models/{model}`` names."""
    return unquote(request.path.removeprefix(dialects.MODEL_PATH))


def _asks_model(request: Request) -> bool:
    """A hub's 404 to this request means it has not the model: another hub may."""
    return request.path in MODEL_PATHS or request.method == "GET" and request.path.startswith(dialects.MODEL_PATH)


def route_of(request: Request) -> tuple[str | None, int | None, dict[str, Any]]:
    """The model, the conversation's key (``ghubai.affinity``): the same conversation goes to the
    same hub while it is healthy, where the hub sends it to the engine that holds its prompt; and
    the body, as far as the proxy reads it."""
    if request.method == "GET" and request.path.startswith(dialects.MODEL_PATH):
        return model_named(request), None, {}
    body = _body_of(request) or {}
    model = body.get("model") or body.get("name")  # (the ollama command names /api/show's model "name")
    keyed = affinity.as_conversation(body) if request.path == protocol.API_PATHS["openai.responses"] else body
    conversation = affinity.key_of(keyed, request.headers) if keyed else None
    return (model if isinstance(model, str) else None), conversation, body


def _strip_hop_by_hop(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    named = {token.strip().lower() for key, value in headers if key == b"connection" for token in value.split(b",")}
    return [(key, value) for key, value in headers if key not in HOP_BY_HOP and key not in named]


def _passed_on(response: h11.Response, length: bool) -> list[tuple[bytes, bytes]]:
    """A hub's answer's headers as the client gets them: not the hop's, the request id (the proxy's
    own goes out), the hubs' word to the proxy, or a hub's CORS (the proxy's, never a hub's); nor
    its length unless ``length`` (a chunked answer's, or one the proxy sends whole, is stale)."""
    return [(k, v) for k, v in _strip_hop_by_hop(list(response.headers))
            if k not in (b"x-request-id", dialects.ELSEWHERE_HEADER) and (length or k != b"content-length")
            and not cors.foreign(k, v)]


def forwarded_for(request: Request, client_ip: str) -> bytes:
    """The ``X-Forwarded-For`` a hub is sent: the client's chain, and the client's address."""
    forwarded = request.header(b"x-forwarded-for")
    return (forwarded + b", " if forwarded else b"") + client_ip.encode()


def upstream_headers(request: Request, hub: Hub, client_ip: str, request_id: str,
                     elsewhere: bool = False) -> list[tuple[bytes, bytes]]:
    """The client's headers as the hub should see them: ours for the hop, the request id, and the
    proxy's span as the trace parent when the proxy traces (else the client's context passes through);
    ``elsewhere``: another hub could take the request (``dialects.ELSEWHERE_HEADER``)."""
    trace = [(name.encode(), value.encode()) for name, value in tracing.inject({}).items()]
    # (not the page's origin, which the proxy judged: a hub of other cors_origins would refuse it)
    replaced = {b"host", b"content-length", b"x-request-id", b"x-forwarded-for", b"expect", b"origin", _PROXY_HOP,
                dialects.ELSEWHERE_HEADER, *(k for k, _ in trace),
                *((name.encode() for name in tracing.CONTEXT_HEADERS) if tracing.active() else ())}
    kept = [(k, v) for k, v in _strip_hop_by_hop(request.headers) if k not in replaced]
    return [(b"host", hub.pool.authority.encode()), *kept, *trace,
            (b"x-forwarded-for", forwarded_for(request, client_ip)),
            (b"x-request-id", request_id.encode()), (b"content-length", str(len(request.body)).encode()),
            (_PROXY_HOP, b"1"), *([(dialects.ELSEWHERE_HEADER, b"1")] if elsewhere else [])]


def _final_error(content_type: bytes, path: str, message: str, sent: bytes) -> bytes:
    """The error that ends a stream cut in the middle after ``sent`` (the last bytes passed on), in
    the stream's own framing (none for others): on ``path`` /v1/responses, a typed ``error`` event,
    as the hub ends such a stream."""
    error = ApiError(502, message)
    if content_type.startswith(b"text/event-stream"):
        if path == protocol.API_PATHS["openai.responses"]:
            return error.typed_event(last_sequence_number(sent))
        return error.stream_end(sse=True)
    if content_type.startswith(b"application/x-ndjson"):
        return error.stream_end(sse=False)
    return b""


def _boundary(content_type: bytes) -> bytes | None:
    """What ends an event of a streamed answer: the proxy passes on whole events only, so that an
    error it adds after a hub failed never lands in the middle of one."""
    if content_type.startswith(b"text/event-stream"):
        return b"\n\n"
    return b"\n" if content_type.startswith(b"application/x-ndjson") else None


def _ends_in_error(data: bytes, boundary: bytes) -> bool:
    """Whether the last event in ``data`` is a hub's error event (``ApiError.stream_end``, or a
    Responses stream's ``typed_event``), which ends a stream that failed after its 200 head."""
    last = data.rstrip(b"\n").rpartition(boundary)[2]
    return last.startswith((b'data: {"error"', b"event: error\n") if boundary == b"\n\n" else b'{"error"')


STOPPING = "The proxy is shutting down"
HUB_ERROR_EVENT = "the hub's answer ended with its error event"
STOP_WRITE_S = 1.0  # for the final event of an answer a stopping proxy cuts


class Forwarder:
    """Forwards one client request to a hub and relays the answer. Invariant: a request is retried
    on another hub only before any byte of an answer reached the client; ``running`` holds the cancel
    scope of every request being forwarded, so that a drain that timed out can end them."""
    def __init__(self, config: ProxyConfig, hubs: HubSet) -> None:
        self.config = config
        self.hubs = hubs
        self.running: set[trio.CancelScope] = set()
        self.stopping = False  # the drain timed out: requests still running end with an error

    def stop(self) -> None:
        """End every request still running: an answer begun gets a final error event, one not begun a 503."""
        self.stopping = True
        for scope in self.running:
            scope.cancel()

    async def forward(self, conn: Connection, request: Request, client_ip: str, outcome: Outcome,
                      request_id: str) -> None:
        """Answer ``request`` through a hub, watching the client for the whole exchange."""
        refusal: ApiError | None = None
        async with trio.open_nursery() as nursery:
            self.running.add(nursery.cancel_scope)
            watching = trio.CancelScope()
            nursery.start_soon(conn.watch, nursery.cancel_scope, watching)
            try:
                await self._forward(conn, request, client_ip, outcome, request_id)
            except ApiError as error:  # answered by the caller, once the watcher is gone
                refusal = error
            finally:
                self.running.discard(nursery.cancel_scope)
            watching.cancel()
        if self.stopping and nursery.cancel_scope.cancelled_caught and refusal is None:
            outcome.status, outcome.reason = 503, STOPPING
            if not conn.response_started:  # else the answer ended with an error event (_relay)
                refusal = ApiError(503, STOPPING, retry_after=1)
        elif refusal is None and not outcome.status:
            outcome.status, outcome.reason = CLIENT_CLOSED, "the client left before its answer began"
        elif refusal is None and conn.peer_closed and not conn.response_ended and not outcome.reason:
            outcome.reason = LEFT_MID_ANSWER
        if refusal is not None:
            raise refusal

    async def _forward(self, conn: Connection, request: Request, client_ip: str, outcome: Outcome,
                       request_id: str) -> None:
        model, conversation, body = route_of(request)
        model = outcome.model = model and self.hubs.named(model)
        if model and (holders := self._holders_to_unload(request, model, body)):
            await self._unload(conn, request, client_ip, outcome, request_id, holders)
            return
        tried: set[str] = set()
        cut_by = ""  # a TLS hub that closed on the body (``BodyCut``): if no other takes it, why
        # the first hub that refused at once only because it was told another could take the request
        # (``dialects.SENT_ON``: its workers of the model coming back): when no other does, it keeps it
        bounced: Hub | None = None
        while True:
            if len(tried) < self.config.max_attempts and (hub := self.hubs.pick(model, tried, conversation)):
                tried.add(hub.address)
                # another hub that lists the model (not merely one tried for a model no hub lists)
                elsewhere = bool(model) and len(tried) < self.config.max_attempts and \
                    any(model in other.models for other in self.hubs.candidates(model, tried))
            elif bounced is not None:
                hub, bounced, elsewhere = bounced, None, False
                log.info("no other hub took it: back to hub %s, to wait there", hub.name)
            else:
                break
            outcome.hub = hub.name
            hub.inflight += 1  # what the proxy has outstanding there: the bound of a conversation's affinity
            try:
                try:
                    upstream, response = await self._exchange(hub, request, client_ip, request_id, elsewhere)
                except BodyCut:  # this request's doing (too large, a wrong key) or the hub's: not marked down
                    cut_by = hub.name
                    continue
                if upstream is None or response is None:
                    continue
                another = bounced is not None or \
                    (len(tried) < self.config.max_attempts and self.hubs.candidates(model, tried))
                # (its whole queue time, or a failure the request meets again: ``dialects.FINAL``)
                waited = any(key == dialects.ELSEWHERE_HEADER and value in (b"waited", b"final")
                             for key, value in response.headers)
                # (a pull's 501 is every hub's: the grid pulls no model)
                if response.status_code in RETRY_STATUSES and another and not waited and request.path != "/api/pull":
                    if bounced is None and (dialects.ELSEWHERE_HEADER, b"refused") in response.headers:
                        bounced = hub
                    log.info("hub %s answered %d; trying another hub", hub.name, response.status_code)
                    await self._discard(hub, upstream)
                    continue
                if response.status_code == 404 and model and _asks_model(request):
                    if model in hub.models:  # it lost the model since its last check: check again soon
                        self.hubs.recheck()
                    if another:  # another hub may have it
                        log.info("hub %s has no %s; trying another hub", hub.name, model)
                        await self._discard(hub, upstream)
                        continue
                outcome.status, outcome.answered_at = response.status_code, trio.current_time()
                try:
                    await self._relay(conn, hub, upstream, response, request_id, outcome)
                except ApiError:  # too slow before its first byte: a 504, and no answer began
                    outcome.answered_at = None
                    raise
                except NothingRelayed as error:
                    log.warning("hub %s failed before its answer began: %s", hub.name, error)
                    self.hubs.answer_broke(hub, str(error), self.config.health.down_after)
                    outcome.status, outcome.answered_at = 0, None  # nothing answered yet
                    continue
                hub.broken_answers = 0
                return
            finally:
                hub.inflight -= 1
        if cut_by:
            outcome.status = 502
            raise ApiError(502, f"Hub {cut_by} closed the connection before it took the whole request (a body too "
                           "large for it, or refused?)")
        outcome.status = 503
        said = "No healthy hub could take this request" if tried else \
            f"No healthy hub serves '{model}' now" if model and self.hubs.serves(model) else "No healthy hub"
        raise ApiError(503, said, retry_after=1)

    def _holders_to_unload(self, request: Request, model: str, body: dict[str, Any]) -> list[Hub]:
        """The healthy hubs whose engines hold ``model``, as their summaries said, when ``request`` is
        an unload (``keep_alive`` 0, nothing to generate); else none."""
        if (api := UNLOAD_PATHS.get(request.path)) is None or not dialects.unloads(api, body):
            return []
        return [hub for hub in self.hubs.healthy() if model in hub.loaded]

    async def _unload(self, conn: Connection, request: Request, client_ip: str, outcome: Outcome, request_id: str,
                      holders: list[Hub]) -> None:
        """An unload goes to every hub whose engines hold the model, each sending it on to its own
        holders (one hub took it, which might hold no copy: the client heard "unload", and the other
        copies stayed). The client gets the first hub's answer, or its refusal; with every other
        answer read, and a hub's refusal logged."""
        answers: dict[str, tuple[h11.Response, bytes]] = {}

        async def unload(hub: Hub) -> None:
            hub.inflight += 1
            try:
                upstream, response = await self._exchange(hub, request, client_ip, request_id, False)
                if upstream is None or response is None:
                    return
                try:
                    answers[hub.name] = response, await self._whole(upstream)
                except BaseException:
                    await upstream.aclose()  # (the client left, or the hub broke: no answer to wait for)
                    raise
                await self.hubs.release(hub, upstream)
                if response.status_code != 200:
                    log.warning("hub %s answered the unload %d", hub.name, response.status_code)
            except (ApiError, BodyCut, UpstreamFailed, *UPSTREAM_ERRORS) as error:
                log.warning("hub %s did not take the unload: %s", hub.name, getattr(error, "message", error))
            finally:
                hub.inflight -= 1

        async with trio.open_nursery() as nursery:
            for hub in holders:
                nursery.start_soon(unload, hub)
        # (a 200 if any hub gave one: one hub's refusal, its own rate limit, is not the grid's answer)
        first = next((hub for hub in holders if hub.name in answers and answers[hub.name][0].status_code == 200),
                     next((hub for hub in holders if hub.name in answers), None))
        if first is None:
            outcome.status = 502
            raise ApiError(502, "No hub that holds the model took the unload")
        response, body = answers[first.name]
        outcome.hub, outcome.status, outcome.answered_at = first.name, response.status_code, trio.current_time()
        await conn.send(h11.Response(status_code=response.status_code, headers=[
            *_passed_on(response, length=False), (b"content-length", str(len(body)).encode()),
            (b"x-request-id", request_id.encode()), *conn.cors]), h11.Data(data=body), h11.EndOfMessage())

    async def _whole(self, upstream: ClientConnection) -> bytes:
        """A short answer, whole (an unload's: at most ``MAX_DRAIN_BYTES``)."""
        body = bytearray()
        with trio.fail_after(self.config.response_timeout_s):
            while True:
                data, ended = await upstream.body_part()
                body += data
                if len(body) > MAX_DRAIN_BYTES:
                    raise UpstreamFailed(f"an answer larger than {MAX_DRAIN_BYTES} bytes")
                if ended:
                    return bytes(body)

    async def _exchange(self, hub: Hub, request: Request, client_ip: str, request_id: str,
                        elsewhere: bool) -> tuple[ClientConnection | None, h11.Response | None]:
        """Send the request and read the answer's head (``ConnectionPool.exchange``: pooled connections
        the hub had closed are passed over); on a broken connection mark the hub down."""
        events = [h11.Request(method=request.method, target=request.target,
                              headers=upstream_headers(request, hub, client_ip, request_id, elsewhere)),
                  h11.Data(data=request.body), h11.EndOfMessage()]
        try:
            return await hub.pool.exchange(events, self.config.response_timeout_s)
        except trio.TooSlowError:  # connected, and slow to answer: not down
            raise self._too_slow(hub) from None
        except BodyCut:  # (for the caller: not a hub found down)
            raise
        except UPSTREAM_ERRORS as error:
            self.hubs.set_health(hub, False, f"{type(error).__name__}: {error}".rstrip(": "))
            return None, None

    async def _discard(self, hub: Hub, upstream: ClientConnection) -> None:
        """Read and drop an answer we will not use, keeping the connection when that is cheap."""
        drained = 0
        try:
            with trio.fail_after(self.config.connect_timeout_s):
                while drained <= MAX_DRAIN_BYTES:
                    data, ended = await upstream.body_part()
                    drained += len(data)
                    if ended:
                        await self.hubs.release(hub, upstream)
                        return
        except UPSTREAM_ERRORS:
            pass
        except BaseException:  # the client left meanwhile: the connection must not wait for the collector
            await upstream.aclose()
            raise
        await upstream.aclose()

    def _too_slow(self, hub: Hub) -> ApiError:
        """A hub that answers nothing for ``response_timeout_s`` is slow with this request, not down:
        its answer is cut (the hub hears it and cancels), and neither it nor another hub is asked
        again, where the same wait, and the same work, would follow."""
        return ApiError(504, f"Hub {hub.name} sent nothing for {self.config.response_timeout_s:g} s "
                        "(response_timeout_s)")

    async def _next(self, upstream: ClientConnection) -> tuple[bytes, bool]:
        try:
            return await upstream.body_part(self.config.response_timeout_s)
        except UPSTREAM_ERRORS as error:
            raise UpstreamFailed(f"{type(error).__name__}: {error}".rstrip(": ")) from error

    async def _relay(self, conn: Connection, hub: Hub, upstream: ClientConnection, response: h11.Response,
                     request_id: str, outcome: Outcome) -> None:
        """Pass the answer on as it arrives. One that failed after its head (the client then got a
        final error event, the hub's or ours) is a 502 in ``outcome``, as the hub logs it, also when
        the client left at that event (as the SDKs do) before the stream's end arrived."""
        headers = _passed_on(response, length=not any(k == b"transfer-encoding" for k, _ in response.headers))
        content_type = next((v for k, v in headers if k == b"content-type"), b"")
        boundary, held = _boundary(content_type), bytearray()  # held: the start of an event not yet whole
        outcome.streamed = boundary is not None and response.status_code < 300  # (its status may turn 502 later)
        pending: list[h11.Event] = [h11.Response(status_code=response.status_code, reason=response.reason,
                                                 headers=[*headers, (b"x-request-id", request_id.encode()),
                                                          *conn.cors])]
        last = b""  # the last piece passed on: it holds the last event
        try:
            ended = False
            while not ended:  # what has already arrived goes out in one write; nothing waits for more
                data, ended = await self._next(upstream)
                if boundary is not None:
                    data = bytes(held) + data if ended else dialects.whole_events(held, data, boundary)
                    if len(held) > protocol.MAX_EVENT_BYTES:  # no event is that large: the answer is broken
                        raise UpstreamFailed(f"an event larger than {protocol.MAX_EVENT_BYTES} bytes")
                if data:
                    last = data
                    pending.append(h11.Data(data=data))
                if ended:
                    pending.append(h11.EndOfMessage())
                if pending:
                    await conn.send(*pending)
                pending = []
        except UpstreamFailed as error:
            await upstream.aclose()
            if pending and isinstance(pending[0], h11.Response):  # not a byte sent yet
                if isinstance(error.__cause__, trio.TooSlowError):
                    raise self._too_slow(hub) from None
                raise NothingRelayed(str(error)) from error
            if isinstance(error.__cause__, trio.TooSlowError):  # the proxy's own limit, not the hub's failure
                said = f"Hub {hub.name} sent nothing for {self.config.response_timeout_s:g} s in the middle of the " \
                       "answer (response_timeout_s)"
                outcome.status, outcome.reason = 504, said
            else:
                said = f"Hub {hub.name} failed in the middle of the answer"
                outcome.status, outcome.reason = 502, "the hub's answer broke off"
            log.warning("hub %s failed mid-answer: %s", hub.name, error)
            await self._end_cut(conn, pending, content_type, said, last)
            return
        except BaseException:
            await upstream.aclose()  # the client left, or we are stopping: the hub must hear it now
            if boundary and _ends_in_error(last, boundary):
                outcome.status, outcome.reason = 502, HUB_ERROR_EVENT
            if self.stopping and conn.response_started and not conn.cut_mid_write:  # (else it just closes)
                with trio.CancelScope(shield=True, deadline=trio.current_time() + STOP_WRITE_S):
                    await self._end_cut(conn, [], content_type, STOPPING, last)
            raise
        await self.hubs.release(hub, upstream)
        if boundary and _ends_in_error(last, boundary):
            outcome.status, outcome.reason = 502, HUB_ERROR_EVENT

    @staticmethod
    async def _end_cut(conn: Connection, pending: list[h11.Event], content_type: bytes, message: str,
                       sent: bytes) -> None:
        """End an answer cut after its first byte (``sent`` its last bytes passed on) with a final
        error event in its own framing; without one the answer stays unfinished and the client sees it cut."""
        if final := _final_error(content_type, conn.head.partition(" ")[2], message, sent):
            pending = [*pending, h11.Data(data=final), h11.EndOfMessage()]
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, h11.LocalProtocolError):
            await conn.send(*pending)
