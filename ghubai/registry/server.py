"""The registry daemon: serves the ``[[hubs]]`` of its file and follows every edit of it.

``GET /hubs`` answers ``{"version", "hubs"}`` with an ETag (a digest of the list, so it stays right
across restarts); with ``?wait=S`` and a matching ``If-None-Match`` it holds the request until the
list changes or S seconds pass (then 304). A broken edit keeps the last good list and is reported in
the log and in ``GET /health``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from functools import partial
from typing import Any

import trio
from quart import Response, has_request_context, request, websocket
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from ghubai import dialects
from ghubai.config import ConfigError, HubEntry, RegistryConfig, hub_address, parse, read_text, unlisted_hubs
from ghubai.errors import ApiError
from ghubai.http11.server import connection_cap
from ghubai.observability.metrics import CONTENT_TYPE, CounterMetricFamily, GaugeMetricFamily, Metric, Metrics
from ghubai.observability.service import Service, file_config, restart_needed
from ghubai.registry.watch import watch
from ghubai.web import GhubConfig, serve_app, server_config

log = logging.getLogger("ghubai.registry")

MAX_WAIT_S = 300.0


LOGGED_CHANGES = 20  # a list of thousands of hubs was one log line of half a megabyte at each change


def _changes(before: tuple[HubEntry, ...], after: tuple[HubEntry, ...], first: bool = False) -> str:
    """What a new list changed, for the log: each hub of the ``first`` list, then those added, moved
    (a new address under a name) and removed, at most ``LOGGED_CHANGES`` of them."""
    old, new = {hub.name: hub.address for hub in before}, {hub.name: hub.address for hub in after}
    said = [f"{name}={address}" if first else f"added {name}={address}" for name, address in new.items()
            if name not in old]
    said += [f"{name} moved to {address}" for name, address in new.items() if old.get(name, address) != address]
    said += [f"removed {name}" for name in old if name not in new]
    more = f" and {len(said) - LOGGED_CHANGES} more" if len(said) > LOGGED_CHANGES else ""
    return ", ".join(said[:LOGGED_CHANGES]) + more or ("(none)" if not new else "the same hubs, in another order")


class HubList:
    """The list being served, its version and ETag, and an event set on every change. Invariant: the
    version and ETag change exactly when the list does, and long-polls wake on every change."""

    def __init__(self) -> None:
        self.version = 0
        self.hubs: tuple[HubEntry, ...] = ()
        self.etag = ""
        self.changed = trio.Event()
        self.config_error: str | None = None
        self.reload_errors = 0
        self.stopping = False  # the daemon stops: a long-poll is answered at once, and none is held
        self.held = 0  # long-polls waiting for a change (about one per proxy)

    def release_polls(self) -> None:
        """Answer every held long-poll now (a 304: the list has not changed), before the server stops:
        cancelled, they were 500s, which every proxy logged as the registry's failure at each restart."""
        self.stopping = True
        self.changed.set()
        self.changed = trio.Event()

    def publish(self, hubs: tuple[HubEntry, ...]) -> None:
        """Serve ``hubs``, each address in its one spelling: one re-spelled in the file (``HTTP://``,
        a trailing "/") is the same hub, no move, and no new version that wakes every proxy."""
        hubs = tuple(HubEntry(hub.name, hub_address(hub.address)) for hub in hubs)
        if hubs == self.hubs and self.version:
            return
        said = _changes(self.hubs, hubs, first=not self.version)
        self.hubs = hubs
        self.version += 1
        entries = self.entries()
        self.etag = '"' + hashlib.sha256(json.dumps(entries).encode()).hexdigest()[:20] + '"'
        log.info("serving %d hub(s), version %d: %s", len(hubs), self.version, said)
        self.changed.set()
        self.changed = trio.Event()

    def entries(self) -> list[dict[str, str]]:
        return [{"name": hub.name, "address": hub.address} for hub in self.hubs]


def reload(hub_list: HubList, path: str, started: RegistryConfig | None = None) -> bool:
    """Read the file again; on any problem keep the last good list and say why. A file that names
    no ``hubs`` at all is a problem too: an empty or half-written file (a full disk, a save caught
    midway, then a reboot) must not empty the grid; ``hubs = []`` does, on purpose. Until a file
    has named its hubs, there is no list: ``/hubs`` answers 503, and proxies keep what they had.
    False when the file could not be read for a while (no file descriptor left): the watch asks
    again, or the edit would be lost until the next."""
    try:
        try:
            text = read_text(path)  # (read once: what is checked is what is served)
            config: RegistryConfig = parse("registry", text, path)
        except ConfigError:
            raise
        except Exception as error:  # a fault of ours in reading a file must never stop the registry
            log.exception("reading %s failed", path)
            raise ConfigError([f"{path}: cannot be read: {type(error).__name__}: {error}"]) from None
        if problem := unlisted_hubs(text, path):
            raise ConfigError([problem])
    except ConfigError as error:
        problem = "; ".join(error.errors)
        if not (error.passing and problem == hub_list.config_error):  # (asked again at each poll: said once)
            hub_list.reload_errors += 1
            log.error("%s: %s", "kept the last good hub list" if hub_list.version else "no hub list to serve",
                      problem)
        hub_list.config_error = problem
        return not error.passing
    if hub_list.config_error:
        log.info("%s is valid again", path)
    hub_list.config_error = None
    hub_list.publish(config.hubs)
    restart_needed(path, started, config, ("hubs",))
    return True


