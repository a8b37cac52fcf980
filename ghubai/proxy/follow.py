"""Keeping the proxy's picture of the grid current: the hub list from the registry (long-poll), and
active health checks of every hub."""

from __future__ import annotations

import itertools
import json
import logging
import math
from typing import Any

import httpx
import trio

from ghubai import dialects
from ghubai.config import HealthConfig, ProxyConfig, redacted, scrubbed
from ghubai.errors import describe
from ghubai.observability.dashboard import number, served_models
from ghubai.observability.logs import printable
from ghubai.proxy.hubs import SETTLING_CHECK_S, Hub, HubSet

log = logging.getLogger("ghubai.proxy")

LONG_POLL_S = 30.0
RETRY_S = 1.0
FIRST_CHECKS_S = 1.0  # a starting proxy waits this, beyond the registry's answer and a round of checks
STARTING_RETRY_S = 0.1  # how soon a starting proxy asks again a registry that refused it (started with it)
NOT_YET = (502, 503, 504)  # a gateway's words for a registry behind it that is still starting
REGISTRY_ANSWER_LIMIT = 4 << 20  # a list of thousands of hubs is a few hundred KB
SUMMARY_LIMIT = 4 << 20  # a hub's /api/summary (its models and queue)
WORKERS_LIMIT = 16 << 20  # a hub's /api/registry (its workers in detail: about 400 bytes each)
NOT_A_HUB = "a GhubAi proxy answers there, not a hub (this proxy's own address, or another's?)"
CHECKS_AT_ONCE = 32  # health checks in flight (under httpx's 100 connections: a queue there costs quadratic time)
FAILING_AT_ONCE = 16  # and, besides those, checks of hubs whose last check failed (one that hangs holds its place)


async def follow_registry(config: ProxyConfig, hubs: HubSet, http: httpx.AsyncClient) -> None:
    """Long-poll the registry for ever. With the registry down, the last list stays in force."""
    static = [(address, address) for address in config.hubs]
    # a registry started with the proxy (a boot) may refuse it for a moment, or a gateway before it
    # answer 502-504: asked again every STARTING_RETRY_S while the proxy waits for its first checks, its
    # clients wait too (they got "No healthy hub" for a second)
    starting_until = trio.current_time() + FIRST_CHECKS_S + config.health.timeout_s
    etag: str | None = None
    failing = ""  # what was last said of the registry's failure: said again only when it changes
    while True:
        headers = {"If-None-Match": etag} if etag else {}
        params = {"wait": str(LONG_POLL_S)} if etag and not failing else {}  # (back: say so at once)
        asked = trio.current_time()
        try:
            with trio.fail_after(LONG_POLL_S + 10):  # the whole answer, not each read
                status, answer_etag, body = await _bounded_get(
                    http, config.registry_url.rstrip("/") + "/hubs", httpx.Timeout(config.health.timeout_s,
                                                                                   read=LONG_POLL_S + 5),
                    REGISTRY_ANSWER_LIMIT, params, headers)
            if status in NOT_YET and not hubs.listed.is_set() and trio.current_time() < starting_until:
                await trio.sleep(STARTING_RETRY_S)  # (as a refused connection: see above)
                continue
            if status == 304 and trio.current_time() - asked < RETRY_S:  # a poll not held (a cache, a gateway)
                await trio.sleep(RETRY_S)
            elif status != 304:
                if status == dialects.PROXY_LOOP.status:
                    raise ValueError("a GhubAi proxy answers there, not a registry (a registry listens on 7001)")
                if status != 200:  # with its words: a registry on a file with no hubs key says what to write
                    raise ValueError(f"HTTP {status}{_said_by(body)}")
                entries = [(str(hub["name"]), str(hub["address"])) for hub in json.loads(body)["hubs"]]
                hubs.update(static + entries)
                _listed(hubs)
                if answer_etag in (None, etag):
                    await trio.sleep(RETRY_S)  # a registry that does not hold the poll must not make us spin
                etag = answer_etag
            if failing:
                log.info("registry %s answers again", redacted(config.registry_url))
            failing = ""
        except Exception as error:  # a hostile or broken registry answer must never stop the proxy
            if not hubs.listed.is_set() and isinstance(error, httpx.ConnectError) and \
                    trio.current_time() < starting_until:
                await trio.sleep(STARTING_RETRY_S)
                continue
            said = scrubbed(describe(error), config.registry_url)  # (httpx may quote the URL, password and all)
            if said != failing:  # (its cause changed: refused while it started, then its file's fault)
                log.warning("registry %s unavailable (%s); keeping the last hub list", redacted(config.registry_url), said)
            failing = said
            _listed(hubs)
            await trio.sleep(RETRY_S)


