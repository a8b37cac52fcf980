"""The hub's HTTP API (quart-trio on hypercorn): OpenAI and Ollama endpoints, status pages, ``/gridhub``.

The routes that carry inference are served as plain ASGI inside the same app (``HubApi._asgi``):
quart's request and response objects cost more per request than the rest of the hub together, and
those routes need none of them. Everything else (model lists, status pages, the workers' WebSocket)
goes through quart. A request's work runs in a cancel scope that hypercorn's stream cancels when the
client leaves (``web.CLIENT_GONE``: no task per request waits on ``receive()`` for it), and with it
the exchange, whose worker hears ``cancel``. The call's ``finally`` finishes the request's record
however the request ended.
"""

from __future__ import annotations

import logging
import math
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import msgspec
import trio
from quart import Response, has_request_context, request, websocket
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException, NotFound
from werkzeug.routing import PathConverter

from ghubai import __version__, affinity, cors, dialects, protocol
from ghubai.auth import Secrets
from ghubai.config import HubConfig
from ghubai.errors import (CLIENT_CLOSED, CLOSE, LEFT_MID_ANSWER, ApiError, body_too_large, invalid_api_key,
                           model_not_found)
from ghubai.hub import answers
from ghubai.hub.exchange import Exchange, InFlight
from ghubai.hub.gridhub import noting_close, serve_worker
from ghubai.hub.limits import RateLimits
from ghubai.hub.pool import Pool, RemoteWorker
from ghubai.http11.grammar import BOTH_FRAMINGS, both_framings
from ghubai.http11.server import RequestBody, origin_form
from ghubai.observability import dashboard, tracing
from ghubai.observability.history import History
from ghubai.observability.logs import REQUEST_ID, REQUEST_ID_HEADER, request_id, whence
from ghubai.observability.metrics import CONTENT_TYPE, CounterMetricFamily, GaugeMetricFamily, Metric, Metrics
from ghubai.observability.service import Service
from ghubai.http11.server import connection_cap
from ghubai.web import BODY_FOLLOWS, CLIENT_GONE, serve_app, server_config

_encode = msgspec.json.Encoder().encode

log = logging.getLogger("ghubai.hub")

OPEN_PATHS = ("/health", "/ready", "/metrics", "/api/registry", "/api/summary", *dashboard.PATHS)
REGISTRY_CACHE_S = 1.0  # /api/registry is built at most this often, however many poll it
CLOSE_LINKS_S = 2.0  # after a drain, for the workers' links to close before the hub stops
_TRACE_NAMES = {name.encode() for name in protocol.TRACE_HEADERS}
_ENGINE_CALL = dialects.ENGINE_CALL_HEADER.encode()  # (a worker's engine call: ``dialects.ENGINE_LOOP``)


@dataclass(frozen=True)
class Route:
    """An inference route: the API as the worker knows it, its checks, and whether it streams when
    the body does not say (no ``stream``, or ``null``: Ollama streams then, OpenAI does not); None for
    an API that never streams, whatever the body says (a stray ``"stream": true`` on an embedding
    made the worker wait for a stream that never came)."""
    api: str
    validate: Callable[[dict[str, Any]], None]
    streams: bool | None

    def stream(self, body: dict[str, Any]) -> bool:
        """A load or an unload (``dialects.preload``) is one JSON object whatever ``stream`` says, as
        Ollama answers it (Open WebUI's unload read an NDJSON answer as a failure)."""
        if self.api in dialects.PRELOADS and dialects.preload(body, self.api == "ollama.chat"):
            return False
        said = body.get("stream")  # (validated: a boolean or null)
        return self.streams is not None and (self.streams if said is None else said is True)


INFERENCE = {
    "/v1/chat/completions": Route("openai.chat", dialects.validate_chat, False),
    "/v1/completions": Route("openai.completions", dialects.validate_completion, False),
    "/v1/responses": Route("openai.responses", dialects.validate_responses, False),
    "/v1/embeddings": Route("openai.embeddings", dialects.validate_openai_inputs, None),
    "/api/chat": Route("ollama.chat", dialects.validate_ollama_chat, True),
    "/api/generate": Route("ollama.generate", dialects.validate_ollama_generate, True),
    "/api/embed": Route("ollama.embed", dialects.validate_ollama_embed, None),
    "/api/embeddings": Route("ollama.embeddings", dialects.validate_ollama_embeddings, None),
    "/api/show": Route("ollama.show", dialects.validate_ollama_show, None),  # answered by a worker with the model
}
Send = Callable[[dict[str, Any]], Awaitable[None]]


