"""The proxy's hubs: who they are, whether they are up, which models they host, and a pool of
keep-alive HTTP/1.1 connections to each (``ghubai.http11.client``)."""

from __future__ import annotations

import itertools
import logging
import math
import ssl
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import trio

from ghubai import affinity, dialects
from ghubai.config import SchedulerConfig, hub_address, hub_address_problem
from ghubai.http11.client import ClientConnection, ConnectionPool
from ghubai.observability.dashboard import hub_view

log = logging.getLogger("ghubai.proxy")

MAX_IDLE_PER_HUB = 64
AFFINITY_MARGIN = SchedulerConfig().affinity_margin  # the hub's default, over a hub's slots
# Reuse an idle connection only while the hub surely still keeps it (hypercorn closes after 5 s).
IDLE_REUSE_S = 4.0
LABEL_MEMORY_S = 60.0  # a model a hub stopped listing keeps its metrics label this long (a worker restarts)
RECHECK_GAP_S = 1.0  # the least time between two rounds of checks a request asked for
SETTLING_S = 30.0  # a hub down or without models since a change this recent is checked every SETTLING_CHECK_S
SETTLING_CHECK_S = 0.25


@dataclass(eq=False)
class Hub:
    """A hub the proxy forwards to. Invariant: ``pool`` holds connections only while the hub is up."""
    name: str
    address: str
    pool: ConnectionPool
    up: bool = False
    models: frozenset[str] = frozenset()
    loaded: frozenset[str] = frozenset()  # the models some worker's engine holds in memory
    reason: str = "not checked yet"
    workers: list[dict[str, Any]] | None = None  # as a health check last listed them in detail; None: not yet
    listed_at: float = -math.inf  # trio time of that list
    queue: dict[str, int] = field(default_factory=dict)  # requests waiting there, by model
    heartbeat_s: float = 0.0
    seed: int = 0  # its number for rendezvous hashing (``ghubai.affinity``)
    inflight: int = 0  # requests this proxy has there now
    capacity: int = 0  # its workers' slots, as its last health check said
    failed_checks: int = 0  # health checks failed in a row
    settle_until: float = -math.inf  # trio time: checked often till then, once it stopped serving (``settling``)
    broken_answers: int = 0  # answers in a row that broke before their first byte (``HubSet.answer_broke``)

    @property
    def load(self) -> float:
        return self.inflight / max(self.capacity, 1)

    def describe(self) -> dict[str, Any]:
        """As ``/health`` and the dashboard show it, with the models its engines hold in memory, as
        its last summary said (where an unload goes)."""
        return {**hub_view(self.name, self.address, self.up, self.reason, self.queue, self.workers or [],
                           self.heartbeat_s, sorted(self.models)), "loaded": sorted(self.loaded)}