def _figures(hub_list: HubList) -> list[Metric]:
    return [GaugeMetricFamily("ghubai_registry_hubs", "Hubs in the list being served", value=len(hub_list.hubs)),
            GaugeMetricFamily("ghubai_registry_long_polls", "Long-polls held for a change (one a following proxy)",
                              value=hub_list.held),
            CounterMetricFamily("ghubai_registry_reload_errors", "Edits of the file that were refused",
                                value=hub_list.reload_errors)]


def create_app(hub_list: HubList) -> QuartTrio:
    app = QuartTrio("ghubai.registry")
    metrics = Metrics("registry", lambda model: False)  # it answers no model
    metrics.watch(lambda: _figures(hub_list))

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), 200, content_type=CONTENT_TYPE)

    def error(status: int, message: str) -> Response:
        return Response(ApiError(status, message).body_for(request.path), status, content_type="application/json")

    def no_list() -> Response:
        return error(503, hub_list.config_error or "no list of hubs yet")

    async def unknown(failure: HTTPException) -> Response:  # JSON, as hub and proxy answer (quart's was an HTML page)
        asked = request if has_request_context() else websocket  # (a worker that dials it for a hub)
        status = failure.code or 500
        said = dialects.unknown_endpoint(asked.method, asked.path) if status == 404 else failure.description or "error"
        return Response(ApiError(status, said).body_for(asked.path), status, content_type="application/json")

    app.register_error_handler(HTTPException, unknown)

    @app.get("/hubs")
    async def hubs() -> Response:
        try:
            wait = min(max(float(request.args.get("wait", "0")), 0.0), MAX_WAIT_S)
        except ValueError:
            return error(400, "wait must be a number of seconds")
        def matches() -> bool:  # If-None-Match may be a list, "*", or weak W/"..." tags
            if not hub_list.etag:  # no list yet: nothing to match (a request without the header was held)
                return False
            tags = {tag.strip().removeprefix("W/") for tag in request.headers.get("If-None-Match", "").split(",")}
            return hub_list.etag in tags or "*" in tags

        if matches() and wait > 0 and not hub_list.stopping:
            changed = hub_list.changed
            hub_list.held += 1
            try:
                with trio.move_on_after(wait):
                    await changed.wait()
            finally:
                hub_list.held -= 1
        if not hub_list.version:  # no file has named its hubs yet: no list to give (a proxy keeps its own)
            return no_list()
        if matches():
            # An explicit empty length: without it hypercorn closes the connection after a 304.
            return Response(b"", 304, headers={"ETag": hub_list.etag, "Content-Length": "0"})
        body = {"version": hub_list.version, "hubs": hub_list.entries()}
        return Response(json.dumps(body), 200, content_type="application/json", headers={"ETag": hub_list.etag})

    @app.get("/Registry")
    async def seed_shape() -> Response:
        if not hub_list.version:  # as /hubs
            return no_list()
        return Response(json.dumps(hub_list.entries()), 200, content_type="application/json")

    @app.get("/health")
    async def health() -> dict[str, Any]:
        if hub_list.config_error:
            return {"status": "degraded", "config_error": hub_list.config_error}
        return {"status": "ok"}

    return app


def _reload_on_signal(hub_list: HubList, path: str, started: RegistryConfig | None, served: GhubConfig) -> None:
    """SIGHUP: the file again, and the TLS files the registry started with (a renewed certificate)."""
    log.info("SIGHUP: reloading %s", path)
    reload(hub_list, path, started)
    try:
        if renewed := served.renew_certificate():
            log.info("SIGHUP: %s", renewed)
    except ConfigError as error:
        log.error("kept the TLS certificate being served: %s", "; ".join(error.errors))


async def run(config: RegistryConfig, path: str | None, *, service: Service | None = None,
              stop: trio.Event | None = None, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve until cancelled, or until ``stop`` is set: then answer the held long-polls and end; with
    a ``path``, follow its edits (and SIGHUP). Reports the base URL."""
    hub_list = HubList()
    if path is None:
        hub_list.publish(config.hubs)
    service = service or Service({})
    service.summary = lambda: f"{len(hub_list.entries())} hubs" + (", config error" if hub_list.config_error else "")
    served = server_config(config.listen, tls_cert=config.tls_cert, tls_key=config.tls_key, who="registry",
                           max_connections=connection_cap(config.max_connections, 1, "max_connections"))
    async with trio.open_nursery() as nursery:
        if path is not None:
            started = file_config("registry", path)
            service.reload = partial(_reload_on_signal, hub_list, path, started, served)
            await nursery.start(watch, path, partial(reload, hub_list, path, started))
            reload(hub_list, path)  # an edit made since the daemon first read the file is not lost
        stopped = trio.Event()
        async with trio.open_nursery() as serving:
            binds = await serving.start(partial(serve_app, create_app(hub_list), served, until=stopped))
            log.info("registry serving on %s%s", " and ".join(binds), f", following {path}" if path else "")
            if stop is None or not stop.is_set():  # (a SIGTERM during the start: it is stopping already)
                service.ready()
            task_status.started(binds[0])
            if stop is not None:
                await stop.wait()
                hub_list.release_polls()
                stopped.set()  # the server answers them, then ends
        nursery.cancel_scope.cancel()  # (the watch)
