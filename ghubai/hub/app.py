"""The hub's HTTP API (quart-trio on hypercorn): OpenAI endpoints, status endpoints, ``/gridhub``.

A request's work belongs to its quart-trio task: when the client leaves, that task is cancelled.
The exchange is also registered with ``RequestScope``, an ASGI wrapper around the whole request, so
its worker hears ``cancel`` even if the client leaves in the gap between the handler returning a
streaming response and the first iteration of its body (where no ``finally`` of ours would run).
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import trio
from quart import Response, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from ghubai import __version__, openai, protocol
from ghubai.auth import Secrets
from ghubai.config import HubConfig
from ghubai.hub.exchange import Exchange, Frame, InFlight, client_error
from ghubai.hub.gridhub import serve_worker
from ghubai.hub.limits import RateLimits
from ghubai.hub.pool import Pool
from ghubai.observability import dashboard, tracing
from ghubai.observability.history import History
from ghubai.observability.logs import REQUEST_ID, REQUEST_ID_HEADER, request_id
from ghubai.observability.metrics import CONTENT_TYPE, CounterMetricFamily, GaugeMetricFamily, Metric, Metrics
from ghubai.observability.service import Service
from ghubai.openai import ApiError, model_not_found
from ghubai.web import serve_app, server_config

log = logging.getLogger("ghubai.hub")

OPEN_PATHS = ("/health", "/ready", "/metrics", "/api/registry", *dashboard.PATHS)


class RequestScope:
    """ASGI wrapper around each whole request: runs the closers the request registered once it is
    over, however it ends. Its request id and trace span begin here, in the outermost task of the
    request, so that every task quart-trio starts for it, and the closers, log and trace with them."""

    def __init__(self, app: Callable[..., Any]) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        closers: list[Callable[[], None]] = []
        scope["ghubai.closers"] = closers
        if scope["type"] != "http":
            await self._run(scope, receive, send, closers)
            return
        request_id(next((value for key, value in scope["headers"] if key == b"x-request-id"), None))
        if scope["method"] != "POST":  # only inference is traced, not the proxies' health checks
            await self._run(scope, receive, send, closers)
            return
        with tracing.span(f"POST {scope['path']}", tracing.carrier(scope["headers"]),
                          **{"ghubai.request_id": REQUEST_ID.get()}):
            async def traced_send(message: dict[str, Any]) -> None:
                if message["type"] == "http.response.start":
                    tracing.annotate(**{"http.response.status_code": message["status"]})
                await send(message)

            await self._run(scope, receive, traced_send, closers)

    async def _run(self, scope: dict[str, Any], receive: Any, send: Any, closers: list[Callable[[], None]]) -> None:
        try:
            await self.app(scope, receive, send)
        finally:
            for close in closers:
                close()


def _error_response(error: ApiError) -> Response:
    body = error.openai_body() if request.path.startswith("/v1/") else error.ollama_body()
    return Response(json.dumps(body), error.status, headers=error.headers(), content_type="application/json")


@dataclass(frozen=True)
class Dialect:
    """How a stream ends and fails for the client: SSE with [DONE] on /v1, NDJSON on /api."""
    headers: dict[str, str]
    done: bytes

    def error(self, error: ApiError) -> bytes:
        if self is OPENAI:
            return openai.sse_event(json.dumps(error.openai_body()))
        return json.dumps(error.ollama_body()).encode() + b"\n"


OPENAI = Dialect(openai.SSE_HEADERS, openai.SSE_DONE)
OLLAMA = Dialect(openai.NDJSON_HEADERS, b"")


def _render(frames: list[Frame], dialect: Dialect) -> bytes:
    out = []
    for frame in frames:
        if frame["type"] == "chunk":
            out.append(frame["data"])
        elif frame["type"] == "end":
            out.append(dialect.done)
        else:
            out.append(dialect.error(client_error(frame)))
    return b"".join(out)


async def _stream_body(exchange: Exchange, first: Frame, dialect: Dialect) -> AsyncIterator[bytes]:
    """The stream, paced by the client: hypercorn returns from a yield once the socket took the
    bytes, and only then does the worker get credit to send more."""
    try:
        yield _render([first], dialect)
        exchange.passed_on(len(first.get("data", b"")))
        async for batch in exchange.batches():
            yield _render(batch, dialect)
            exchange.passed_on(sum(len(frame["data"]) for frame in batch if frame["type"] == "chunk"))
    except ApiError as error:  # a timeout after the first byte: one final error event
        yield dialect.error(error)
    finally:
        exchange.close()


async def _whole(exchange: Exchange, first: Frame) -> bytes:
    frames = [first]
    if not exchange.done:
        async for batch in exchange.batches():
            frames.extend(batch)
    parts: list[bytes] = []
    for frame in frames:
        if frame["type"] == "error":
            raise client_error(frame)
        if frame["type"] == "chunk":
            parts.append(frame["data"])
    return b"".join(parts)


def pool_figures(pool: Pool) -> list[Metric]:
    """The hub's live state, read at each scrape."""
    tokens = CounterMetricFamily("ghubai_tokens", "Tokens by model, from the engines' counts", labels=["model", "type"])
    for model, usage in pool.usage.items():
        for kind in ("prompt", "completion"):
            tokens.add_metric([model, kind], usage.get(f"{kind}_tokens", 0))
    depth = GaugeMetricFamily("ghubai_queue_depth", "Requests waiting for a worker", labels=["model"])
    for model, queue in pool.queue_lengths().items():
        depth.add_metric([model], queue)
    workers = GaugeMetricFamily("ghubai_workers", "Workers linked to this hub", value=len(pool.workers))
    busy = GaugeMetricFamily("ghubai_worker_inflight", "Requests this hub runs on each worker", labels=["worker"])
    for worker in pool.workers.values():
        busy.add_metric([worker.name], worker.inflight)
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