class HubSet:
    """Every hub the proxy knows, keyed by address; each keeps its state across list updates.
    Invariant: a hub is picked only while its last health check passed (``up``)."""

    def __init__(self, connect_timeout_s: float, ssl_context: ssl.SSLContext) -> None:
        self.hubs: dict[str, Hub] = {}
        self.connect_timeout_s = connect_timeout_s
        self.ssl_context = ssl_context
        self._turns: dict[str | None, itertools.count[int]] = {}  # round robin, by model (None: any other)
        self.check_now = trio.Event()  # wakes the checks: of every hub when ``all_wanted``, else of those that settle
        self.all_wanted = False
        self.listed = trio.Event()  # the registry answered once, or failed to (``follow_registry``)
        self.checked = trio.Event()  # a first round of checks of the hubs then listed is done
        self.details_wanted_until = -math.inf  # trio time: the dashboard or status was asked for lately
        self._checked = trio.Event()  # set at each health check's result (``fresh_details``)
        self._unlisted: dict[str, float] = {}  # models a hub stopped listing, and when (``labels``)
        self.version = 0  # counts the changes of what the dashboard shows (a health check's result, the list)
        self.health_version = 0  # counts what /health must show at once: the list, a hub up or down
        self._served: tuple[frozenset[str], frozenset[str]] | None = None  # (``_models_known``)
        self._rechecked = -math.inf  # trio time ``recheck`` last asked for a round of checks

    def update(self, entries: list[tuple[str, str]]) -> None:
        """Take a new list of (name, address); known hubs keep their state, new ones get checked at once."""
        self.version += 1
        self.health_version += 1
        self._served = None
        wanted = {}
        for name, address in entries:
            if problem := hub_address_problem(address):  # a registry older than this check
                log.warning("hub %s left out: %s", name, problem)
                continue
            wanted[hub_address(address)] = name  # one hub, however its address is spelled
        gone: dict[str, Hub] = {}
        for address in list(self.hubs):
            if address not in wanted:
                hub = self.hubs.pop(address)
                gone[hub.name] = hub
                log.info("hub %s (%s) removed", hub.name, address)
                hub.pool.close_idle()
        for address, name in wanted.items():
            if address not in self.hubs:
                hub = self.hubs[address] = self._hub(name, address)
                if moved := gone.get(name):  # what it served stands until it is checked there: its 503, not a 404
                    hub.models, hub.loaded = moved.models, moved.loaded
                log.info("hub %s (%s) added", name, address)
                self.check_all()
            elif (hub := self.hubs[address]).name != name:  # (the registry logs it: so does the proxy)
                log.info("hub %s (%s) renamed %s", hub.name, address, name)
                hub.name = name

    def healthy(self) -> list[Hub]:
        return [hub for hub in self.hubs.values() if hub.up]

    def candidates(self, model: str | None, exclude: set[str]) -> list[Hub]:
        """Healthy hubs that host ``model``; when no hub advertises it (a model a hub gained since
        its last check, or a name no hub knows), every healthy hub. Not when those that host it are
        down or busy: another hub would answer a 404, which a client takes for good, not a 503."""
        healthy = [hub for hub in self.healthy() if hub.address not in exclude]
        if not model or not self.serves(model):
            return healthy
        return [hub for hub in healthy if model in hub.models]

    def pick(self, model: str | None, exclude: set[str], conversation: int | None = None) -> Hub | None:
        """Round robin over the candidates; a conversation's requests go to the hub its key ranks
        first (``ghubai.affinity``) while that hub is at most ``AFFINITY_MARGIN`` busier than the
        least busy (requests this proxy has there over its workers' slots), else the next in rank
        within that bound."""
        candidates = self.candidates(model, exclude)
        if not candidates:
            return None
        if conversation is not None:
            bound = min(hub.load for hub in candidates) + AFFINITY_MARGIN
            return max((hub for hub in candidates if hub.load <= bound),
                       key=lambda hub: affinity.score(conversation, hub.seed))
        # one turn per model: with one for all, a client that alternates two models sent each to one hub
        key = model if model and self.serves(model) else None
        if key not in self._turns and len(self._turns) > 2 * len(self._models_known()[0]) + 64:
            self._turns = {name: turn for name, turn in self._turns.items() if name is None or self.serves(name)}
        turn = self._turns.setdefault(key, itertools.count())  # (models no hub serves any more go: a hunt)
        return candidates[next(turn) % len(candidates)]

    def _models_known(self) -> tuple[frozenset[str], frozenset[str]]:
        """The models of every known hub and of the healthy ones, as their last checks listed them
        (kept until a hub's models or health, or the list, change: asked per request)."""
        if self._served is None:
            self._served = (frozenset().union(*(hub.models for hub in self.hubs.values())),
                            frozenset().union(*(hub.models for hub in self.hubs.values() if hub.up)))
        return self._served

    def serves(self, model: str) -> bool:
        """Some known hub's last health check listed ``model``, up or down."""
        return model in self._models_known()[0]

    def labels(self, model: str) -> bool:
        """``model`` names a metrics series: a hub serves it, or did within ``LABEL_MEMORY_S`` (its
        worker restarts, and the hub holds its requests for it meanwhile)."""
        return self.serves(model) or trio.current_time() < self._unlisted.get(model, -math.inf) + LABEL_MEMORY_S

    def named(self, model: str) -> str:
        """The name the grid serves ``model`` under (``dialects.tagged``): as the healthy hubs serve
        it, else as any known hub did (a down hub's old list must not rename what a healthy one serves);
        else, letter case aside, as the hub's (``dialects.folded``)."""
        known, healthy = self._models_known()
        name = dialects.tagged(model, healthy.__contains__)
        if name in healthy or (name := dialects.tagged(model, self.serves)) in known:
            return name
        return dialects.folded(model, healthy) or dialects.folded(model, known) or name

    def recheck(self) -> None:
        """Check every hub now, not at the next interval (a hub's models changed since its check),
        at most once a second however many requests find it."""
        if trio.current_time() - self._rechecked >= RECHECK_GAP_S:
            self._rechecked = trio.current_time()
            self.check_all()

    def check_all(self) -> None:
        """A round of checks of every hub now (``check_now`` alone: of those that settle)."""
        self.all_wanted = True
        self.check_now.set()

    def models(self) -> list[str]:
        return sorted({model for hub in self.healthy() for model in hub.models})

    def check_failed(self, hub: Hub, reason: str, down_after: int) -> None:
        """A health check of ``hub`` failed: it goes down at the ``down_after``-th failure in a row
        (a hub never seen up is down already)."""
        hub.failed_checks += 1
        if hub.up and hub.failed_checks < down_after:
            log.warning("hub %s (%s) failed a health check (%d in a row; down at %d): %s", hub.name, hub.address,
                        hub.failed_checks, down_after, reason)
        else:
            self.set_health(hub, False, reason)

    def answer_broke(self, hub: Hub, reason: str, down_after: int) -> None:
        """``hub`` broke an answer before its first byte: checked at once, and down only at the
        ``down_after``-th in a row (a request may break a healthy hub's answer: a lowercase ``head``
        did, and one client's few a second took the hub from everyone), or when its check fails."""
        hub.broken_answers += 1
        if hub.broken_answers >= down_after:
            hub.broken_answers = 0
            self.set_health(hub, False, f"{down_after} answers in a row broke before their first byte: {reason}")
        else:
            self.recheck()

    def set_health(self, hub: Hub, up: bool, reason: str = "", state: dict[str, Any] | None = None,
                   workers: list[dict[str, Any]] | None = None) -> None:
        """``state``: the hub's ``/api/summary`` answer as ``follow._state_of`` checked it, when the
        check read one; ``workers``: its ``/api/registry`` list, when the check read that too."""
        self.version += 1
        before = (hub.up, hub.models)
        if state is not None and (dropped := hub.models - set(state["models"])):  # (``labels``)
            now = trio.current_time()
            self._unlisted = {model: at for model, at in self._unlisted.items() if now < at + LABEL_MEMORY_S}
            self._unlisted.update(dict.fromkeys(dropped, now))
        if state is not None:  # as follow._state_of made it
            hub.failed_checks = 0
            hub.queue, hub.heartbeat_s, hub.capacity = state["queue"], state["heartbeat_s"], state["capacity"]
            hub.models, hub.loaded = frozenset(state["models"]), frozenset(state["loaded"])
            if workers is not None:
                hub.workers, hub.listed_at = workers, trio.current_time()
        elif not up:
            hub.workers, hub.queue = None, {}  # unreachable: what it had is unknown now
        if up != hub.up:
            self.health_version += 1
            if up:
                log.info("hub %s (%s) is up: %s", hub.name, hub.address, ", ".join(sorted(hub.models)) or "no models")
            else:
                log.warning("hub %s (%s) is down: %s", hub.name, hub.address, reason)
        elif not up and reason != hub.reason:  # a hub never up: why (a refused certificate was only in /health)
            log.warning("hub %s (%s) is not up: %s", hub.name, hub.address, reason)
        hub.up, hub.reason = up, reason
        if (up, hub.models) != before:
            self._served = None
            if before[0] and before[1] and not (up and hub.models):  # it stopped serving: a restart, often
                hub.settle_until = trio.current_time() + SETTLING_S  # (not again while it flaps: no spin)
                self.check_now.set()  # (found down by a request, say: its checks begin now)
        if not up:
            hub.pool.close_idle()
        self._checked.set()
        self._checked = trio.Event()

    def settling(self, hub: Hub) -> bool:
        """Down or without models, ``SETTLING_S`` at most since it stopped serving: a hub restarting
        (down, then up before its workers link again), checked every ``SETTLING_CHECK_S``. (Checked
        each ``interval_s``, a hub back a second ago was taken for down or empty for 2 s more, and a
        restart of the next hub then gave every client 503s: a rolling restart's hunt.)"""
        return (not hub.up or not hub.models) and trio.current_time() < hub.settle_until

    async def fresh_details(self, within_s: float) -> None:
        """Ask for a round of checks that lists every hub's workers, and wait for it, ``within_s`` at
        most: when no one looked lately, the lists are a few rounds old (every fifth check reads them)."""
        asked = trio.current_time()
        self.details_wanted_until = max(self.details_wanted_until, asked)  # (the round reads them)
        self.check_all()
        with trio.move_on_after(within_s):
            while any(hub.up and hub.listed_at < asked for hub in self.hubs.values()):
                await self._checked.wait()

    # -- connections -----------------------------------------------------------------------------

    def _hub(self, name: str, address: str) -> Hub:
        parts = urlsplit(address)
        tls = parts.scheme == "https"
        host, port = parts.hostname or "localhost", parts.port or (443 if tls else 80)
        context = self.ssl_context if tls else None
        return Hub(name, address, ConnectionPool(host, port, ssl_context=context, connect_timeout_s=self.connect_timeout_s,
                                                 max_idle=MAX_IDLE_PER_HUB, idle_reuse_s=IDLE_REUSE_S),
                   seed=affinity.seed_of(address))

    async def release(self, hub: Hub, conn: ClientConnection) -> None:
        """Keep the connection for the next request while the hub is up and still listed."""
        await hub.pool.release(conn, keep=hub.up and self.hubs.get(hub.address) is hub)
