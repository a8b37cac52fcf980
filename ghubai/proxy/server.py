"""The proxy daemon: the grid's front door, on h11 and trio sockets.

It forwards ``/v1/*`` and ``/api/*`` (and Ollama's ``GET /``) to a healthy hub that hosts the
requested model: a conversation to the hub its key ranks first while that hub is not much busier
than the others (``HubSet.pick``), other requests round robin. It answers ``/health``, ``/ready``,
``/metrics``, ``/dashboard`` (and its data), ``/v1/models`` (and ``/v1/models/{model}`` of a model a
hub lists), ``/api/tags`` and ``/api/ps`` itself from what its health checks learnt: every hub's
models, not one hub's (with what the hubs' own lists tell of them, asked then). A lookup of a model
no list has goes to the hubs, as a request for it would:
one may be waiting for the model's worker to come back (a restart).
"""

from __future__ import annotations

import hashlib
import json
import logging
import ssl
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import httpx
import trio

from ghubai import cors, dialects, protocol
from ghubai.auth import Secrets
from ghubai.config import ProxyConfig, redacted, renew_certificate, split_hostport
from ghubai.errors import ApiError, invalid_api_key
from ghubai.http11.client import TRANSPORT_ERRORS, TooLarge, tls_client_context
from ghubai.http11.server import Connection, Idlers, Request, connection_cap, serve_connection, turn_away
from ghubai.observability import dashboard, tracing
from ghubai.observability.history import History
from ghubai.observability.logs import REQUEST_ID, REQUEST_ID_HEADER, request_id
from ghubai.observability.metrics import CONTENT_TYPE, Metrics
from ghubai.observability.service import Service
from ghubai.proxy.follow import (CHECKS_AT_ONCE, DETAILS_WANTED_S, FIRST_CHECKS_S, SUMMARY_LIMIT, check_health,
                                 follow_registry)
from ghubai.proxy.forward import STOP_WRITE_S, STOPPING, Forwarder, Outcome, forwarded_for, model_named
from ghubai.proxy.hubs import Hub, HubSet
from ghubai.sockets import open_listeners

log = logging.getLogger("ghubai.proxy")

FORWARDED_PREFIXES = ("/v1/", "/api/")
STOP_GRACE_S = 1.0  # once drained and no longer listening, for the connections accepted to get their 503s
OPEN_PATHS = ("/health", "/ready", "/metrics", "/dashboard", "/dashboard/data")  # the rest needs a key


def _as_get(method: str) -> str:
    """HEAD asks for what GET would answer, without its body (monitors probe with it)."""
    return "GET" if method == "HEAD" else method


TOLD_FOR_S = 1.0  # what the hubs told of their models is kept this long (``Proxy._told``)
TOLD_KEYS = 1000  # and for at most this many keys at once
_ENGINE_CALL = dialects.ENGINE_CALL_HEADER.encode()
_PROXY_HOP = dialects.PROXY_HOP_HEADER.encode()
FRESH_DETAILS_S = 2.0  # the longest a first look at the dashboard data waits for the workers read anew


@dataclass(frozen=True)
class Told:
    """What the healthy hubs' own model lists said (``Proxy._told``): each model's facts, the names
    listed by the hubs that answered, and those hubs."""
    facts: dict[str, protocol.ModelFacts]
    listed: frozenset[str]
    answered: frozenset[str]
    refused: bool = False  # every hub asked refused the client's key (its lists are not the client's)

    def names(self, hubs: list[Hub], running: bool) -> list[str]:
        """The models listed: by the hubs that answered, as they said (a health check's names, up to
        ``health.interval_s`` old, showed a model the engine had just evicted, with stand-in figures,
        in place of the one it held), and by the others as their last health check saw."""
        return sorted(self.listed | {model for hub in hubs if hub.name not in self.answered
                                     for model in (hub.loaded if running else hub.models)})