class ModelName(PathConverter):
    """A model's name in a path, which may begin with a slash (llama.cpp server names its model by
    its file: ``/models/llama-3-8b.Q4_K_M.gguf``); werkzeug's ``path`` takes none, and merged it."""
    regex = ".+"
    part_isolating = False  # (werkzeug takes a regex without "/" for one that matches none)


class Record:
    """One client request as the hub logs and counts it. Invariant: finished once, after its answer
    ended however it ended, with the status its client got: that of the response that went out, or
    of the error that ended a stream after its first byte; ``CLIENT_CLOSED`` when nothing went out."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.started = trio.current_time()
        self.status: int | None = None
        self.model = ""
        self.key = b""
        self.exchange: Exchange | None = None
        self.first_token_s: float | None = None
        self.reason = ""  # why it failed, for the log line

    def failed(self, error: ApiError) -> None:
        """An error event ended the stream: the client got this instead of a whole answer (and
        its trace says so, not the 200 of the head; this runs in the request's span)."""
        self.status, self.reason = error.status, error.message
        tracing.annotate(**{"http.response.status_code": error.status})


def pool_figures(pool: Pool) -> list[Metric]:
    """The hub's live state, read at each scrape."""
    tokens = CounterMetricFamily("ghubai_tokens", "Tokens by model, from the engines' counts", labels=["model", "type"])
    for model, usage in pool.usage.items():
        for kind in ("prompt", "completion"):
            tokens.add_metric([model, kind], usage.get(f"{kind}_tokens", 0))
    depth = GaugeMetricFamily("ghubai_queue_depth", "Requests waiting for a worker", labels=["model"])
    queued = pool.queue_lengths()
    for model in sorted(set(pool.models()) | set(queued)):  # 0, not no series, when none waits: a graph with no gaps
        depth.add_metric([model], queued.get(model, 0))
    workers = GaugeMetricFamily("ghubai_workers", "Workers linked to this hub", value=len(pool.workers))
    busy = GaugeMetricFamily("ghubai_worker_inflight", "Requests this hub runs on each worker", labels=["worker"])
    by_name: Counter[str] = Counter()  # one series per name: two workers named alike (a host's two GPUs) add up
    for worker in pool.workers.values():
        by_name[worker.name] += worker.inflight
    for name, inflight in by_name.items():
        busy.add_metric([name], inflight)
    return [tokens, depth, workers, busy]


@dataclass(frozen=True)
class HubSecrets:
    """The hub's two secret lists, replaced in place on a reload."""
    api_keys: Secrets
    provider_tokens: Secrets

    @classmethod
    def of(cls, config: HubConfig) -> HubSecrets:
        return cls(Secrets(config.api_keys), Secrets(config.provider_tokens))

    def replace(self, config: HubConfig) -> None:
        self.api_keys.replace(config.api_keys)
        self.provider_tokens.replace(config.provider_tokens)


class ClientLeft(Exception):
    """The client closed the connection before its request was whole: nobody to answer."""


def _header(headers: list[tuple[bytes, bytes]], name: bytes) -> str | None:
    return next((value.decode("latin-1") for key, value in headers if key == name), None)


async def _read_body(receive: Any, limit: int, timeout_s: float) -> bytes:
    """The whole request body (``RequestBody``'s 413s; hypercorn spends 15-18 µs on each small piece:
    1 MB in 1-byte chunks cost 16 s), 408 when it does not come in time."""
    body = RequestBody(limit)
    with trio.move_on_after(timeout_s):
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientLeft
            body.add(message.get("body", b""))
            if not message.get("more_body", False):
                return bytes(body.data)
    raise RequestBody.too_slow()


def _adding(send: Send, headers: list[tuple[bytes, bytes]]) -> Send:
    """``send``, with ``headers`` added to the answer's head."""
    async def adding(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            message["headers"] = [*message.get("headers", ()), *headers]
        await send(message)
    return adding


async def _respond(send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]],
                   extra: dict[str, str] | None = None) -> None:
    fields = [*headers, (b"content-length", str(len(body)).encode()), (b"x-request-id", REQUEST_ID.get().encode()),
              *((name.lower().encode(), value.encode()) for name, value in (extra or {}).items())]
    await send({"type": "http.response.start", "status": status, "headers": fields, BODY_FOLLOWS: True})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def _refuse_websocket(scope: dict[str, Any], send: Send) -> None:
    """A WebSocket upgrade anywhere but ``/gridhub``: 404, as for any unknown path (quart answered 500)."""
    body = ApiError(404, f"Unknown endpoint: {scope['path']}").body_for(scope["path"])
    await send({"type": "websocket.http.response.start", "status": 404,
                "headers": [*answers.JSON_HEADERS, (b"content-length", str(len(body)).encode())]})
    await send({"type": "websocket.http.response.body", "body": body})


