"""Where the scheduler loads models, replayed on trio's fake clock: the hub's ``Pool`` against
engines with memory written here as the simulator's ``--max-loaded``/``--load-ms`` behave (a load
at a time, the least recently used idle model evicted), reporting what they hold as a worker does
(every 2 s, and right after a request for a model that was not in memory). A whole mixed-model
workload takes milliseconds, so its outcome can be checked over many seeds, where the benchmark
(``scripts/bench_routing.py``) takes a minute a run."""

from __future__ import annotations

import math
import random
from collections import Counter, OrderedDict

import trio
import trio.testing

from ghubai import protocol
from ghubai.config import HubConfig, HubLimits, SchedulerConfig
from ghubai.hub.exchange import Exchange
from ghubai.hub.pool import Pool, RemoteWorker

MODELS = tuple(f"model-{index}" for index in range(6))
POPULARITY = [1 / (rank + 1) ** 1.2 for rank in range(len(MODELS))]  # Zipf, as in the benchmark
LOAD_S, ANSWER_S, REPORT_S = 0.5, 0.1, 2.0


class Engine:
    """An engine that holds ``limit`` models: a load takes ``LOAD_S`` (one at a time); a model
    that runs a generation is never evicted, the least recently used idle one is."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.resident: OrderedDict[str, None] = OrderedDict()
        self.running: Counter[str] = Counter()
        self.loading = trio.Lock()
        self.ended = trio.Event()  # set (and replaced) whenever a generation ends
        self.loads = 0

    async def make_resident(self, model: str) -> None:
        async with self.loading:
            while model not in self.resident:
                if len(self.resident) < self.limit:
                    await trio.sleep(LOAD_S)
                    self.resident[model] = None
                    self.loads += 1
                elif (idle := next((held for held in self.resident if not self.running[held]), None)) is None:
                    await self.ended.wait()  # every model it holds is generating: wait for one to end
                else:
                    del self.resident[idle]
        self.resident.move_to_end(model)


class Grid:
    """Workers of ``slots`` slots on engines of ``limit`` models, linked to one hub's pool."""

    def __init__(self, policy: str, workers: int = 4, slots: int = 4, limit: int = 2) -> None:
        self.pool = Pool(HubLimits(queue_size=256, queue_timeout_s=120), SchedulerConfig(policy=policy))
        self.engines: dict[str, Engine] = {}
        self.cold: dict[str, trio.Event] = {}
        for index in range(workers):
            worker = RemoteWorker(id=f"gpu-{index}", name=f"gpu-{index}", models=frozenset(MODELS),
                                  max_concurrency=slots, engine="ollama",
                                  out=trio.open_memory_channel[str | bytes](math.inf)[0], loaded=frozenset())
            self.pool.add(worker)
            self.engines[worker.id], self.cold[worker.id] = Engine(limit), trio.Event()

    async def report(self, worker: RemoteWorker) -> None:
        """The worker's residency loop: what its engine holds, on a timer and after a cold request."""
        while True:
            with trio.move_on_after(REPORT_S):
                await self.cold[worker.id].wait()
            self.cold[worker.id] = trio.Event()
            await trio.sleep(0.001)  # the engine's /api/ps answer on its way
            self.pool.set_offer(worker, protocol.Models(MODELS, loaded=tuple(self.engines[worker.id].resident)))

    async def ask(self, model: str) -> None:
        """One request, as the hub's exchange and the worker run it."""
        worker = await self.pool.acquire(model, "openai.chat", set(), trio.current_time() + 120)
        engine = self.engines[worker.id]
        cold = model not in engine.resident
        await engine.make_resident(model)
        engine.running[model] += 1
        self.pool.served(worker, model, "openai.chat")  # the first token
        if cold:
            self.cold[worker.id].set()
        await trio.sleep(ANSWER_S)
        engine.running[model] -= 1
        engine.ended.set()
        engine.ended = trio.Event()
        self.pool.release(worker)
        self.pool.report(worker, worker.inflight)

    async def mixed_models(self, seed: int, clients: int = 8, requests: int = 240) -> int:
        """The benchmark's mixed-model workload; the model loads it took."""
        async def client(rng: random.Random) -> None:
            for _ in range(requests // clients):
                await self.ask(rng.choices(MODELS, POPULARITY)[0])

        async with trio.open_nursery() as reporters:
            for worker in self.pool.workers.values():
                reporters.start_soon(self.report, worker)
            async with trio.open_nursery() as nursery:
                for index in range(clients):
                    nursery.start_soon(client, random.Random(seed * 100 + index))
            reporters.cancel_scope.cancel()
        return sum(engine.loads for engine in self.engines.values())


    async def busy_and_light(self, busy: int, light: int, seconds: float = 5.0) -> tuple[int, int]:
        """``busy`` clients of one model and ``light`` of another, each asking again as soon as it is
        answered, for ``seconds``: the model loads it took, and the light model's answers."""
        answered = 0
        deadline = trio.current_time() + seconds

        async def client(model: str) -> None:
            nonlocal answered
            while trio.current_time() < deadline:
                await self.ask(model)
                answered += model == MODELS[1]

        async with trio.open_nursery() as reporters:
            for worker in self.pool.workers.values():
                reporters.start_soon(self.report, worker)
            async with trio.open_nursery() as nursery:
                for model in [MODELS[0]] * busy + [MODELS[1]] * light:
                    nursery.start_soon(client, model)
            reporters.cancel_scope.cancel()
        return sum(engine.loads for engine in self.engines.values()), answered


async def test_a_busy_model_and_a_light_one_settle_on_an_engine_each(autojump_clock: trio.testing.MockClock) -> None:
    """Regression (hunt): two engines that hold one model each, 12 clients of one model and one of
    another. Once the busy model's queue outgrew its warm slots, it was loaded where the light one's
    only copy was, whose next request loaded it back: 20 loads in 5 s on the simulators, the light
    model answered 9 times (replayed here: 11 loads, 5 answers). Now each settles on an engine (2–3
    loads, 39–46 answers)."""
    for seed in range(4):
        random.seed(seed)
        loads, answered = await Grid("llm-aware", workers=2, limit=1).busy_and_light(12, 1)
        assert loads <= 4 and answered >= 20, (seed, loads, answered)


async def test_mixed_models_are_loaded_about_once_each(autojump_clock: trio.testing.MockClock) -> None:
    """Six models on eight places (four engines of two): each model loaded about once, whatever the
    order of the first burst — 8–9 loads a run on average. Trio orders ready tasks at random, so
    runs differ: the mean of 24 is what is checked (over 200 runs: mean 8.8, none above 19; the
    code before the fix: mean 15.6, up to 43, and a mean of 24 runs above 11.5 99 times in 100).
    Regressions: a report read while a load was under way made the hub forget that load and start
    another elsewhere; spreading a busy model onto an engine that had to evict a copy of another
    made models chase each other round the engines; a load counted as evicting nothing the model
    it does evict, so requests for that model were still sent there to load it again."""
    loads = [await Grid("llm-aware").mixed_models(seed) for seed in range(24)]
    assert sum(loads) / len(loads) <= 11.5, loads


async def test_least_loaded_reloads_models_all_the_time(autojump_clock: trio.testing.MockClock) -> None:
    """The same workload without regard for memory: the contrast that shows the test above measures."""
    assert await Grid("least-loaded").mixed_models(0) > 50


async def test_a_client_that_leaves_before_the_load_ends_leaves_no_supposed_load(
        autojump_clock: trio.testing.MockClock) -> None:
    """Regression: the hub counts a model as loaded where it sent a request to load it, until the
    request's first byte; a client that left before it kept the model "loaded" there for good
    (a worker's reports no longer undo a load in progress), and its requests were sent to wait for
    a load that had stopped."""
    grid = Grid("llm-aware", workers=1)
    worker = next(iter(grid.pool.workers.values()))
    exchange = Exchange(grid.pool, HubConfig(), "openai.chat", {"model": "model-1", "messages": []}, True, {})
    async with trio.open_nursery() as nursery:
        nursery.start_soon(exchange.open)
        await trio.testing.wait_all_tasks_blocked()
        assert worker.loaded == {"model-1"}  # supposed, and a report of the engine does not undo it
        grid.pool.set_offer(worker, protocol.Models(MODELS, loaded=()))
        assert worker.loaded == {"model-1"}
        nursery.cancel_scope.cancel()  # the client leaves
    assert worker.loaded == frozenset()
