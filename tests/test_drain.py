"""SIGTERM drains: a hub keeps its port, answers 503 to new work and lets streams finish (up to
drain_timeout_s, then ends them with an error event); a worker takes nothing new, finishes, exits 0."""

from __future__ import annotations

import json
import os
import signal
import subprocess

import httpx
import trio

from conftest import WAIT_S, Grid, HubProcess, chat, eventually, ghubai_command


async def collect(http: httpx.AsyncClient, url: str, events: list[str], started: trio.Event) -> None:
    async with http.stream("POST", url + "/v1/chat/completions", json=chat(stream=True)) as response:
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
                if len(events) == 3:
                    started.set()


async def test_a_draining_hub_refuses_new_work_and_finishes_its_streams(
        grid: Grid, hub_processes: list[HubProcess]) -> None:
    hub = await HubProcess().started(grid.http)
    hub_processes.append(hub)
    sim_url, _ = await grid.sim(itl_ms=20, tokens=60)
    await grid.worker(hub.url, sim_url)
    events: list[str] = []
    started = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(collect, grid.http, hub.url, events, started)
        await started.wait()
        hub.process.send_signal(signal.SIGTERM)

        async def not_ready() -> bool:
            return (await grid.http.get(hub.url + "/ready")).status_code == 503

        await eventually(not_ready, "/ready to turn 503")
        refused = await grid.http.post(hub.url + "/v1/chat/completions", json=chat())
        assert refused.status_code == 503 and refused.headers["retry-after"]
    assert events[-1] == "[DONE]"
    assert sum(1 for e in events[:-1] if json.loads(e)["choices"] and json.loads(e)["choices"][0]["delta"].get(
        "content")) == 60
    assert hub.process.wait(timeout=WAIT_S) == 0


async def test_streams_still_running_at_the_drain_timeout_end_with_an_error_event(
        grid: Grid, hub_processes: list[HubProcess]) -> None:
    hub = await HubProcess("drain_timeout_s = 0.5\n").started(grid.http)
    hub_processes.append(hub)
    sim_url, sim = await grid.sim(itl_ms=20, tokens=100_000)
    await grid.worker(hub.url, sim_url)
    events: list[str] = []
    started = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(collect, grid.http, hub.url, events, started)
        await started.wait()
        hub.process.send_signal(signal.SIGTERM)
    assert "shutting down" in json.loads(events[-1])["error"]["message"]
    assert hub.process.wait(timeout=WAIT_S) == 0

    async def stopped() -> bool:
        return sim.stats.active == 0 and sim.stats.cancelled == 1

    await eventually(stopped, "the engine to stop the aborted stream")


async def test_a_draining_worker_takes_nothing_new_finishes_and_exits_0(grid: Grid) -> None:
    sim_url, _ = await grid.sim(itl_ms=20, tokens=60)
    hub = await grid.hub()
    env = {**os.environ, "HUB_URL": hub.value.replace("http", "ws") + "/gridhub", "OLLAMA_LOCAL_URL": sim_url}
    worker = subprocess.Popen(ghubai_command("worker", "--log-level", "warning"), env=env)
    try:
        async def joined() -> bool:
            return len(await grid.workers(hub.value)) == 1

        await eventually(joined, "the worker process to join")
        events: list[str] = []
        started = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(collect, grid.http, hub.value, events, started)
            await started.wait()
            worker.send_signal(signal.SIGTERM)

            async def draining() -> bool:
                return (await grid.workers(hub.value))[0]["draining"]

            await eventually(draining, "the hub to see the worker draining")
            refused = await grid.http.post(hub.value + "/v1/chat/completions", json=chat())
            assert refused.status_code == 503
        assert events[-1] == "[DONE]", events[-1]
        assert worker.wait(timeout=WAIT_S) == 0
    finally:
        if worker.poll() is None:
            worker.kill()