class Proxy:
    """The proxy's HTTP face: its own pages, and every other request forwarded through ``Forwarder``.
    Invariant: ``inflight`` counts the forwarded requests not yet answered in full; each of them is
    counted and logged once when it ends (its own pages are not requests)."""

    def __init__(self, config: ProxyConfig) -> None:
        self.config = config
        self.hubs = HubSet(config.connect_timeout_s, tls_client_context(config.ca_file, config.allow_invalid_certs))
        self.forwarder = Forwarder(config, self.hubs)
        self.keys = Secrets(config.api_keys)
        self.metrics = Metrics("proxy", self.hubs.labels)
        self._told_at: dict[tuple[str, bytes], tuple[float, Told]] = {}  # (``_told``)
        self.inflight = 0
        self.ended = trio.Event()  # set whenever a forwarded request ends (a drain waits on it)
        self.draining = False  # SIGTERM: new requests get 503 while those running finish
        self.connections = 0  # client connections open now
        self.idlers = Idlers()  # those kept alive, waiting for a request (closed at once as it stops)
        self.history = History()
        self._health: tuple[tuple[int, int], bytes] = ((-1, -1), b"")  # /health's body, and what it shows
        self._dashboard: tuple[tuple[int, int], bytes] = ((-1, -1), b"")  # /dashboard/data's, and from when
        self.url = ""  # once it serves
        self.metrics.inflight.set_function(lambda: self.inflight)
        self.hub_up = self.metrics.gauge("ghubai_proxy_hub_up", "1 when the hub passes its health checks", ["hub"])
        self.own: dict[tuple[str, str], Callable[[Connection, Request], Awaitable[None]]] = {
            ("GET", "/health"): self.health,
            ("GET", "/ready"): self.ready,
            ("GET", "/metrics"): self.prometheus,
            ("GET", "/dashboard"): self.dashboard_page,
            ("GET", "/dashboard/data"): self.dashboard_data,
            ("GET", "/v1/models"): self.openai_models,
            ("GET", "/api/tags"): self.ollama_tags,
            ("GET", "/api/ps"): self.ollama_running,
        }

    async def handle(self, conn: Connection, request: Request) -> None:
        if request.header(_ENGINE_CALL) is not None:
            await self._error(conn, request, dialects.ENGINE_LOOP)
            return
        method = _as_get(request.method)
        own = self.own.get((method, request.path))
        if own is None and method == "GET" and request.path.startswith(dialects.MODEL_PATH) and \
                self.hubs.named(model_named(request)) in self.hubs.models():
            own = self.openai_model  # from what every hub serves: one hub alone may not serve it
        if own is not None:  # the proxy's own pages are not counted as requests
            try:
                await own(conn, request)
            except ApiError as error:
                await self._error(conn, request, error)
            return
        started, outcome = trio.current_time(), Outcome()
        self.inflight += 1
        try:
            if self.draining:
                raise ApiError(503, STOPPING, retry_after=1)
            await self._forward(conn, request, outcome)
        except ApiError as error:
            outcome.status, outcome.reason = error.status, error.message
            await self._error(conn, request, error)
        finally:
            self.inflight -= 1
            self.ended.set()
            if outcome.status:
                took, model = trio.current_time() - started, outcome.model
                self.metrics.observe(model, outcome.status, took)
                # a stream's first byte is its first token; an error's head brings none, and a whole
                # answer's first byte is its end: in neither the histogram nor the dashboard's chart
                first = outcome.answered_at - started if outcome.answered_at is not None and outcome.streamed \
                    else None
                if first is not None:
                    self.metrics.first_token.observe(first)
                self.history.request(first, generating_s=0.0 if first is None else took - first)
                if outcome.status == 401:  # a hub's refusal of the key (the proxy's own is ``refused``)
                    outcome.reason = f"{outcome.reason or 'refused by the hub'} (from {conn.peer or '?'})"
                log.info("%s %s %d in %.3f s, model %s, hub %s%s", request.method, request.path, outcome.status,
                         took, model or "-", outcome.hub or "none", f": {outcome.reason}" if outcome.reason else "")

    async def connection(self, serve: Callable[[trio.abc.Stream], Awaitable[None]], cap: int,
                         stream: trio.abc.Stream) -> None:
        """One client connection, served unless ``cap`` are open already (``turn_away``)."""
        if self.connections >= cap:
            await turn_away(stream, "proxy")
            return
        self.connections += 1
        try:
            await serve(stream)
        finally:
            self.connections -= 1
            self.ended.set()  # (a stopping proxy waits for its connections too)

    def admit(self, method: str, path: str, headers: Sequence[tuple[bytes, bytes]]) -> None:
        """The key, checked on the head alone: before ``100 Continue``, before the body is read. Only
        the status pages are open; the model lists and unknown paths need a key, as at the hub. A
        proxy's request (``dialects.PROXY_HOP_HEADER``) is a loop, whatever its path and key."""
        if any(key == _PROXY_HOP for key, _ in headers):
            raise dialects.PROXY_LOOP
        if (_as_get(method), path) in self.own and path in OPEN_PATHS:
            return
        if path == protocol.GRIDHUB_PATH:  # a worker's hub_url naming the proxy: told so, whatever its key
            raise ApiError(404, dialects.unknown_endpoint(method, path))
        authorization = next((value for key, value in headers if key == b"authorization"), b"")
        if not self.keys.allows(authorization.decode("latin-1")):  # unknown paths too: no body read for them
            raise invalid_api_key()
        if refusal := dialects.unmanaged(method, path):  # (a blob's gigabytes: never read)
            raise refusal

    def refused(self, conn: Connection, error: ApiError) -> None:
        """A request that could not even be read (too large, malformed, a wrong key): counted and
        logged too, with its client's address (whence a key is guessed, or a leaked one used)."""
        self.metrics.observe(None, error.status, 0.0)
        log.info("%s %d, refused before forwarding: %s (from %s)", conn.head or "(no request line)", error.status,
                 error.message, conn.peer or "?")

    async def _forward(self, conn: Connection, request: Request, outcome: Outcome) -> None:
        rid = REQUEST_ID.get() or request_id(request.header(b"x-request-id"))  # (named as its head was read)
        if not (request.path.startswith(FORWARDED_PREFIXES) or request.path == "/"):
            raise ApiError(404, dialects.unknown_endpoint(request.method, request.path))
        with tracing.span(f"{request.method} {request.path}", tracing.carrier(request.headers),
                          **{"ghubai.request_id": rid}):
            try:
                await self.forwarder.forward(conn, request, conn.peer, outcome, rid)
            finally:
                tracing.annotate(**{"http.response.status_code": outcome.status or None,
                                    "ghubai.hub": outcome.hub or None})

    async def _error(self, conn: Connection, request: Request, error: ApiError) -> None:
        tag = {REQUEST_ID_HEADER: rid} if (rid := REQUEST_ID.get()) else {}
        if self.draining:  # the process goes soon: a kept-alive connection's next request would meet its exit
            tag["connection"] = "close"
        await conn.respond_error(error, request.path, tag)  # unless the forwarder had begun the answer

    async def health(self, conn: Connection, request: Request) -> None:
        """What the checks last found, built again at most once a second, and when a hub comes, goes,
        or goes up or down: it is open, monitors poll it, and each check changes it (50 hubs of 500
        workers: 19 MB, 60 ms to build). Unlike the dashboard, it asks the hubs for no fresher detail
        (a monitor's poll had every check read every hub's workers: 7 times the hubs' traffic, the
        proxy's p99 15 → 300 ms)."""
        key = (self.hubs.health_version, int(trio.current_time()))
        if self._health[0] != key:
            hubs = [hub.describe() for hub in self.hubs.hubs.values()]
            body = json.dumps({"status": "ok", "hubs_up": len(self.hubs.healthy()), "hubs": hubs}).encode()
            self._health = (key, body)
        await conn.respond(200, self._health[1])

    async def dashboard_page(self, conn: Connection, request: Request) -> None:
        await conn.respond(200, dashboard.PAGE, dashboard.PAGE_TYPE)

    async def dashboard_data(self, conn: Connection, request: Request) -> None:
        """Built at most once a second (the page polls that often), and when the hubs change. A first
        look after none lately (``ghubai status``) waits for the workers' detail to be read anew."""
        looked_lately = trio.current_time() < self.hubs.details_wanted_until
        self.hubs.details_wanted_until = trio.current_time() + DETAILS_WANTED_S  # workers live while watched
        if not looked_lately:  # (bounded well within ``ghubai status``'s own 5 s, whatever health.timeout_s is)
            await self.hubs.fresh_details(min(2 * self.config.health.timeout_s, FRESH_DETAILS_S))
        key = (self.hubs.version, int(trio.current_time()))
        if self._dashboard[0] != key:
            hubs = [hub.describe() for hub in self.hubs.hubs.values()]
            queue: Counter[str] = Counter()
            for hub in self.hubs.hubs.values():
                queue.update(hub.queue)
            body = dashboard.data("proxy", f"proxy {self.url}", hubs, dict(queue), self.history)
            self._dashboard = (key, json.dumps(body).encode())
        await conn.respond(200, self._dashboard[1])

    async def ready(self, conn: Connection, request: Request) -> None:
        """Ready while some healthy hub has a worker that offers a model: what could serve a request."""
        healthy = [] if self.draining else self.hubs.healthy()
        serving = sum(1 for hub in healthy if hub.models)
        status = "draining" if self.draining else "ready" if serving else \
            "no hub has a worker with a model" if healthy else "no healthy hub"
        await conn.respond_json(200 if serving else 503, {"status": status, "hubs_up": len(healthy),
                                                          "hubs_serving": serving})

    async def drain(self) -> None:
        """SIGTERM: new requests get 503; those running get ``drain_timeout_s`` to finish, then end
        with an error (a final event for an answer that had begun)."""
        self.draining = True
        running = self.forwarder.running  # (not ``inflight``: that counts the 503s of the drain too)
        log.info("draining: %d request(s) in flight, waiting up to %g s", len(running), self.config.drain_timeout_s)
        with trio.move_on_after(self.config.drain_timeout_s):
            await self._while(lambda: bool(running))
        if running:
            log.warning("drain timeout: ending %d request(s) with an error", len(running))
            self.forwarder.stop()
            with trio.move_on_after(STOP_WRITE_S + 1):  # their final events, then the 503s
                await self._while(lambda: bool(self.inflight))

    async def _while(self, busy: Callable[[], bool]) -> None:
        """Wait until ``busy()`` is false, looking again each time a request ends."""
        while busy():
            self.ended = trio.Event()
            await self.ended.wait()

    async def prometheus(self, conn: Connection, request: Request) -> None:
        self.hub_up.clear()
        for hub in self.hubs.hubs.values():
            self.hub_up.labels(hub.name).set(1 if hub.up else 0)
        await conn.respond(200, self.metrics.render(), CONTENT_TYPE)

    def _models_or_503(self) -> list[str]:
        if not self.hubs.healthy():
            raise ApiError(503, "No healthy hub", retry_after=1)
        return self.hubs.models()

    async def _models_answer(self, conn: Connection, request: Request, value: Any) -> None:
        """A model list or entry the proxy answers itself, as a hub would: with the request's id (the
        SDKs' ``request_id``) and an access line."""
        rid = REQUEST_ID.get() or request_id(request.header(b"x-request-id"))
        await conn.respond_json(200, value, {REQUEST_ID_HEADER: rid})
        log.info("%s %s 200, answered by the proxy", request.method, request.path)

    async def openai_models(self, conn: Connection, request: Request) -> None:
        await self._models_answer(conn, request, dialects.model_list(self._models_or_503()))

    async def openai_model(self, conn: Connection, request: Request) -> None:
        await self._models_answer(conn, request, dialects.model_entry(self.hubs.named(model_named(request))))

    async def ollama_tags(self, conn: Connection, request: Request) -> None:
        await self._ollama_list(conn, request, running=False)

    async def ollama_running(self, conn: Connection, request: Request) -> None:
        await self._ollama_list(conn, request, running=True)

    async def _ollama_list(self, conn: Connection, request: Request, running: bool) -> None:
        self._models_or_503()
        told = await self._told(conn, request, running)
        if told.refused:  # (a hunt: a key every hub refused got the health checks' list, a 200)
            raise invalid_api_key()
        await self._models_answer(conn, request, dialects.ollama_tags(
            told.names(self.hubs.healthy(), running), running=running, facts=told.facts))

    async def _told(self, conn: Connection, request: Request, running: bool) -> Told:
        """What the healthy hubs' own ``/api/tags`` (``running``: ``/api/ps``) tell of their models (the
        health checks carry names only): each model's from the first hub in the order of their names
        that tells of it. A hub that does not answer within ``health.timeout_s`` tells nothing, nor do
        the hubs past the first ``CHECKS_AT_ONCE`` healthy ones; their models are listed all the same,
        by name. Kept for ``TOLD_FOR_S``."""
        path, timeout_s = "/api/ps" if running else "/api/tags", self.config.health.timeout_s
        key = request.header(b"authorization")  # (a hub with api_keys asks for the client's)
        kept = (path, hashlib.sha256(key).digest() if key else b"")  # (what one key was told is not another's)
        if (last := self._told_at.get(kept)) is not None and trio.current_time() - last[0] < TOLD_FOR_S:
            return last[1]  # (a UI's page load asks both lists, every client its own: asked once a second)
        # as a forwarded request's: a hub's line for a refused key says whose it was, under this one's id
        headers = [*([("authorization", key.decode("latin-1"))] if key else []),
                   *([("x-request-id", rid)] if (rid := REQUEST_ID.get()) else []),
                   ("x-forwarded-for", forwarded_for(request, conn.peer).decode("latin-1")),
                   (dialects.PROXY_HOP_HEADER, "1")]
        answers: dict[str, bytes] = {}
        statuses: list[int] = []

        async def ask(hub: Hub) -> None:
            with trio.move_on_after(timeout_s):
                try:
                    async with hub.pool.request("GET", path, headers, b"", timeout_s) as response:
                        statuses.append(response.status)
                        if response.status == 200:
                            answers[hub.name] = await response.read(SUMMARY_LIMIT)
                except (*TRANSPORT_ERRORS, TimeoutError, trio.TooSlowError, TooLarge):
                    pass

        async with trio.open_nursery() as nursery:
            for hub in self.hubs.healthy()[:CHECKS_AT_ONCE]:
                nursery.start_soon(ask, hub)
        told: dict[str, protocol.ModelFacts] = {}
        listed: set[str] = set()
        answered = set()
        for name in sorted(answers):
            try:
                entries = json.loads(answers[name]).get("models")
            except (ValueError, AttributeError, RecursionError):
                continue
            if not isinstance(entries, list):
                continue
            answered.add(name)
            for model, facts in dialects.facts_of(entries, running).items():
                listed.add(model)
                if facts.size or facts.memory or facts.details not in (None, protocol.ModelDetails()):
                    # (not a hub's stand-in for a model none of its engines told of)
                    told[model] = told[model].fuller(facts) if model in told else facts
        # kept in the order told, so that what is over a second old goes from the front: a copy of every
        # hub's list per key ever seen, 1,000 kept, held 435 MB for 500 models (a hunt); at most 1,000 still
        now = trio.current_time()
        self._told_at.pop(kept, None)
        refused = bool(statuses) and all(status in (401, 403) for status in statuses)
        self._told_at[kept] = (now, result := Told(told, frozenset(listed), frozenset(answered), refused))
        while self._told_at and (now - next(iter(self._told_at.values()))[0] >= TOLD_FOR_S
                                 or len(self._told_at) > TOLD_KEYS):
            del self._told_at[next(iter(self._told_at))]
        return result