def _json_error(error: ApiError) -> Response:
    if isinstance(record := request.scope.get("ghubai.record"), Record):
        record.reason = error.message
    return Response(error.body_for(request.path), error.status, headers=error.headers(),
                    content_type="application/json")


class HubApi:
    """The hub's HTTP API: ``app`` is the quart-trio application hypercorn serves. Invariant: every
    request outside ``OPEN_PATHS`` (status pages, not requests) gets one ``Record``, finished once."""

    def __init__(self, config: HubConfig, pool: Pool, inflight: InFlight, hub_id: str, secrets: HubSecrets,
                 history: History) -> None:
        self.config, self.pool, self.inflight, self.hub_id = config, pool, inflight, hub_id
        self.secrets, self.history = secrets, history
        self.rate_limits = RateLimits(config.limits)
        self.origins = cors.Origins(config.cors_origins, config.listen)
        self._workers: tuple[float, int, list[dict[str, Any]]] = (-math.inf, -1, [])  # when, from what, what
        self._registry = b""  # /api/registry's body, from those
        self._dashboard: tuple[tuple[Any, ...], bytes] = ((), b"")  # /dashboard/data's body, and from what
        self.metrics = Metrics("hub", pool.awaits)  # (a model whose worker restarts is still its own label)
        self.metrics.watch(lambda: pool_figures(pool))
        self.app = app = QuartTrio("ghubai.hub")
        # a path with "//" is an unknown endpoint, as at the proxy: werkzeug would redirect it with a
        # 308 to the hub's own address (past the proxy, and the SDKs follow redirects)
        app.url_map.merge_slashes = False
        app.config.update(RESPONSE_TIMEOUT=None, MAX_CONTENT_LENGTH=config.limits.max_body_bytes,
                          BODY_TIMEOUT=config.limits.body_timeout_s)
        # (quart types ASGI's messages; this wrapper passes them on as plain dicts)
        self._inner: Callable[[dict[str, Any], Any, Send], Awaitable[None]] = app.asgi_app  # type: ignore[assignment]
        app.asgi_app = self._asgi  # type: ignore[method-assign, assignment]
        app.register_error_handler(ApiError, self._api_error)
        app.register_error_handler(HTTPException, self._http_error)
        app.before_request(self._check_head_and_key)  # for the routes quart serves
        app.after_request(self._tag_response)
        for path, route in INFERENCE.items():  # served in _asgi; here so quart answers other methods with 405
            app.add_url_rule(path, route.api, self._not_here, methods=["POST"])
        app.url_map.converters["name"] = ModelName
        app.add_url_rule("/v1/models/<name:model>", "one_model", self.one_model, methods=["GET"])
        for path, view in (("/v1/models", self.list_models),
                           ("/api/tags", self.ollama_tags), ("/api/ps", self.ollama_running),
                           ("/api/version", self.ollama_version), ("/", self.ollama_root),
                           ("/api/registry", self.registry), ("/api/summary", self.summary),
                           ("/health", self.health), ("/ready", self.ready),
                           ("/dashboard", self.dashboard_page), ("/dashboard/data", self.dashboard_data),
                           ("/metrics", self.prometheus)):
            app.add_url_rule(path, view.__name__, view, methods=["GET"])
        for path, (method, _, _) in dialects.MANAGEMENT.items():
            blob = path.endswith("/")
            app.add_url_rule(path + "<digest>" if blob else path, path, self.ollama_pull if path == "/api/pull"
                             else self.ollama_unmanaged, methods=[method, "HEAD"] if blob else [method])
        app.add_websocket(protocol.GRIDHUB_PATH, "gridhub", self.gridhub)

    # -- every request ---------------------------------------------------------------------------

    async def _asgi(self, scope: dict[str, Any], receive: Any, send: Send) -> None:
        """Around each whole request, in its outermost task: its request id and trace span begin here,
        so every task started for it logs and traces with them, and its record ends here."""
        if scope["type"] == "websocket" and scope["path"] != protocol.GRIDHUB_PATH:
            await _refuse_websocket(scope, send)
            return
        if scope["type"] != "http":
            await self._inner(scope, noting_close(scope, receive) if scope["type"] == "websocket" else receive, send)
            return
        request_id(_header(scope["headers"], b"x-request-id"))
        if page := cors.stranger(self.origins, scope["headers"]):
            await self._refuse(scope, send, ApiError(403, cors.refusal(page)), scope["path"])
            return
        if not scope["path"].startswith("/"):  # an absolute-form target (http://host/path): its path
            try:
                scope["path"] = origin_form(scope["path"]).split("?", 1)[0]
            except ApiError as error:
                await self._refuse(scope, send, error, "")
                return
        if self.origins:
            send = _adding(send, fields := self.origins.allow(scope["headers"]))
            if cors.allowed(fields) and (asked := cors.preflight(scope["method"], scope["headers"])) is not None \
                    and not both_framings(scope["headers"]):  # before any key check, not before that one
                await send({"type": "http.response.start", "status": 204, "headers": asked})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                return
        if both_framings(scope["headers"]):  # and close: h11 would keep the connection
            await self._refuse(scope, send, ApiError(400, BOTH_FRAMINGS), scope["path"])
            return
        if any(name == _ENGINE_CALL for name, _ in scope["headers"]):
            await self._refuse(scope, send, dialects.ENGINE_LOOP, scope["path"])
            return
        if scope["path"] in OPEN_PATHS:
            await self._inner(scope, receive, send)
            return
        record = Record(f"{scope['method']} {scope['path']}")

        async def tracked(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                record.status = message["status"]
                tracing.annotate(**{"http.response.status_code": message["status"]})
            await send(message)

        try:
            route = INFERENCE.get(scope["path"]) if scope["method"] == "POST" else None
            if route is None:
                scope["ghubai.record"] = record
                await self._inner(scope, receive, tracked)
                return
            with tracing.span(f"POST {scope['path']}", tracing.carrier(scope["headers"]),
                              **{"ghubai.request_id": REQUEST_ID.get()}):
                await self._inference(route, scope, receive, tracked, record)
        finally:
            self._finish(record, scope)

    async def _refuse(self, scope: dict[str, Any], send: Send, error: ApiError, path: str) -> None:
        """Answer a request refused before it is read (its target, its framing) in the dialect of
        ``path``, close its connection, and log and count it as any other."""
        record = Record(f"{scope['method']} {scope['path']}")
        record.status, record.reason = error.status, error.message
        await _respond(send, error.status, error.body_for(path), [*answers.JSON_HEADERS, (b"connection", b"close")])
        self._finish(record)

    def _finish(self, record: Record, scope: dict[str, Any] | None = None) -> None:
        status, took = record.status or CLIENT_CLOSED, trio.current_time() - record.started
        if status == 401 and scope and scope.get("client"):  # whence a key is guessed, or a leaked one used
            forwarded = _header(scope["headers"], b"x-forwarded-for")  # (a proxy's, or what the client claims)
            record.reason = f"{record.reason or 'unauthorized'} (from {whence(scope['client'][0], forwarded)})"
        if exchange := record.exchange:
            exchange.close()
            self.inflight.discard(exchange)
            spent = exchange.spent()
            self.rate_limits.spend(record.key, spent)
            if exchange.usage is None and spent and exchange.served_by is not None:  # cut short (a user's stop):
                self.pool.count_usage(exchange.served_by, exchange.model, spent)  # its estimate, as its key is charged
            self.metrics.inflight.dec()
            first = record.first_token_s
            self.history.request(first, (spent or {}).get("completion_tokens", 0),
                                 took - (first or 0.0) if exchange.stream else took)  # when the tokens were made
        self.metrics.observe(record.model, status, took, served=bool(record.exchange and record.exchange.served_by))
        log.info("%s %d in %.3f s, model %s%s", record.what, status, took, record.model or "-",
                 f": {record.reason}" if record.reason else "")

    async def _api_error(self, error: ApiError) -> Response:
        return _json_error(error)

    async def _http_error(self, error: HTTPException) -> Response:
        status = error.code or 500
        asked = request if has_request_context() else websocket  # (a WebSocket's error too: /gridhub's)
        message = {404: dialects.unknown_endpoint(asked.method, asked.path),
                   405: f"Method {asked.method} not allowed on {asked.path}",
                   413: body_too_large(self.config.limits.max_body_bytes).message}.get(
            status, error.description or "error")
        allowed = getattr(error, "valid_methods", None)  # a 405 says which it takes (RFC 9110 §15.5.6)
        return _json_error(ApiError(status, message, extra_headers={"Allow": ", ".join(allowed)} if allowed else None))

    async def _check_head_and_key(self) -> None:
        self._check_head([(name.encode("latin-1"), value.encode("latin-1")) for name, value in request.headers.items()])
        if request.path in OPEN_PATHS:
            return
        key = self.secrets.api_keys.identify(request.headers.get("Authorization"))
        if key is None:
            raise invalid_api_key()
        request.scope["ghubai.record"].key = key  # type: ignore[typeddict-item]  # (the wrapper's own key)

    async def _tag_response(self, response: Response) -> Response:
        if request.path not in OPEN_PATHS:
            response.headers[REQUEST_ID_HEADER] = REQUEST_ID.get()
        return response

    # -- inference -------------------------------------------------------------------------------

    async def _not_here(self) -> Response:
        """Inference routes are served in ``_asgi``; only a path werkzeug reads as one comes here
        (it strips leading slashes: ``//v1/chat/completions``)."""
        raise NotFound()

    async def _inference(self, route: Route, scope: dict[str, Any], receive: Any, send: Send, record: Record) -> None:
        """Check, read and validate the request, then run it in a cancel scope that hypercorn's
        stream cancels when the client leaves (``web.CLIENT_GONE``). Any refusal is answered in the
        dialect of the path."""
        gone = trio.CancelScope()  # (cancelled before it is entered, it is cancelled when entered)
        scope[CLIENT_GONE] = gone.cancel
        try:
            headers = scope["headers"]
            self._check_head(headers)
            authorization = _header(headers, b"authorization")
            key = self.secrets.api_keys.identify(authorization)
            if key is None:
                raise invalid_api_key()
            if self.secrets.api_keys.open:  # budgets per the key a client presents (a proxy may check them)
                key = Secrets.presented(authorization)
            record.key = key
            raw = await _read_body(receive, self.config.limits.max_body_bytes, self.config.limits.body_timeout_s)
            body, size = dialects.parse_body(raw), len(raw)
            del raw  # (the parsed body is kept for retries: not both, through a whole queued wait)
            if isinstance(model := body.get("model"), str):  # (a 400's too: as the proxy counts it)
                record.model = self.pool.named(model)
            route.validate(body)
            if body["model"] is not model:  # (a validator that read it from elsewhere: Ollama's "name")
                record.model = self.pool.named(body["model"])
            body["model"] = record.model
            self.rate_limits.admit(key)
            stream = route.stream(body)
            if route.streams is not None:
                body["stream"] = stream  # said, so that no engine reads a null or a default another way
            with gone:
                await self._forward(route.api, body, stream, size, headers, send, record)
            if gone.cancelled_caught and record.status is not None and not record.reason:
                record.reason = LEFT_MID_ANSWER
        except ClientLeft:
            return
        except trio.Cancelled:
            if record.status is None and not gone.cancel_called:  # the hub's stop, not its client (web: a 503)
                record.status, record.reason = 503, "the hub stopped before it answered"
            raise
        except ApiError as error:
            if record.status is None:  # else the stream ended with its own error event
                record.reason = error.message
                # (draining, the process goes soon: a kept-alive connection's next request would meet its exit)
                await _respond(send, error.status, error.body_for(scope["path"]), answers.JSON_HEADERS,
                               error.headers() | (CLOSE if self.pool.draining else {}))
        except Exception:
            log.exception("the hub failed to serve a request")
            if record.status is None:
                internal = ApiError(500, "internal error in the hub")
                await _respond(send, 500, internal.body_for(scope["path"]), answers.JSON_HEADERS)

    def _check_head(self, headers: list[tuple[bytes, bytes]]) -> None:
        limits = self.config.limits
        if len(headers) > limits.max_headers or \
                sum(len(name) + len(value) + 4 for name, value in headers) > limits.max_header_bytes:
            raise ApiError(431, "Request headers too many or too large")

    async def _forward(self, api: str, body: dict[str, Any], stream: bool, size: int,
                       headers: list[tuple[bytes, bytes]], send: Send, record: Record) -> None:
        trace = {name.decode(): value.decode("latin-1") for name, value in headers if name in _TRACE_NAMES}
        # this hub's span when it traces; then only what a request frame may carry (never the client's odd ones)
        trace = protocol.clean_trace(tracing.inject({**trace, "x-request-id": REQUEST_ID.get()}))
        tracing.annotate(**{"gen_ai.request.model": record.model})
        if dialects.unloads(api, body) and (holders := self.pool.holding(record.model, api)):
            await self._unload(api, body, trace, holders, send, record)
            return
        conversation = affinity.keys_of(body, headers, api) if self.config.scheduler.policy == "llm-aware" else None
        exchange = record.exchange = Exchange(self.pool, self.config, api, body, stream, trace, size, conversation,
                                              elsewhere=_header(headers, dialects.ELSEWHERE_HEADER) == "1")
        self.inflight.add(exchange)
        self.metrics.inflight.inc()
        try:
            first = await exchange.open()
        except ApiError as error:
            if error.status == 503 or error.code == "queue_full":  # the grid could not take it
                self.rate_limits.refund(record.key)
            raise
        worker = exchange.served_by.name if exchange.served_by else ""  # (an answer came: it was sent to one)
        served_by = [(b"x-ghubai-hub", self.hub_id.encode()), (b"x-ghubai-worker", worker.encode())]
        if not stream:  # no time to a first token: its first byte is the whole answer's, once it is whole
            whole = await answers.whole(exchange, first)
            await _respond(send, 200, whole, [*answers.JSON_HEADERS, *served_by])
            return
        self._first_byte(record)
        dialect = answers.dialect_of(api)
        await send({"type": "http.response.start", "status": 200, BODY_FOLLOWS: True,
                    "headers": [*dialect.headers, (b"x-request-id", REQUEST_ID.get().encode()), *served_by]})

        async def send_body(data: bytes, more: bool) -> None:
            await send({"type": "http.response.body", "body": data, "more_body": more})

        await answers.stream(send_body, exchange, first, dialect, record.failed)

    async def _unload(self, api: str, body: dict[str, Any], trace: dict[str, str], holders: list[RemoteWorker],
                      send: Send, record: Record) -> None:
        """An unload (``keep_alive`` 0, nothing to generate) goes to every worker whose engine holds
        the model, each engine unloading its own copy (it went to one worker, which might not even
        hold it: the client heard "unload", and the model stayed in memory); answered as Ollama
        answers it once all have, or with the first refusal if none took it. A holder that refused
        (a worker of an older release, busy or draining, takes no unload) is logged with its words."""
        exchanges = [Exchange(self.pool, self.config, api, body, False, trace, only=holder) for holder in holders]
        record.exchange = exchanges[0]  # (the request's own, for its end: ``_finish``)
        self.inflight.add(exchanges[0])
        self.metrics.inflight.inc()
        answered: list[bytes] = []
        unloaded: list[str] = []  # the holders that did
        refusals: list[ApiError] = []

        async def unload(exchange: Exchange, holder: RemoteWorker) -> None:
            if exchange is not record.exchange:
                self.inflight.add(exchange)
            try:
                answered.append(await answers.whole(exchange, await exchange.open()))
                unloaded.append(holder.name)  # (what its engine holds now, its worker's next report says)
            except ApiError as error:
                log.warning("worker %s did not unload %s: %s", holder.name, exchange.model, error.message)
                refusals.append(error)
            finally:
                if exchange is not record.exchange:
                    exchange.close()
                    self.inflight.discard(exchange)

        try:
            async with trio.open_nursery() as nursery:
                for exchange, holder in zip(exchanges, holders):
                    nursery.start_soon(unload, exchange, holder)
        except BaseExceptionGroup as group:  # the hub stops: one Cancelled, as ``_inference`` knows it
            if (cancelled := group.subgroup(trio.Cancelled)) is not None and cancelled is group:
                raise group.exceptions[0] from None
            raise
        if not answered:
            if refusals[0].status == 503 or refusals[0].code == "queue_full":  # the grid could not take it
                self.rate_limits.refund(record.key)
            raise refusals[0]
        names = ", ".join(sorted(unloaded))
        await _respond(send, 200, answered[0], [*answers.JSON_HEADERS, (b"x-ghubai-hub", self.hub_id.encode()),
                                                (b"x-ghubai-worker", names.encode())])

    def _first_byte(self, record: Record) -> None:
        """A stream's first byte goes out: its time to first token, for the metric and the dashboard (a
        whole answer has none: the time it took is its duration, and would swamp a median of streams)."""
        record.first_token_s = trio.current_time() - record.started
        self.metrics.first_token.observe(record.first_token_s)

    async def gridhub(self) -> Response | None:
        return await serve_worker(self.pool, self.secrets.provider_tokens, self.hub_id, self.config.heartbeat_s,
                                  self.config.timeouts.connect_s, self.config.limits.max_worker_concurrency)

    # -- what the hub answers itself -------------------------------------------------------------

    async def one_model(self, model: str) -> dict[str, Any]:
        """A model's entry under the name the grid serves it as (``sim`` for ``SIM:latest``), as the
        ``model`` of its answers says."""
        if not self.pool.awaits(model):
            raise model_not_found(model)
        return dialects.model_entry(self.pool.named(model))

    async def list_models(self) -> dict[str, Any]:
        return dialects.model_list(self.pool.models())

    async def ollama_tags(self) -> dict[str, Any]:
        return dialects.ollama_tags(self.pool.models(), facts=self.pool.facts())

    async def ollama_running(self) -> dict[str, Any]:
        return dialects.ollama_tags(self.pool.loaded(), running=True, facts=self.pool.facts())

    async def ollama_version(self) -> tuple[dict[str, Any], int, dict[str, str]]:
        return {"version": dialects.OLLAMA_API_VERSION}, 200, {"X-GhubAi-Version": __version__}

    async def ollama_pull(self) -> Response:
        """A pull of a model the grid serves succeeds at once, as Ollama's of a model it holds (apps
        that pull at start, ``ollama run``); of any other, the grid's 501 (``dialects.unmanaged``)."""
        raw = await request.get_data(as_text=False)
        body = dialects.parse_body(raw.encode() if isinstance(raw, str) else raw)  # (bytes: quart's types say either)
        dialects.validate_ollama_show(body)  # (named as a show names it)
        if not self.pool.awaits(body["model"]):  # (a model whose worker restarts is still here)
            raise dialects.cannot_manage("/api/pull")
        if body.get("stream") is False:
            return Response(_encode({"status": "success"}), 200, content_type="application/json")
        return Response(_encode({"status": "success"}) + b"\n", 200, headers=dialects.NDJSON_HEADERS)

    async def ollama_unmanaged(self, digest: str = "") -> Response:
        refusal = dialects.unmanaged(request.method, request.path)
        assert refusal is not None  # (its routes are those of MANAGEMENT)
        raise refusal

    async def ollama_root(self) -> Response:
        return Response("Ollama is running", 200, content_type="text/plain; charset=utf-8")

    def _described(self) -> list[dict[str, Any]]:
        """Every worker in detail, for ``/api/registry`` and the dashboard: with a thousand workers,
        a few hundred kilobytes that take milliseconds to build, so built again only when a worker
        joins, leaves or changes what it offers, or its figures are ``REGISTRY_CACHE_S`` old,
        however many poll them (a proxy's health check asks ``/api/summary`` instead)."""
        now, pool = trio.current_time(), self.pool
        if now - self._workers[0] >= REGISTRY_CACHE_S or self._workers[1] != pool.version:
            self._workers = (now, pool.version, [worker.describe() for worker in pool.workers.values()])
            self._registry = b""
        return self._workers[2]

    async def registry(self) -> Response:
        workers, pool = self._described(), self.pool
        if not self._registry:
            self._registry = _encode({
                "hub_id": self.hub_id, "workers": workers, "queued": pool.queued, "queue": pool.queue_lengths(),
                "draining": pool.draining, "heartbeat_s": self.config.heartbeat_s,
                "usage": {model: dict(count) for model, count in pool.usage.items()}})
        return Response(self._registry, 200, content_type="application/json")

    async def summary(self) -> dict[str, Any]:
        """What a proxy's health check needs, in a size and time that do not grow with the workers:
        whether the hub takes requests, its models (kept between changes) and those in memory, its queue."""
        pool = self.pool
        return {"hub_id": self.hub_id, "draining": pool.draining, "heartbeat_s": self.config.heartbeat_s,
                "models": pool.models(), "loaded": pool.loaded(), "workers": len(pool.workers),
                "capacity": pool.capacity(),
                "queued": pool.queued, "queue": pool.queue_lengths()}

    async def health(self) -> dict[str, Any]:
        return {"status": "ok", "version": __version__}

    async def ready(self) -> tuple[dict[str, Any], int]:
        """Ready while a worker that takes requests offers a model (one whose engine is down lists none)."""
        count = sum(1 for worker in self.pool.workers.values() if not worker.draining)
        status = "draining" if self.pool.draining else "ready" if self.pool.models() else \
            "no worker offers a model" if count else "no workers"
        return {"status": status, "workers": count}, 200 if status == "ready" else 503

    async def dashboard_page(self) -> Response:
        return Response(dashboard.PAGE, 200, content_type=dashboard.PAGE_TYPE)

    async def dashboard_data(self) -> Response:
        """Built at most once a second (the page polls that often; it is open, and with a thousand
        workers a build is milliseconds), and again when the workers change."""
        key = (self.pool.version, int(trio.current_time()), request.host_url)
        if self._dashboard[0] != key:
            workers, queue = self._described(), self.pool.queue_lengths()
            me = dashboard.hub_view(f"hub {self.hub_id}", request.host_url.rstrip("/"), not self.pool.draining,
                                    "draining", queue, workers, self.config.heartbeat_s)
            self._dashboard = (key, _encode(dashboard.data("hub", f"hub {self.hub_id}", [me], queue, self.history)))
        return Response(self._dashboard[1], 200, content_type="application/json")

    async def prometheus(self) -> Response:
        return Response(self.metrics.render(), 200, content_type=CONTENT_TYPE)


def _warn_if_open(config: HubConfig) -> None:
    if not config.provider_tokens:
        log.warning("provider_tokens is empty: ANY worker that reaches this port can join the grid")


async def run(config: HubConfig, *, path: str | None = None, drain: trio.Event | None = None,
              service: Service | None = None, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve the hub until cancelled, or until ``drain`` is set and the drain is over. Reports the
    base URL. While it drains the port stays open: ``/ready`` and new requests answer 503, so
    proxies move on at once. A reload (SIGHUP) re-reads ``path`` for new api_keys and provider_tokens,
    and the TLS files it started with (a renewed certificate)."""
    hub_id = uuid.uuid4().hex[:12]
    pool = Pool(config.limits, config.scheduler)
    inflight = InFlight()
    _warn_if_open(config)
    secrets = HubSecrets.of(config)
    history = History()
    app = HubApi(config, pool, inflight, hub_id, secrets, history).app
    service = service or Service({})
    service.summary = lambda: (f"{len(pool.workers)} workers, {len(inflight.exchanges)} inflight, "
                               f"{pool.queued} queued{', draining' if pool.draining else ''}")

    served = server_config(
        config.listen, tls_cert=config.tls_cert, tls_key=config.tls_key, write_timeout_s=config.timeouts.idle_s,
        max_connections=connection_cap(config.limits.max_connections, 1, "limits.max_connections"), who="hub",
        idle_timeout_s=config.limits.idle_timeout_s)

    def reload(fresh: HubConfig) -> str:
        renewed = served.renew_certificate()  # (first: a pair that fails keeps the running keys too)
        if not secrets.api_keys.open and not fresh.api_keys:
            log.warning("api_keys is empty now: clients need no key")
        secrets.replace(fresh)
        _warn_if_open(fresh)
        for worker in list(pool.workers.values()):
            if not secrets.provider_tokens.holds(worker.token):
                log.warning("worker %s joined with a provider token that is not listed now: ending its link",
                            worker.name)
                pool.cut(worker, f"lost the link to worker {worker.name}")  # (why is the operator's, not a client's)
        return f"{len(fresh.api_keys)} api_keys, {len(fresh.provider_tokens)} provider_tokens" + \
            (f"; {renewed}" if renewed else "")

    service.reloads_config("hub", path, reload, lambda: [key for key in ("api_keys", "provider_tokens")
                                                         if not getattr(secrets, key).open],
                           live=("api_keys", "provider_tokens"))
    # once drained, the hub stops listening and gives what it had accepted hypercorn's graceful_timeout
    # to get its 503 (cancelled at once, those requests got no answer, or one without a word)
    stopped = trio.Event()
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(partial(serve_app, app, served, until=stopped))
        log.info("hub %s serving on %s (workers connect to %s)", hub_id, " and ".join(binds), protocol.GRIDHUB_PATH)
        service.ready()
        task_status.started(binds[0])
        if drain is not None:
            await drain.wait()
            await inflight.drain(pool, config.drain_timeout_s)
            await pool.close_links(CLOSE_LINKS_S)
            stopped.set()