def _said_by(body: bytes) -> str:
    """A registry's error answer's words, briefly: ": <message>", or ""."""
    try:
        error = json.loads(body).get("error")
    except (ValueError, AttributeError):
        return ""
    message = error.get("message") if isinstance(error, dict) else error
    return f": {printable(message)[:300]}" if isinstance(message, str) and message else ""


def _listed(hubs: HubSet) -> None:
    """The registry's first answer (or failure) is in: its hubs are checked at once; with none to
    check, the proxy serves (its 503s) at once."""
    if not hubs.listed.is_set():
        hubs.listed.set()
        hubs.check_all()
    if not hubs.hubs:
        hubs.checked.set()


async def _bounded_get(http: httpx.AsyncClient, url: str, timeout: httpx.Timeout | float, limit: int,
                       params: dict[str, str] | None = None, headers: dict[str, str] | None = None,
                       ) -> tuple[int, str | None, bytes]:
    """A registry's or a hub's answer (status, ETag, body), read to at most ``limit`` bytes, counted
    decoded (one that streamed for ever, or a gzip bomb, grew the proxy by gigabytes); ValueError past it."""
    async with http.stream("GET", url, params=params, headers=headers, timeout=timeout) as response:
        body = bytearray()
        async for piece in response.aiter_bytes():
            body += piece
            if len(body) > limit:
                raise ValueError(f"the answer is larger than {limit} bytes")
    return response.status_code, response.headers.get("etag"), bytes(body)


async def _hub_json(http: httpx.AsyncClient, url: str, health: HealthConfig, limit: int) -> tuple[int, Any]:
    """A hub's answer for its check: its status, and its JSON when it is a 2xx."""
    status, _, body = await _bounded_get(http, url, health.timeout_s, limit)
    return status, json.loads(body) if 200 <= status < 300 else None


DETAILS_EVERY = 5  # health checks: each asks a hub's summary, every fifth its workers in detail too
DETAILS_WANTED_S = 10.0  # after the proxy's dashboard or status was asked for, every check does


def _state_of(summary: Any, workers: list[dict[str, Any]] | None) -> dict[str, Any]:
    """A hub's summary as the proxy keeps it; ValueError (or a KeyError, TypeError) when it is not one."""
    if not isinstance(summary, dict):
        raise ValueError("the answer is not a hub's summary")
    models = summary["models"] if workers is None else served_models(workers)
    if not isinstance(models, list):
        raise ValueError("the answer lists no models")
    loaded = summary.get("loaded") if workers is None else _loaded_of(workers)
    loaded = loaded if isinstance(loaded, list) else models  # a hub that cannot tell: all it serves
    return {"models": sorted({str(model) for model in models}), "loaded": sorted({str(model) for model in loaded}),
            "draining": bool(summary.get("draining")),
            "queue": {str(model): int(count) for model, count in (summary.get("queue") or {}).items()},
            "heartbeat_s": float(summary.get("heartbeat_s") or 0), "capacity": int(summary.get("capacity") or 0)}


def _loaded_of(workers: list[dict[str, Any]]) -> list[str]:
    """The models in memory by ``/api/registry``'s list (a hub too old for ``/api/summary``): each
    worker's ``loaded``, or all it serves when it cannot tell, as the hub itself counts them."""
    return [model for worker in workers if not worker.get("draining")
            for model in (worker["loaded"] if isinstance(worker.get("loaded"), list) else worker["models"])]


_TEXTS = ("id", "name", "engine", "problem")
_LISTS = ("models", "loaded", "apis")
_FIGURES = ("inflight", "busy", "max_concurrency", "last_seen_s", "weight")


def _worker_entry(entry: dict[str, Any]) -> dict[str, Any]:
    """A hub's worker entry as the proxy passes it on to its dashboard and ``ghubai status``: text as
    text, lists of text, numbers, and nothing else. A hub of another version, or a broken one, sent an
    id that was a list, and the proxy's whole dashboard (and status, for every hub) failed on it."""
    worker: dict[str, Any] = {key: str(entry[key]) for key in _TEXTS if entry.get(key) is not None}
    worker |= {key: [str(item) for item in entry[key] if isinstance(item, str | int | float)]
               if isinstance(entry[key], list) else [] for key in _LISTS if key in entry}
    worker |= {key: entry[key] for key in _FIGURES if number(entry, key) is not None}
    worker["draining"] = entry.get("draining") is True
    usage = entry.get("usage")
    if isinstance(usage, dict):
        worker["usage"] = {str(kind): count for kind, count in usage.items() if number(usage, kind) is not None}
    return worker


def _workers_of(listing: Any) -> list[dict[str, Any]]:
    workers = listing["workers"] if isinstance(listing, dict) else None
    if not isinstance(workers, list) or not all(isinstance(worker, dict) for worker in workers):
        raise ValueError("the answer lists no workers")
    return [_worker_entry(worker) for worker in workers]