def create_app(config: HubConfig, pool: Pool, inflight: InFlight, hub_id: str, secrets: HubSecrets,
               history: History) -> QuartTrio:
    app = QuartTrio("ghubai.hub")
    app.config.update(RESPONSE_TIMEOUT=None, MAX_CONTENT_LENGTH=config.limits.max_body_bytes, BODY_TIMEOUT=60)
    app.asgi_app = RequestScope(app.asgi_app)  # type: ignore[method-assign]
    api_keys = secrets.api_keys
    rate_limits = RateLimits(config.limits)
    metrics = Metrics("hub")
    metrics.watch(lambda: pool_figures(pool))
    provider_tokens = secrets.provider_tokens

    @app.errorhandler(ApiError)
    async def api_error(error: ApiError) -> Response:
        return _error_response(error)

    @app.errorhandler(HTTPException)
    async def http_error(error: HTTPException) -> Response:
        status = error.code or 500
        message = {404: f"Unknown endpoint: {request.method} {request.path}",
                   405: f"Method {request.method} not allowed on {request.path}",
                   413: f"Request body is larger than {config.limits.max_body_bytes} bytes"}.get(
            status, error.description or "error")
        return _error_response(ApiError(status, message))

    @app.before_request
    async def check_head_and_key() -> None:
        lines = list(request.headers.items())
        if len(lines) > config.limits.max_headers or \
                sum(len(name) + len(value) + 4 for name, value in lines) > config.limits.max_header_bytes:
            raise ApiError(431, "Request headers too many or too large")
        if request.path in OPEN_PATHS:
            return
        key = api_keys.identify(request.headers.get("Authorization"))
        if key is None:
            raise ApiError(401, "Missing or invalid API key", code="invalid_api_key")
        request.scope["ghubai.key"] = key

    @app.after_request
    async def tag_response(response: Response) -> Response:
        if request.path not in OPEN_PATHS:
            response.headers[REQUEST_ID_HEADER] = REQUEST_ID.get()
        return response

    async def forward(api: str, body: dict[str, Any], stream: bool) -> Response:
        key = request.scope["ghubai.key"]
        rate_limits.admit(key)
        trace = {name: request.headers.get(name, "") for name in protocol.TRACE_HEADERS}
        # this hub's span when it traces; then only what a request frame may carry (never the client's odd ones)
        trace = protocol.clean_trace(tracing.inject({**trace, "x-request-id": REQUEST_ID.get()}))
        tracing.annotate(**{"gen_ai.request.model": str(body["model"])})
        exchange = Exchange(pool, config, api, body, stream, trace)
        inflight.add(exchange)
        started, outcome = trio.current_time(), {"status": 200}
        first_token_s: float | None = None
        what = f"{request.method} {request.path}"  # finished() runs after the request context is gone
        metrics.inflight.labels("hub").inc()

        def finished() -> None:
            exchange.close()
            inflight.discard(exchange)
            rate_limits.spend(key, exchange.usage)
            metrics.inflight.labels("hub").dec()
            took = trio.current_time() - started
            metrics.observe(exchange.model, outcome["status"], took)
            history.request(first_token_s, (exchange.usage or {}).get("completion_tokens", 0),
                            took - (first_token_s or 0.0) if stream else took)  # when the tokens were made
            log.info("%s %d in %.3f s, model %s", what, outcome["status"], took, exchange.model)

        request.scope["ghubai.closers"].append(finished)
        try:
            first = await exchange.open()
        except ApiError as error:
            outcome["status"] = error.status
            if error.status == 503:
                rate_limits.refund(key)
            raise
        first_token_s = trio.current_time() - started
        metrics.first_token.labels("hub").observe(first_token_s)
        if stream:
            dialect = OPENAI if api.startswith("openai.") else OLLAMA
            return Response(_stream_body(exchange, first, dialect), 200, headers=dialect.headers)
        return Response(await _whole(exchange, first), 200, content_type="application/json")

    def route(path: str, api: str, validate: Callable[[dict[str, Any]], None], streams_by_default: bool) -> None:
        async def endpoint() -> Response:
            body = openai.parse_body(await request.get_data())
            validate(body)
            return await forward(api, body, body.get("stream", streams_by_default) is True)

        app.add_url_rule(path, api, endpoint, methods=["POST"])

    route("/v1/chat/completions", "openai.chat", openai.validate_chat, False)
    route("/v1/completions", "openai.completions", openai.validate_completion, False)
    route("/v1/embeddings", "openai.embeddings", openai.validate_inputs, False)
    route("/api/chat", "ollama.chat", openai.validate_ollama_chat, True)
    route("/api/generate", "ollama.generate", openai.validate_ollama_generate, True)
    route("/api/embed", "ollama.embed", openai.validate_inputs, False)
    route("/api/embeddings", "ollama.embeddings", openai.validate_ollama_embeddings, False)
    route("/api/show", "ollama.show", openai.validate_ollama_show, False)  # answered by a worker with the model

    @app.get("/v1/models/<path:model>")
    async def one_model(model: str) -> dict[str, Any]:
        if not pool.hosts(model):
            raise model_not_found(model)
        return {"id": model, "object": "model", "created": 0, "owned_by": "ghubai"}

    @app.get("/api/tags")
    async def ollama_tags() -> dict[str, Any]:
        return openai.ollama_tags(pool.models())

    @app.get("/api/ps")
    async def ollama_running() -> dict[str, Any]:
        return openai.ollama_tags(pool.models(), running=True)

    @app.get("/api/version")
    async def ollama_version() -> dict[str, Any]:
        return {"version": __version__}

    @app.get("/")
    async def ollama_root() -> Response:
        return Response("Ollama is running", 200, content_type="text/plain; charset=utf-8")

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return openai.model_list(pool.models())

    @app.get("/api/registry")
    async def registry() -> dict[str, Any]:
        return {"hub_id": hub_id, "workers": [w.describe() for w in pool.workers.values()], "queued": pool.queued,
                "queue": pool.queue_lengths(), "draining": pool.draining, "heartbeat_s": config.heartbeat_s,
                "usage": {model: dict(count) for model, count in pool.usage.items()}}

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok"}

    @app.get("/dashboard")
    async def dashboard_page() -> Response:
        return Response(dashboard.PAGE, 200, content_type=dashboard.PAGE_TYPE)

    @app.get("/dashboard/data")
    async def dashboard_data() -> dict[str, Any]:
        workers, queue = [worker.describe() for worker in pool.workers.values()], pool.queue_lengths()
        me = dashboard.hub_view(f"hub {hub_id}", request.host_url.rstrip("/"), not pool.draining, "draining",
                                queue, workers, config.heartbeat_s)
        return dashboard.data("hub", f"hub {hub_id}", [me], queue, history)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), 200, content_type=CONTENT_TYPE)

    @app.get("/ready")
    async def ready() -> tuple[dict[str, Any], int]:
        count = sum(1 for worker in pool.workers.values() if not worker.draining)
        status = "draining" if pool.draining else "ready" if count else "no workers"
        return {"status": status, "workers": count}, 200 if status == "ready" else 503

    @app.websocket(protocol.GRIDHUB_PATH)
    async def gridhub() -> Response | None:
        return await serve_worker(pool, provider_tokens, hub_id, config.heartbeat_s, config.timeouts.connect_s)

    return app


