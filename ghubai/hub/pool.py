"""The hub's view of its workers and the scheduler that hands requests to them.

A request takes a slot on a worker that hosts its model and whose engine serves its API: with the
``llm-aware`` policy, one that holds the model in memory, then the one that last served its
conversation (while not much busier than the rest), then the least loaded (lowest inflight /
max_concurrency / weight); with ``least-loaded``, only the last (see ``_pick``). When every such
worker is full it waits in a bounded queue: first in, first out per model (a request back from a
refusal or a failed attempt at the head), ``queue_size`` for the whole hub, ``queue_timeout_s`` at
most. When a slot may
have freed, the head of the model's queue is woken; a waiter that cannot use it passes the wake-up to
the one behind while a slot is still free, so a release or an arrival costs a pick or two however long
the queue.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import trio

from ghubai import affinity, dialects, protocol
from ghubai.config import HubLimits, SchedulerConfig
from ghubai.errors import ApiError, model_not_found

log = logging.getLogger("ghubai.hub")

DEMAND_WINDOW_S = 60.0  # how fast the memory of a model's requests fades (an exponential decay)
STILL_ASKED = 0.1  # a demand at least this: a request within the last 2.3 min (a decayed one stays above 0 for hours)


Answer = protocol.Chunk | protocol.End | protocol.Error  # what a worker says about one request


@dataclass(eq=False)
class RemoteWorker:
    """A worker linked to this hub. Frames to it go through ``out`` (one writer task per link);
    frames from it about a request go to that request's channel in ``pending``. Invariant: a request
    holds one of this hub's ``inflight`` slots exactly while its id is in ``pending``, and whoever
    takes it out of ``pending`` gives the slot back (``Pool.release``)."""
    id: str
    name: str
    models: frozenset[str]
    max_concurrency: int  # its slots for this hub: what it claimed, or less (limits.max_worker_concurrency)
    engine: str
    out: trio.MemorySendChannel[str | bytes]
    inflight: int = 0  # requests this hub runs on the worker
    reported: int = 0  # requests the worker says it runs, for every hub it serves
    pending: dict[str, trio.MemorySendChannel[Answer]] = field(default_factory=dict)
    unacked: dict[str, int] = field(default_factory=dict)  # bytes of each answer sent past the credit given
    last_seen: float = 0.0  # trio time of its last frame: the heartbeat an operator can check
    last_pong: float = -math.inf  # when this hub last answered its ping (a pong per quarter heartbeat at most)
    pong_heard: float = 0.0  # trio time it last answered the hub's ping (its link's start before: ``link.deafness``)
    chunk_heard: float = -math.inf  # trio time its last chunk came (a pong may wait behind its answers)
    link_scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    draining: bool = False  # the worker is shutting down: it finishes its requests but takes no new one
    usage: Counter[str] = field(default_factory=Counter)  # prompt/completion tokens it produced for this hub
    token: bytes = b""  # digest of the provider token it joined with, so that revoking it ends the link
    apis: frozenset[str] | None = None  # the APIs its engine serves; None: all (it did not say)
    loaded: frozenset[str] | None = None  # the models its engine holds in memory; None: it cannot tell
    problem: str = ""  # why its engine lists no model, as the worker put it
    weight: float = 1.0  # its share of load against the others (a faster GPU: more)
    version: str = ""  # its GhubAi release, as its hello said: which workers a rolling upgrade has reached
    peer: str = ""  # the address its link came from (two links may claim one name and id: which is which)
    # models in ``loaded`` only because requests were sent here to load them: how many still await a first byte
    loading: Counter[str] = field(default_factory=Counter)
    evicting: dict[str, str] = field(default_factory=dict)  # a model in ``loading`` -> the one its load evicts
    room: int = 0  # the most models its engine was seen to hold at once
    full: int = 0  # how many it held when it was seen to evict one for a load: its limit (0: never seen)
    said: frozenset[str] = frozenset()  # the models its engine said it held, in its last report
    peak: frozenset[str] = frozenset()  # what it held when a report last showed a model come in
    used: dict[str, float] = field(default_factory=dict)  # model -> trio time the hub last sent it a request for it
    slots: int = 0  # the slots it claimed, which ``reported`` counts against (0: max_concurrency)
    gone: bool = False  # its link is gone (``Pool.drop``)
    seed: int = 0  # from its name: its place in the order a conversation's key picks from (``Pool._able``)
    facts: dict[str, protocol.ModelFacts] = field(default_factory=dict)  # what its engine tells of its models

    def __post_init__(self) -> None:
        self.slots = self.slots or self.max_concurrency
        self.seed = affinity.seed_of(self.name)

    def serves(self, api: str) -> bool:
        return self.apis is None or api in self.apis

    def warm(self, model: str) -> bool:
        """The engine holds ``model`` in memory (or cannot tell, and then every model counts)."""
        return self.loaded is None or model in self.loaded

    @property
    def key(self) -> tuple[bytes, str]:
        return self.token, self.id

    @property
    def busy(self) -> int:
        """Slots taken: this hub's own count, or the worker's when other hubs use it too."""
        return max(self.inflight, self.reported)

    @property
    def share(self) -> float:
        """What it takes of the load, against the others: its slots by its weight."""
        return self.max_concurrency * self.weight

    @property
    def load(self) -> float:
        """Slots taken, as a share of its slots and over its weight: what the scheduler compares."""
        busy = self.inflight if self.inflight > self.reported else self.reported  # self.busy, inlined: hot
        return busy / (self.max_concurrency * self.weight)

    @property
    def pick_order(self) -> tuple[float, float]:
        """Least ``load`` first, and among equal loads the largest ``share``: idle workers tied at 0
        whatever their weights, and a lone client's requests all went to the first by name."""
        return self.load, -self.share

    def send(self, frame: protocol.Frame | str) -> None:
        """A frame, or one already encoded."""
        try:
            self.out.send_nowait(frame if isinstance(frame, str) else protocol.encode(frame))
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass  # link closing: Pool.drop() answers every pending request

    def deliver(self, frame: Answer) -> bool:
        """Hand a chunk/end/error frame to the request it belongs to, if it still waits; True when the
        frame ended that request. A worker that sends past its flow-control window (a slow client
        holds the answer here) ends that request: the hub's memory is not its to fill."""
        channel = self.pending.get(frame.id)
        if channel is None:
            return False  # a request that was cancelled or already failed over
        if isinstance(frame, protocol.Chunk):
            before = self.unacked.get(frame.id, 0)
            unacked = before + len(frame.data)
            # a record sent while none was unacknowledged is in the window at any size, as the worker
            # counts it (a worker of before MAX_CHUNK_BYTES sends a whole answer so: a batch of embeddings)
            if before and unacked > protocol.WINDOW_BYTES + protocol.MAX_CHUNK_BYTES:
                self.send(protocol.Cancel(frame.id))
                frame = protocol.Error(frame.id, 502, "the worker sent more than its flow-control window", False,
                                       by_hub=True)
            else:
                self.unacked[frame.id] = unacked
        ended = not isinstance(frame, protocol.Chunk)
        try:
            channel.send_nowait(frame)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            ended = True  # nobody reads it any more
        if ended:
            self.forget(frame.id)
        return ended

    def forget(self, request_id: str) -> bool:
        """The request is over for this hub: whether it was still pending."""
        self.unacked.pop(request_id, None)
        return self.pending.pop(request_id, None) is not None

    def credit(self, request_id: str, size: int) -> None:
        """``size`` more bytes of the request's answer reached its client: the worker may send as many."""
        self.send(protocol.Credit(request_id, size))
        if request_id in self.unacked:
            self.unacked[request_id] -= size

    def describe(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "models": sorted(self.models), "inflight": self.inflight,
                "busy": self.busy, "max_concurrency": self.max_concurrency, "engine": self.engine,
                "draining": self.draining,
                "usage": dict(self.usage), "last_seen_s": round(trio.current_time() - self.last_seen, 1),
                "apis": sorted(self.apis) if self.apis is not None else list(protocol.API_PATHS),
                "loaded": sorted(self.models if self.loaded is None else self.loaded), "problem": self.problem,
                "weight": self.weight, "version": self.version}