async def _check(hub: Hub, hubs: HubSet, http: httpx.AsyncClient, health: HealthConfig, details: bool) -> None:
    """Health from ``/api/summary`` (open even when the hub wants API keys): that the hub serves,
    whether it is draining, its models and queue, at a cost that does not grow with its workers. A
    hub older than ``/api/summary`` (any 4xx: one that wants keys answers 401) is read from
    ``/api/registry`` instead. When ``details``, or when the summary counts other workers than the
    proxy last listed (a worker came or went), the workers too, for the dashboard: if that fails,
    the last list stays, and the hub's health does not depend on it. An answer that is not what a
    hub says is a failed check, like no answer: it never stops the checks, and a hub that is up goes
    down after ``health.down_after`` of them in a row."""
    try:
        with trio.fail_after(health.timeout_s):
            status, answer = await _hub_json(http, hub.address + "/api/summary", health, SUMMARY_LIMIT)
            old = 400 <= status < 500
            if old:
                status, answer = await _hub_json(http, hub.address + "/api/registry", health, WORKERS_LIMIT)
        if answer is None:
            raise ValueError(NOT_A_HUB if status == dialects.PROXY_LOOP.status else f"HTTP {status}")
        workers = _workers_of(answer) if old else None
        state = _state_of(answer, workers)
    except Exception as error:  # whatever goes wrong, the check failed and the proxy serves on
        # a refused connection is no slow answer: nothing listens there (as the forwarder judges it)
        hubs.check_failed(hub, f"health check failed: {describe(error)}",
                          1 if isinstance(error, httpx.ConnectError) else health.down_after)
        return
    if workers is None and (details or answer.get("workers") != len(hub.workers or ())):
        try:
            with trio.fail_after(health.timeout_s):
                status, answer = await _hub_json(http, hub.address + "/api/registry", health, WORKERS_LIMIT)
            if answer is None:
                raise ValueError(f"HTTP {status}")
            workers = _workers_of(answer)
        except Exception as error:  # the summary said it serves: only the dashboard's detail is stale
            log.debug("hub %s: no worker list (%s)", hub.name, describe(error))
    hubs.set_health(hub, not state["draining"], "the hub is draining", state=state, workers=workers)


async def check_health(config: ProxyConfig, hubs: HubSet, http: httpx.AsyncClient) -> None:
    """Check every hub each ``interval_s``, the hubs that settle (``HubSet.settling``: a restart)
    every ``SETTLING_CHECK_S``, and every hub at once when the list gains one. Hubs that hang
    (each check up to ``timeout_s``) hold up no other: a hub whose last check has not ended is not
    checked again meanwhile, the next round does not wait for it, and hubs whose last check failed
    are checked in places of their own. (With 300 hubs that hung, a hub added to the registry waited
    two rounds of them, 12 s.) The first round of the hubs listed is waited for: the proxy serves
    once it is done (``checked``); a healthy hub listed after many that hang waits for them then."""
    running: set[str] = set()  # the addresses of hubs whose check has not ended
    shares = {False: trio.Semaphore(CHECKS_AT_ONCE), True: trio.Semaphore(FAILING_AT_ONCE)}

    async def check(hub: Hub, details: bool) -> None:
        try:
            async with shares[hub.failed_checks > 0]:
                await _check(hub, hubs, http, config.health, details)
        finally:
            running.discard(hub.address)

    async with trio.open_nursery() as checks:
        full_at, rounds = -math.inf, itertools.count()
        while True:
            now = trio.current_time()
            full = now >= full_at or hubs.all_wanted  # (else the hubs that settle only)
            if full:
                full_at = now + config.health.interval_s
            hubs.check_now, hubs.all_wanted = trio.Event(), False
            listed = not config.registry_url or hubs.listed.is_set()  # (else the round may miss its hubs)
            wanted = full and next(rounds) % DETAILS_EVERY == 0 or now < hubs.details_wanted_until
            for hub in hubs.hubs.values():
                hub.pool.close_stale()
            settling = [hub for hub in hubs.hubs.values() if hubs.settling(hub)]
            # (many at once is no restart but an outage, a network's: those wait for the full rounds)
            quick = set(settling) if len(settling) <= CHECKS_AT_ONCE else set()
            due = [hub for hub in hubs.hubs.values() if hub.address not in running and (full or hub in quick)]
            running.update(hub.address for hub in due)
            first = not hubs.checked.is_set()  # (rounds before the registry's list came too: its static hubs)
            async with trio.open_nursery() as first_round:
                for hub in due:
                    (first_round if first else checks).start_soon(check, hub, wanted or hub.workers is None)
            if first and listed and hubs.hubs:
                hubs.checked.set()
            with trio.move_on_at(min(full_at, trio.current_time() + SETTLING_CHECK_S) if quick else full_at):
                await hubs.check_now.wait()