def _warn_if_open(config: HubConfig) -> None:
    if not config.provider_tokens:
        log.warning("provider_tokens is empty: ANY worker that reaches this port can join the grid")


async def run(config: HubConfig, *, path: str | None = None, drain: trio.Event | None = None,
              service: Service | None = None, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve the hub until cancelled, or until ``drain`` is set and the drain is over. Reports the
    base URL. While it drains the port stays open: ``/ready`` and new requests answer 503, so
    proxies move on at once. A reload (SIGHUP) re-reads ``path`` for new api_keys and provider_tokens."""
    hub_id = uuid.uuid4().hex[:12]
    pool = Pool(config.limits)
    inflight = InFlight()
    _warn_if_open(config)
    secrets = HubSecrets.of(config)
    history = History()
    app = create_app(config, pool, inflight, hub_id, secrets, history)
    service = service or Service({})
    service.summary = lambda: (f"{len(pool.workers)} workers, {len(inflight.exchanges)} inflight, "
                               f"{pool.queued} queued{', draining' if pool.draining else ''}")

    def reload(fresh: HubConfig) -> str:
        secrets.replace(fresh)
        _warn_if_open(fresh)
        for worker in list(pool.workers.values()):
            if not secrets.provider_tokens.holds(worker.token):
                log.warning("worker %s joined with a provider token that was revoked: ending its link", worker.name)
                worker.link_scope.cancel()
        return f"{len(fresh.api_keys)} api_keys, {len(fresh.provider_tokens)} provider_tokens"

    service.reloads_config("hub", path, reload)
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(serve_app, app, server_config(
            config.listen, tls_cert=config.tls_cert, tls_key=config.tls_key, write_timeout_s=config.timeouts.idle_s))
        log.info("hub %s serving on %s (workers connect to %s)", hub_id, binds[0], protocol.GRIDHUB_PATH)
        service.ready()
        task_status.started(binds[0])
        if drain is not None:
            await drain.wait()
            await inflight.drain(pool, config.drain_timeout_s)
            nursery.cancel_scope.cancel()