WORKERS_REMEMBERED = 4096  # workers whose token counts outlive their link (least recently linked forgotten)
TURNS_FORGOTTEN_S = 60.0  # a queue that forms after this long empty does not go by the last one's turns
RELINK_GRACE_S = 5.0  # a worker whose link broke dials again within 0.25-0.5 s, then 0.5-1 s, 1-2 s ...

# APIs that need no model in memory (a model's details): they go to the least loaded worker that
# hosts the model, and teach the scheduler nothing of what engines hold (Open WebUI asks before chats)
LOADS_NOTHING = frozenset({"ollama.show"})


class Conversation(NamedTuple):
    """A request's affinity keys: the one its worker is remembered by, and the one a new pick draws by."""
    key: int
    opening: int


class _Waiter:
    __slots__ = ("event", "back", "recheck")

    def __init__(self, back: bool) -> None:
        self.event = trio.Event()
        self.back = back  # a request back in line (refused, or retried): ahead of those that never left it
        self.recheck = False  # woken for a change of the workers only: to see if it has its answer now

    def turn(self) -> None:
        """Its turn to look for a worker."""
        self.recheck = False
        self.event.set()


class Pool:
    """This hub's workers and its queue. Invariant: a queue exists only while it holds a waiter, and
    ``queued`` is the sum of their lengths (at most ``limits.queue_size``)."""

    def __init__(self, limits: HubLimits, scheduler: SchedulerConfig = SchedulerConfig()) -> None:
        self.limits = limits
        self.scheduler = scheduler
        # affinity key -> the worker that served it last (by key: a worker that links again keeps it)
        self._conversations: OrderedDict[int, tuple[bytes, str]] = OrderedDict()
        self._demand: dict[str, tuple[float, float]] = {}  # model -> (requests, decayed; when last updated)
        self._able: dict[tuple[str, str], list[RemoteWorker]] = {}  # (model, api) -> who could serve it
        self._room = 0  # the most models any engine here was seen to hold at once (those gone too)
        self._models: list[str] | None = None
        self._offered: frozenset[str] | None = None
        self._served: frozenset[str] | None = None  # every linked worker's models (``serves``)
        self._loaded: list[str] | None = None
        self._facts: dict[str, protocol.ModelFacts] | None = None  # (``facts``)
        self._capacity: int | None = None
        self._top: float | None = None  # the largest share of a worker (``_top_share``)
        self.version = 0  # counts the changes of the workers and what they offer

        self.workers: dict[tuple[bytes, str], RemoteWorker] = {}  # by (provider token digest, worker id)
        self._queues: dict[str, deque[_Waiter]] = {}
        self.queued = 0
        self.held_back = False  # the last pick found a free slot but would not load its model there
        # the time between places freed in the queue while requests waited (smoothed), and when the
        # last was freed (or the queue began): when a full queue is likely to have a place again
        self._turn_s = 0.0
        self._turned_at = 0.0
        self._left: dict[str, float] = {}  # model -> when a worker of it last lost its link (``_returning``)
        self.draining = False  # the hub is shutting down: no new request gets a worker
        self.closing = trio.Event()  # drained: every link closes as the hub stops (``close_links``)
        self._links_closed = trio.Event()
        self.usage: dict[str, Counter[str]] = {}  # tokens per model, from the engines' own counts
        self._worker_usage: OrderedDict[tuple[bytes, str], Counter[str]] = OrderedDict()  # per worker, ever

    # -- membership ------------------------------------------------------------------------------

    def add(self, worker: RemoteWorker) -> RemoteWorker | None:
        """Register a worker; returns the stale link it replaces, if any: one with the same worker id
        that joined with the same provider token. Ids are per token, so whoever holds another token
        cannot evict a worker, nor squat its id while its link is down."""
        stale = self.workers.get(worker.key)
        # waiters for a model no linked worker lists (held for one that links again) may have their
        # answer now (a retry that must avoid it: a 503); for others a worker more changes no answer
        first_hosts = [model for model in self._queues if model in worker.models and not self.serves(model)]
        self.workers[worker.key] = worker
        # its tokens so far, across its links (a network blip must not start them again at nothing)
        worker.usage = self._worker_usage.setdefault(worker.key, worker.usage)
        self._worker_usage.move_to_end(worker.key)
        if len(self._worker_usage) > WORKERS_REMEMBERED:  # the longest gone (a linked one is never forgotten)
            for key in (key for key in self._worker_usage if key not in self.workers):
                del self._worker_usage[key]
                break
        self._residency(worker, worker.loaded)
        self._changed()
        log.info("worker %s (%s, GhubAi %s) joined from %s: %s, max_concurrency %d", worker.name, worker.id[:8],
                 worker.version or "?", worker.peer or "?", ", ".join(sorted(worker.models)) or "(no models)",
                 worker.max_concurrency)
        self._wake(worker.models)
        self._wake(first_hosts, every=True)
        return stale

    def remove(self, worker: RemoteWorker, why: str = "") -> None:
        if self.workers.get(worker.key) is worker:  # (not when its new link replaced it: nothing changed)
            del self.workers[worker.key]
            self._changed()
            log.info("worker %s (%s) left%s", worker.name, worker.id[:8], f": {why}" if why else "")
            self._wake(worker.models, every=True)  # requests for its models may now have no worker at all
        if self.closing.is_set() and not self.workers:
            self._links_closed.set()

    def set_offer(self, worker: RemoteWorker, offer: protocol.Hello | protocol.Models) -> None:
        """What the worker's engine offers, from its ``hello`` or a ``models`` frame."""
        models, apis = frozenset(offer.models), None if offer.apis is None else frozenset(offer.apis)
        if models != worker.models:
            log.info("worker %s (%s) models: %s", worker.name, worker.id[:8], ", ".join(offer.models) or "(none)")
        # what it hosts and serves changed: a waiter anywhere in a queue may have its answer now (a
        # frame that tells only of models in memory, every few seconds, is news for the head alone)
        hosting = (models, apis) != (worker.models, worker.apis)
        if models != worker.models:  # (an engine whose list churns, a gateway's, grew it without end: a hunt)
            worker.used = {model: at for model, at in worker.used.items() if model in models}
        worker.models, worker.apis = models, apis
        self._residency(worker, offer.loaded)
        worker.problem, worker.facts = offer.problem, offer.facts or {}
        if offer.max_concurrency is not None:
            worker.slots = offer.max_concurrency
            worker.max_concurrency = min(offer.max_concurrency, self.limits.max_worker_concurrency)
        self._changed()
        self._wake(self._queues, every=hosting)

    def _residency(self, worker: RemoteWorker, loaded: Any) -> None:
        """What the worker's engine said it holds in memory (None: it cannot tell), and what that
        teaches of how many models it can hold."""
        if loaded is None:
            worker.loaded, worker.said, worker.peak = None, frozenset(), frozenset()
            return
        said, before = frozenset(loaded), worker.said
        gone = before - said
        if gone and not (said - before) and not worker.loading and not worker.busy:
            worker.peak = said  # unloaded while it ran nothing (its keep-alive ended): not to make room
        worker.room = max(worker.room, len(said))
        if gone and worker.loading.keys() - said:  # gone while this hub's load is under way (Ollama
            worker.full = max(len(before), len(said) + 1)  # evicts first): its limit, seen (if lower now)
        elif said - before and worker.peak - said:  # one came in, one held then is gone: it made room
            worker.full = worker.room  # for it, at the most it was seen to hold (a guess from reports)
        elif len(said) > worker.full:
            worker.full = 0  # it holds more than that now (say, its operator raised the limit)
        if said - before:
            worker.peak = said
        worker.said = said
        # a load's victim the hub guessed, where the engine evicted another, is held still: as many
        # guesses are wrong as models went that no guess named (the oldest loads' first)
        unexplained = len(((worker.loaded or frozenset()) | before) - said - worker.loading.keys()
                          - set(worker.evicting.values()))
        for model in [model for model, victim in worker.evicting.items() if victim in said][:unexplained]:
            del worker.evicting[model]
        self._room = max(self._room, worker.room)
        for model in said:  # loads that ended: the engine's word is the truth about them now
            worker.loading.pop(model, None)
            worker.evicting.pop(model, None)
        # the engine's word, with the loads the hub sent that no request has seen end yet (a report
        # read while the engine was still loading one, or had not yet started, shows neither the
        # model loaded nor the one that load evicts)
        self._hold(worker, said - set(worker.evicting.values()) | worker.loading.keys())

    def loaded(self) -> list[str]:
        """The models some worker's engine holds in memory (all it lists, when it cannot tell); kept
        until the workers or what one holds change (a proxy's every health check asks)."""
        if self._loaded is None:
            self._loaded = sorted({model for worker in self.workers.values() if not worker.draining
                                   for model in (worker.models if worker.loaded is None else worker.loaded & worker.models)})
        return self._loaded

    def holding(self, model: str, api: str) -> list[RemoteWorker]:
        """The workers whose engines hold ``model`` in memory, as they last said, and take ``api``
        (where an unload goes; a draining one too: its engine keeps the model when it stops)."""
        return [worker for worker in self.workers.values() if worker.loaded is not None and model in worker.loaded
                and worker.serves(api)]

    def _hold(self, worker: RemoteWorker, loaded: frozenset[str] | set[str]) -> None:
        worker.loaded = frozenset(loaded)
        self._loaded = self._facts = None

    def _changed(self) -> None:
        """The workers, or what one offers, changed: what was derived from them is stale."""
        self._able.clear()
        self._models = self._loaded = self._offered = self._served = self._facts = None
        self._capacity = self._top = None
        self.version += 1

    def facts(self) -> dict[str, protocol.ModelFacts]:
        """What the engines told of the models their workers serve, for Ollama's clients: for each, the
        first worker's in the order of their names (an Ollama engine's before llama.cpp's), with the
        figures in memory of the first that holds it. (Kept until the workers or what one holds change:
        100 workers of 4,096 models take 90 ms.)"""
        if self._facts is not None:
            return self._facts
        told: dict[str, protocol.ModelFacts] = {}
        held: dict[str, protocol.ModelFacts] = {}
        for worker in sorted(self.workers.values(), key=lambda worker: worker.name):
            for model, facts in worker.facts.items():
                if model in worker.models and not worker.draining:
                    told[model] = told[model].fuller(facts) if model in told else facts
                    if facts.memory and worker.warm(model):
                        held.setdefault(model, facts)
        self._facts = {model: facts if (memory := held.get(model)) is None else facts.held(memory)
                       for model, facts in told.items()}
        return self._facts

    def models(self) -> list[str]:
        """Every model a worker that is not draining serves (kept until the workers change)."""
        if self._models is None:
            self._models = sorted({model for worker in self.workers.values() if not worker.draining
                                   for model in worker.models})
        return self._models

    def offers(self, model: str) -> bool:
        """A worker that is not draining serves ``model``: ``models()`` as a set, for a lookup per request."""
        if self._offered is None:
            self._offered = frozenset(self.models())
        return model in self._offered

    def capacity(self) -> int:
        """The slots of the workers that take requests (kept until the workers change)."""
        if self._capacity is None:
            self._capacity = sum(worker.max_concurrency for worker in self.workers.values() if not worker.draining)
        return self._capacity

    def named(self, model: str) -> str:
        """The name the grid serves ``model`` under (``dialects.tagged``): as the workers that take
        requests serve it, else as any does (the model of a worker that drains is a 503, not a 404),
        else as a worker whose link broke did: its requests wait for it under that name; else, letter
        case aside, as one worker lists it (``dialects.folded``)."""
        name = dialects.tagged(model, self.offers)
        if self.offers(name) or self.serves(name := dialects.tagged(model, self.serves)):
            return name
        name = dialects.tagged(model, lambda tagged: self._returning(tagged) is not None)
        if self._returning(name) is not None:
            return name
        return dialects.folded(model, self._served or frozenset()) or name

    def serves(self, model: str) -> bool:
        """Some linked worker lists ``model``, draining or not (kept until the workers change: every
        request's metrics ask, and a hub may have a thousand workers)."""
        if self._served is None:
            self._served = frozenset().union(*(worker.models for worker in self.workers.values()))
        return model in self._served

    def awaits(self, model: str) -> bool:
        """A request for ``model`` would be served here, or wait for a worker that lists it (one that
        drains, or whose link broke moments ago: a restart): what a lookup of the model answers 200 for,
        though the lists leave it out meanwhile."""
        name = self.named(model)
        return self.serves(name) or self._returning(name) is not None

    def set_draining(self, worker: RemoteWorker) -> None:
        worker.draining = True
        self._changed()
        log.info("worker %s (%s) is draining", worker.name, worker.id[:8])
        self._wake(self._queues, every=True)  # (requests waiting for it wait on: for its return, as after a crash)

    def drain(self) -> None:
        """The hub is shutting down: every queued request, and any later one, is refused with 503."""
        self.draining = True
        self._wake(self._queues)

    async def close_links(self, timeout_s: float) -> None:
        """After a drain: each link closes saying the hub is going away (its handler hears ``closing``),
        so that its worker reconnects without taking the hub's stop for a failure; ``timeout_s`` at most."""
        self.closing.set()
        if self.workers:
            with trio.move_on_after(timeout_s):
                await self._links_closed.wait()

    # -- scheduling ------------------------------------------------------------------------------

    def _pick(self, model: str, api: str, exclude: set[str], conversation: Conversation | None,
              cold_ok: bool = True) -> RemoteWorker | None:
        """A worker with a free slot that hosts ``model`` and serves ``api``, or None.

        ``least-loaded``: the lowest ``load``. ``llm-aware``: a worker that holds the model in memory
        — the one that served the conversation last while it is at most ``affinity_margin`` above the
        least loaded, else one the conversation's key picks within that bound, else (no key) the
        least loaded — unless even the least loaded of them is more than ``affinity_margin``
        above a worker whose engine has room for the model (``_spare``): then that one.
        When no worker that holds the model has a free slot, one that must load it, if the load is
        worth it (``_worth_loading``) or ``cold_ok`` (the request waited ``warm_wait_s``): the one
        whose eviction costs least (``_coldest``)."""
        able = self._able.get((model, api))
        if able is None:  # kept until the workers or what they offer change: a pick is one pass over it
            # in the order of their names' seeds, not of their links: a conversation's key then picks the
            # same worker after a hub restarts, at another hub, and when the worker's process restarts
            able = sorted((worker for worker in self.workers.values()
                           if model in worker.models and not worker.draining and worker.serves(api)),
                          key=lambda worker: worker.seed)
            if able:  # an unknown model's empty answer is not kept: clients choose those names
                self._able[(model, api)] = able
        free = [worker for worker in able if worker.inflight < worker.max_concurrency
                and worker.reported < worker.slots and not (exclude and worker.id in exclude)]
        if not free:
            return None
        if self.scheduler.policy == "least-loaded" or api in LOADS_NOTHING:
            best = min(free, key=lambda worker: worker.pick_order)
        elif (chosen := self._llm_aware(model, [worker for worker in able if worker.id not in exclude] if exclude
                                        else able, free, conversation, cold_ok)) is not None:
            best = chosen
        else:
            return None
        if api not in LOADS_NOTHING:
            if model in best.loading:
                best.loading[model] += 1
            best.used[model] = trio.current_time()
        best.inflight += 1
        best.reported += 1  # until the worker's next load report says otherwise
        return best

    def _coldest(self, free: list[RemoteWorker]) -> tuple[RemoteWorker, float, str | None]:
        """The worker whose engine would lose the least by loading another model, that loss, and
        the model it would evict: none while it has room (``_has_room``); else one it holds, which
        the hub guesses is the one it sent a request least recently (Ollama evicts an idle model; a
        report that shows another gone corrects the guess), and it loses the demand for that model
        if no other engine holds it."""
        copies = Counter(held for worker in self.workers.values() if worker.loaded for held in worker.loaded)
        now = trio.current_time()

        def loss(worker: RemoteWorker) -> tuple[float, str | None]:
            held = worker.loaded or frozenset()
            if self._has_room(worker):
                return 0.0, None  # the engine evicts nothing
            evicted = min(held, key=lambda model: worker.used.get(model, -math.inf))
            return (self._demand_of(evicted, now) if copies[evicted] == 1 else 0.0), evicted

        costs = [(*loss(worker), worker.pick_order, index) for index, worker in enumerate(free)]
        lost, evicted, _, index = min(costs, key=lambda cost: (cost[0], cost[1] is not None, cost[2], cost[3]))
        return free[index], lost, evicted

    def _spare(self, free: list[RemoteWorker], below: float) -> RemoteWorker | None:
        """A worker whose engine has room for another model and whose load is below ``below``:
        where the warm workers, busier than that by more than ``affinity_margin``, spread to. (Not
        one that would evict a model, even one held elsewhere too: that copy was serving, and the
        bursts of a few clients would make models chase each other round the engines — measured.)"""
        roomy = [worker for worker in free if worker.load < below and self._has_room(worker)]
        return min(roomy, key=lambda worker: worker.pick_order) if roomy else None

    def _has_room(self, worker: RemoteWorker) -> bool:
        """Its engine can load another model without evicting one: it holds fewer than it held when
        it was seen to evict one (``full``), or, until it has been, than any engine here was seen to
        hold (the engines of a grid tend to be alike; one that is not shows it with one eviction)."""
        held = len(worker.loaded or ())
        return held == 0 or held < (worker.full or max(worker.room, self._room))

    def _worth_loading(self, model: str, able: list[RemoteWorker]) -> bool:
        """Whether to load ``model`` on another engine now rather than wait for a slot on those that
        hold it (all full): when none does, or when its queue outgrows their slots. (Not merely
        because they are full for a moment, often of another model: a copy made then evicts a
        model still asked for, and the loads cascade — measured, the mixed-model benchmark's loads
        went from 23–36 to 6 without it.)"""
        warm = [worker for worker in able if worker.warm(model)]
        return not warm or len(self._queues.get(model, ())) > sum(worker.max_concurrency for worker in warm)

    def _demand_of(self, model: str, now: float) -> float:
        value, when = self._demand.get(model, (0.0, now))
        return value * math.exp((when - now) / DEMAND_WINDOW_S)

    def _note_demand(self, model: str) -> None:
        now = trio.current_time()
        self._demand[model] = (self._demand_of(model, now) + 1.0, now)
        if len(self._demand) > 2 * len(self.models()) + 64:  # models no worker serves any more go (a hunt:
            self._demand = {name: value for name, value in self._demand.items() if self.offers(name)}  # no end)

    def _llm_aware(self, model: str, able: list[RemoteWorker], free: list[RemoteWorker],
                   conversation: Conversation | None, cold_ok: bool) -> RemoteWorker | None:
        warm = [worker for worker in free if worker.loaded is None or model in worker.loaded]  # warm(), inlined
        margin = self.scheduler.affinity_margin
        if warm:
            loads = [worker.load for worker in warm]  # once: this is the hot loop with a thousand workers
            least = min(loads)
            spare = self._spare(free, least - margin) if least > margin else None
            if spare is None:
                return self._for_conversation(warm, loads, least, conversation) if conversation is not None else \
                    min(warm, key=lambda worker: worker.pick_order)
            best, evicted = spare, None
        else:
            if not cold_ok and not self._worth_loading(model, able):
                self.held_back = True
                return None  # a slot where the model is in memory frees sooner than a load ends
            best, lost, evicted = self._coldest(free)
            # a queue that outgrew its model's warm slots makes another copy only where that costs no
            # other model its last one still asked for: that model's next request would load it back,
            # evicting a copy of this one, and round again (12 clients of one model and one of another
            # on two engines: 20 loads in 5 s, 2 without)
            if lost >= STILL_ASKED and not cold_ok and any(worker.warm(model) for worker in able):
                self.held_back = True
                return None
        if best.loaded is not None:  # it holds the model from now on (the requests for it that follow
            # wait for this load instead of starting others), and not the one it evicts: when the
            # engine is known to be full, or when another holds that model too (a wrong guess then
            # costs nothing; one that sent a model's requests to load it anew elsewhere would)
            if evicted is not None and (best.full and len(best.loaded) >= best.full or any(
                    evicted in (worker.loaded or ()) for worker in self.workers.values() if worker is not best)):
                self._hold(best, best.loaded - {evicted})
                best.evicting[model] = evicted
            self._hold(best, best.loaded | {model})
            best.loading[model] += 0  # counted with the others that wait for it, in _pick
        if conversation is not None:
            self._remember(conversation.key, best)
        return best

    def _for_conversation(self, free: list[RemoteWorker], loads: list[float], least: float,
                          conversation: Conversation) -> RemoteWorker:
        """The conversation's last worker while within the bound; else, for a new conversation or
        one that must move, the one its key picks among those within it (spread by the key): by its
        opening's key when this hub knows of no worker it went to (after a restart of the hub or of
        the worker), which is the key its first turn was placed by, here and at every other hub."""
        bound = least + self.scheduler.affinity_margin
        last = self.workers.get(self._conversations.get(conversation.key, (b"", "")))
        if last is not None and last in free and last.load <= bound:
            chosen = last
        else:  # one the key picks within the bound, each as likely as its share (slots by weight)
            within = [worker for worker, load in zip(free, loads) if load <= bound]
            key = conversation.key if last is not None else conversation.opening
            top = self._top_share()
            for draw in range(0, 64, 2):  # kept with probability share / top, else drawn again: O(1) for alike workers
                chosen = within[affinity.score(key, draw) % len(within)]
                if affinity.score(key, draw + 1) * top < chosen.share * 2 ** 64:
                    break
        self._remember(conversation.key, chosen)
        return chosen

    def _top_share(self) -> float:
        """The largest share of any worker (kept until the workers change)."""
        if self._top is None:
            self._top = max((worker.share for worker in self.workers.values()), default=1.0)
        return self._top

    def _remember(self, conversation: int, worker: RemoteWorker) -> None:
        self._conversations[conversation] = worker.key
        self._conversations.move_to_end(conversation)
        while len(self._conversations) > self.scheduler.affinity_entries:
            self._conversations.popitem(last=False)

    def served(self, worker: RemoteWorker, model: str, api: str) -> None:
        """The worker answered for ``model``: its engine holds it now (until its next report says)."""
        if api in LOADS_NOTHING:
            return
        worker.loading.pop(model, None)
        worker.evicting.pop(model, None)
        if worker.loaded is not None and model not in worker.loaded:
            self._hold(worker, worker.loaded | {model})

    def not_served(self, worker: RemoteWorker, model: str, api: str) -> None:
        """The worker failed a request before its first byte: once every request sent to await a
        load the hub supposed has failed so, the load did not happen."""
        if model in worker.loading and api not in LOADS_NOTHING:
            worker.loading[model] -= 1
            if worker.loading[model] <= 0:
                del worker.loading[model]
                evicted = worker.evicting.pop(model, None)
                if worker.loaded is not None:  # back to what its engine last said of these two
                    self._hold(worker, worker.loaded - ({model} - worker.said))
                    if evicted in worker.said:
                        self._hold(worker, worker.loaded | {evicted})

    def _returning(self, model: str) -> float | None:
        """Until when the workers of ``model`` whose links broke may link again (``RELINK_GRACE_S``
        after the last left), or None."""
        left = self._left.get(model)
        if left is None or trio.current_time() >= left + RELINK_GRACE_S:
            return None
        return left + RELINK_GRACE_S

    def _check_hosted(self, model: str, api: str, exclude: set[str], elsewhere: bool = False) -> None:
        """Raise the answer a request gets when no worker could ever take it. While a worker of the
        model whose link broke may link again (a restart, a network blip), or one drains (most often
        a restart: ``systemctl restart``), it waits, queued, rather than get a 404 its client takes
        for good or a 503 a crash would have spared it; unless it could go ``elsewhere`` (another
        hub, its proxy says), where it goes at once with a 503."""
        if self.draining:
            raise ApiError(503, "This hub is shutting down; try another", retry_after=1)
        hosting = [worker for worker in self.workers.values() if model in worker.models]
        if not hosting and self._returning(model) is not None:
            if elsewhere:
                raise ApiError(503, f"No worker serves '{model}' right now", retry_after=1,
                               extra_headers=dialects.SENT_ON)
            return
        if not hosting:
            if not self.workers:
                raise ApiError(503, "No worker is connected to this hub", retry_after=1)
            if all(worker.problem for worker in self.workers.values()):  # none could say: not the client's typo
                said = "; ".join(f"worker {worker.name}: {worker.problem}" for worker in list(self.workers.values())[:3])
                raise ApiError(502, f"No worker can list its engine's models ({said})", code="engine_unavailable")
            raise model_not_found(model)
        serving = [worker for worker in hosting if worker.serves(api)]
        if not serving:
            raise ApiError(501, f"No worker serves POST {protocol.API_PATHS.get(api, api)} for model '{model}': "
                           "its engines lack that API", code="api_not_served")
        if all(worker.draining or worker.id in exclude for worker in serving):
            waits = any(worker.draining for worker in serving)  # for one of them, back after its restart
            if elsewhere and waits:
                raise ApiError(503, f"No other worker serves '{model}' right now", retry_after=1,
                               extra_headers=dialects.SENT_ON)
            if not waits:
                raise ApiError(503, f"No other worker serves '{model}' right now", retry_after=1)

    async def acquire(self, model: str, api: str, exclude: set[str], deadline: float,
                      conversation: int | None = None, again: bool = False, elsewhere: bool = False,
                      opening: int | None = None, only: RemoteWorker | None = None) -> RemoteWorker:
        """A slot on a worker that hosts ``model`` and serves ``api`` (``_pick``), waiting in the
        queue until ``deadline``; ``conversation``: the request's affinity key, if it has one, and
        ``opening`` its opening's: where a conversation not remembered yet went before, and what a
        turn is placed by when no worker is known for it (``_for_conversation``). A
        request takes a worker that must load its model only when those that hold it have too few
        slots for the queue, or after ``warm_wait_s`` in the queue. A request back ``again`` (a
        refusal, a retry) keeps its place at the head of the line; one whose time is up gets a free
        slot if there is one, cold or not, and else its 503 without queueing. ``only``: that worker,
        at once, whatever its slots, and nothing asked of its model (an unload, which its worker takes
        busy or draining: one that waited for a slot behind long answers got a 503, the model loaded)."""
        if only is not None:  # an unload, which generates nothing: on its worker at once, busy or draining
            if self.draining:
                raise ApiError(503, "This hub is shutting down; try another", retry_after=1)
            if self.workers.get(only.key) is not only or only.id in exclude:
                raise ApiError(503, f"Worker {only.name} is gone", retry_after=1)
            only.inflight += 1
            only.reported += 1  # (as ``_pick`` counts a slot, given back as ``release`` gives it)
            return only
        if model in self.models() and api not in LOADS_NOTHING:  # (a name a client made up is not remembered)
            self._note_demand(model)
        if opening is not None and conversation is not None and conversation not in self._conversations and \
                (first := self._conversations.get(opening)) is not None:
            self._conversations[conversation] = first  # the turn that first carries the model's answer
            if len(self._conversations) > self.scheduler.affinity_entries:  # (its request may fail: trimmed here too)
                self._conversations.popitem(last=False)
        keys = None if conversation is None else \
            Conversation(conversation, conversation if opening is None else opening)
        now = trio.current_time()
        late = deadline <= now
        # at most half the time it may queue: a warm wait must not end in a 503 beside an idle worker
        cold_at = now + min(self.scheduler.warm_wait_s, (deadline - now) / 2)
        line = self._queues.get(model)
        if not self.draining and (again or late or api in LOADS_NOTHING or not line) and \
                (worker := self._pick(model, api, exclude, keys, cold_ok=cold_at <= now)):
            if line and self._slot_free(model):  # it may have made a cold worker warm for those in line
                line[0].turn()
            return worker
        self._check_hosted(model, api, exclude, elsewhere)
        if late:
            raise self.no_slot(model)
        if self.queued >= self.limits.queue_size and not again:  # (one back in line had its place)
            # a free slot no one in line was told of is one none of them can use (a retry that must
            # avoid it, another API): it is this request's, rather than a 429 beside it
            if line and not self.draining and self._slot_free(model) and \
                    not any(ahead.event.is_set() for ahead in line) and \
                    (worker := self._pick(model, api, exclude, keys, cold_ok=cold_at <= now)):
                return worker
            raise self._queue_full()
        queue = self._queues.setdefault(model, deque())
        waiter = _Waiter(again)
        if again:  # behind those back before it: they came first
            queue.insert(next((place for place, ahead in enumerate(queue) if not ahead.back), len(queue)), waiter)
        else:
            queue.append(waiter)
        if not self.queued:  # the queue's first turn is counted from here; one of long ago is forgotten
            self._turn_s = self._turn_s if now - self._turned_at < TURNS_FORGOTTEN_S else 0.0
            self._turned_at = now
        self.queued += 1
        if self._slot_free(model):  # those ahead may be waiting for workers they cannot use: a free slot is ours
            queue[0].turn()
        try:
            cold_ok = False
            with trio.fail_at(deadline):
                while True:
                    # a look at cold workers too once the warm wait is over, and at the end of a grace
                    # for workers that may link again
                    with trio.move_on_at(min(math.inf if cold_ok else cold_at, self._returning(model) or math.inf)):
                        await waiter.event.wait()
                    waiter.event = trio.Event()
                    if waiter.recheck and queue[0] is not waiter:  # the workers changed, its turn has not come
                        waiter.recheck = False
                        self._check_hosted(model, api, exclude, elsewhere)
                        continue
                    cold_ok = trio.current_time() >= cold_at
                    self.held_back = False
                    if not self.draining and (worker := self._pick(model, api, exclude, keys, cold_ok)):
                        return worker
                    self._check_hosted(model, api, exclude, elsewhere)
                    # Nothing here for this waiter (say, a retry that must avoid the free worker):
                    # pass the wake-up on, so first in line is first served among those who can be;
                    # not when the free slot is one it would not load the model on (unless it avoids a
                    # worker, which those behind may take): nor would they
                    if self._slot_free(model) and not (self.held_back and not exclude) and \
                            (position := queue.index(waiter)) + 1 < len(queue):
                        queue[position + 1].turn()
        except trio.TooSlowError:
            raise self.no_slot(model) from None
        finally:
            queue.remove(waiter)
            self.queued -= 1
            if not waiter.back:  # a place freed (one back in line had no place of its own)
                now = trio.current_time()
                self._turn_s += (now - self._turned_at - self._turn_s) / 8 if self._turn_s else now - self._turned_at
                self._turned_at = now
            if not queue:
                del self._queues[model]
            else:
                queue[0].turn()

    def _slot_free(self, model: str) -> bool:
        """Some worker of ``model`` has a free slot: only then is a wake-up worth passing down its
        queue (each waiter it reaches tries a pick: passed on with none free, every release and every
        arrival walked the whole queue, 0.3 s of CPU at 5,000 waiting)."""
        return any(worker.inflight < worker.max_concurrency and worker.reported < worker.slots
                   for worker in self.workers.values() if model in worker.models and not worker.draining)

    def _queue_full(self) -> ApiError:
        """A 429 whose ``Retry-After`` is about when the queue has a place again: the time between
        places freed while requests waited, served or not, smoothed over about 8 (at 1 s, clients of
        a grid whose answers take 4 s on 2 slots came back too early, three times over the openai
        SDK's two retries, and failed). A turn that takes longer than those before (or the first) is
        at least as long as it took so far. With no queue (``queue_size = 0``) a second, as before."""
        turn = 0.0
        if self.queued and self.limits.queue_size:
            turn = min(max(self._turn_s, trio.current_time() - self._turned_at), 60.0)
        return ApiError(429, "The hub's queue is full; try again shortly", code="queue_full",
                        retry_after=max(1, math.ceil(turn)))

    def no_slot(self, model: str) -> ApiError:
        # (with no queue time, none was waited: another hub may well have a free slot)
        return ApiError(503, f"No worker for '{model}' was free within {self.limits.queue_timeout_s:g} s",
                        retry_after=min(60, max(1, math.ceil(self.limits.queue_timeout_s / 10))),
                        extra_headers=dialects.WAITED if self.limits.queue_timeout_s > 0 else None)

    def release(self, worker: RemoteWorker, sent: bool = True) -> None:
        """A slot back; one a request took but never sent (refused before it left) is no load the
        worker will report back either."""
        worker.inflight -= 1
        if not sent:
            worker.reported = max(0, worker.reported - 1)
        self._wake(worker.models)

    def queue_lengths(self) -> dict[str, int]:
        return {model: len(queue) for model, queue in self._queues.items()}

    def count_usage(self, worker: RemoteWorker, model: str, usage: dict[str, int]) -> None:
        worker.usage.update(usage)
        self.usage.setdefault(model, Counter()).update(usage)

    def deliver(self, worker: RemoteWorker, frame: Answer) -> None:
        """A frame about a request; its end frees the slot at once, however slowly the client reads.
        A refusal for want of a slot (other hubs filled it) marks the worker full until it reports,
        here, in the order of the worker's frames: noted later by the request's task, it would undo
        a ``load`` that came after it and leave a free worker unused until its next heartbeat."""
        if isinstance(frame, protocol.Error) and frame.busy and frame.id in worker.pending:
            worker.reported = worker.slots
        if worker.deliver(frame):
            self.release(worker)

    def drop(self, worker: RemoteWorker, message: str, why: str = "") -> None:
        """The worker's link is gone: out of the pool, and every request on it gets a retryable error
        (one it may retry on this very worker, should it link again: the link failed, not its engine).
        Requests for its models wait ``RELINK_GRACE_S`` for it, should it be their last host. ``why``: how
        its link ended, for the log line."""
        worker.gone = True
        now = trio.current_time()
        self._left = {model: left for model, left in self._left.items() if now < left + RELINK_GRACE_S}
        self._left.update(dict.fromkeys(worker.models, now))
        self.remove(worker, why)
        for request_id in list(worker.pending):
            self.fail(worker, request_id, 502, message, retryable=True)

    def cut(self, worker: RemoteWorker, message: str) -> None:
        """End the worker's link, its requests failed over first: the link's writer may sit in a
        socket write that cannot be cancelled (hypercorn's), to a peer that stopped reading, and its
        handler waits for it before it could drop the worker itself."""
        self.drop(worker, message)
        worker.link_scope.cancel()

    def fail(self, worker: RemoteWorker, request_id: str, status: int, message: str, retryable: bool) -> None:
        """End a request as if its worker had answered with this error (the hub decided it)."""
        self.deliver(worker, protocol.Error(request_id, status, message, retryable, by_hub=True))

    def report(self, worker: RemoteWorker, inflight: int) -> None:
        """The worker's own count of running requests (``load``, ``ping``, ``pong`` frames)."""
        freed = inflight < worker.reported
        worker.reported = inflight
        if freed:
            self._wake(worker.models)

    def _wake(self, models: Any, every: bool = False) -> None:
        """Tell the head of each of these models' queues to look again: a walk of the shorter of the
        two (a worker may list 4,096 models, and report its load as often as it likes). ``every``:
        each waiter, not the head alone, when the workers changed (rare): one behind the head may now
        have an answer at once (its API's last worker gone, a proxy's request to send elsewhere)
        that a free slot alone would not pass down to it; it looks for that answer only, and waits
        on for its turn (all woken to pick at once, they were served in the order trio ran them)."""
        queues = self._queues
        if not queues:
            return
        for model in list(models) if len(models) <= len(queues) else [model for model in queues if model in models]:
            if queue := queues.get(model):
                queue[0].turn()
                for waiter in itertools.islice(queue, 1, None) if every else ():
                    if not waiter.event.is_set():  # (a turn it was given stays a turn)
                        waiter.recheck = True
                        waiter.event.set()