async def run(config: ProxyConfig, *, path: str | None = None, drain: trio.Event | None = None,
              service: Service | None = None, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve until cancelled, or until ``drain`` is set and the drain is over (``Proxy.drain``);
    reports the base URL. A reload (SIGHUP) re-reads ``path`` for new api_keys, and the TLS files it
    started with (a renewed certificate)."""
    proxy = Proxy(config)
    service = service or Service({})
    service.summary = lambda: (f"{len(proxy.hubs.healthy())}/{len(proxy.hubs.hubs)} hubs up, "
                               f"{proxy.inflight} inflight")

    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH) if config.tls_cert else None
    if server_context is not None:
        server_context.load_cert_chain(config.tls_cert, config.tls_key or None)

    def reload(fresh: ProxyConfig) -> str:
        renewed = "" if server_context is None else \
            "; " + renew_certificate(server_context, config.tls_cert, config.tls_key)  # (first: see the hub's)
        if not proxy.keys.open and not fresh.api_keys:
            log.warning("api_keys is empty now: clients need no key")
        proxy.keys.replace(fresh.api_keys)
        return f"{len(fresh.api_keys)} api_keys{renewed}"

    service.reloads_config("proxy", path, reload, lambda: () if proxy.keys.open else ("api_keys",),
                           live=("api_keys",))
    proxy.hubs.update([(address, address) for address in config.hubs])
    host, port = split_hostport(config.listen)
    limits = config.limits
    serve = partial(serve_connection, handle=proxy.handle, refused=proxy.refused, admit=proxy.admit,
                    origins=cors.Origins(config.cors_origins, config.listen),
                    max_body=limits.max_body_bytes, max_header_bytes=limits.max_header_bytes,
                    max_headers=limits.max_headers, idle_timeout_s=limits.idle_timeout_s,
                    header_timeout_s=limits.header_timeout_s, body_timeout_s=limits.body_timeout_s,
                    idlers=proxy.idlers)
    handler = partial(proxy.connection, serve, connection_cap(limits.max_connections, 2, "limits.max_connections"))
    if server_context is not None:
        # https_compatible: a close sends no close_notify, which a client that stopped reading never took:
        # the connection's shielded close waited for it for good (and the proxy would not stop)
        listeners = [trio.SSLListener(listener, server_context, https_compatible=True)  # type: ignore[misc]
                     for listener in await open_listeners(host, port)]
    else:
        listeners = await open_listeners(host, port)  # type: ignore[assignment]
    bound = listeners[0].transport_listener.socket if config.tls_cert else listeners[0].socket  # type: ignore
    named = f"[{host}]" if ":" in host else host
    url = proxy.url = f"{'https' if config.tls_cert else 'http'}://{named}:{bound.getsockname()[1]}"
    tls = tls_client_context(config.ca_file, config.allow_invalid_certs)
    # no HTTP_PROXY: health checks must reach the hubs as forwarding does (on h11, direct)
    async with httpx.AsyncClient(verify=tls, trust_env=False, headers={dialects.PROXY_HOP_HEADER: "1"}) as http, \
            trio.open_nursery() as nursery:
        if config.registry_url:
            nursery.start_soon(follow_registry, config, proxy.hubs, http)
        nursery.start_soon(check_health, config, proxy.hubs, http)
        # the port is bound: clients of a proxy just (re)started wait in its backlog for the first
        # checks (every hub starts down) rather than get 503 "No healthy hub"
        if config.registry_url or config.hubs:
            with trio.move_on_after(FIRST_CHECKS_S + 2 * config.health.timeout_s):
                await proxy.hubs.checked.wait()
        log.info("proxy serving on %s (registry %s, %d static hubs)", url, redacted(config.registry_url) or "none",
                 len(config.hubs))
        service.ready()
        task_status.started(url)
        # the connections outlive the accept loop by a moment as the proxy stops: once drained it stops
        # listening and gives those it had accepted STOP_GRACE_S to get their 503 (cancelled at once,
        # a few requests of every restart under load got no answer)
        async with trio.open_nursery() as clients:
            accepting = trio.CancelScope()

            async def accept() -> None:
                with accepting:
                    await trio.serve_listeners(handler, listeners, handler_nursery=clients)

            clients.start_soon(accept)
            if drain is not None:
                await drain.wait()
                await proxy.drain()
                accepting.cancel()
                for listener in listeners:
                    await listener.aclose()
                proxy.idlers.close()  # (kept-alive connections waiting for a request: nothing to wait for)
                with trio.move_on_after(STOP_GRACE_S):
                    await proxy._while(lambda: proxy.connections > 0)
                clients.cancel_scope.cancel()
        nursery.cancel_scope.cancel()
