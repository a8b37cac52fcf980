"""Chaos: workers killed with kill -9, a hub killed and brought back, a network partition that
closes nothing, a burst twice the grid's capacity. No request is lost: each one completes or ends
in an explicit error, within the configured timeouts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import trio

from conftest import WAIT_S, Grid, HubProcess, chat, eventually, worker_process, workers_linked
from relay import Relay


async def stream_events(http: httpx.AsyncClient, url: str, after_three: Any = None) -> list[str]:
    events: list[str] = []
    with trio.fail_after(WAIT_S):
        async with http.stream("POST", url + "/v1/chat/completions", json=chat(stream=True)) as response:
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    if len(events) == 3 and after_three is not None:
                        after_three()
    return events


async def test_a_partition_is_detected_by_both_sides_within_three_heartbeats(grid: Grid) -> None:
    hub = await grid.hub(heartbeat_s=0.3)
    relay = Relay(int(hub.value.rsplit(":", 1)[1]))
    relay_port = await grid.nursery.start(relay.serve)
    sim_url, sim = await grid.sim(itl_ms=20, tokens=100_000)
    await grid.worker(f"http://127.0.0.1:{relay_port}", sim_url)
    frozen_at = 0.0

    def freeze() -> None:
        nonlocal frozen_at
        relay.frozen = True
        frozen_at = trio.current_time()

    events = await stream_events(grid.http, hub.value, freeze)
    print(f"hub ended the stream {trio.current_time() - frozen_at:.2f} s after the partition")
    assert "lost the link" in json.loads(events[-1])["error"]["message"]

    async def worker_stopped_the_engine() -> bool:
        return sim.stats.cancelled == 1 and sim.stats.active == 0

    await eventually(worker_stopped_the_engine, "the worker to notice the silent hub and stop the engine")


async def test_kill_9_of_a_worker_mid_stream_ends_the_stream_with_an_error(grid: Grid, tmp_path: Path) -> None:
    sim_url, _ = await grid.sim(itl_ms=20, tokens=100_000)
    hub = await grid.hub()
    worker = worker_process(tmp_path, hub.value, sim_url)
    try:
        await workers_linked(grid, hub.value, 1)
        events = await stream_events(grid.http, hub.value, worker.kill)
        said = json.loads(events[-1])["error"]["message"]  # (a hunt: "Engine error: lost the link", the engine sound)
        assert said.startswith("lost the link") and "[DONE]" not in events
        await workers_linked(grid, hub.value, 0)
    finally:
        worker.kill()
        worker.wait()


async def test_kill_9_of_a_worker_before_the_first_byte_is_retried_on_another(grid: Grid, tmp_path: Path) -> None:
    stuck_url, stuck = await grid.sim(ttft_ms=60_000)
    good_url, good = await grid.sim()
    hub = await grid.hub(scheduler={"policy": "least-loaded"})
    doomed = worker_process(tmp_path, hub.value, stuck_url)
    try:
        await workers_linked(grid, hub.value, 1)
        async with trio.open_nursery() as nursery:
            result: list[httpx.Response] = []

            async def ask() -> None:
                result.append(await grid.http.post(hub.value + "/v1/chat/completions", json=chat()))

            nursery.start_soon(ask)

            async def waiting_for_first_token() -> bool:
                return stuck.stats.active == 1

            await eventually(waiting_for_first_token, "the request to reach the worker that will die")
            await grid.worker(hub.value, good_url)  # (once the request is on the doomed one)
            doomed.kill()
        assert result[0].status_code == 200 and result[0].json()["choices"][0]["message"]["content"]
        assert good.stats.completed == 1
    finally:
        doomed.kill()
        doomed.wait()


async def test_workers_come_back_after_kill_9_of_their_hub(grid: Grid, hub_processes: list[HubProcess]) -> None:
    hub = await HubProcess().started(grid.http)
    hub_processes.append(hub)
    sim_url, _ = await grid.sim()
    await grid.worker(hub.url, sim_url)
    hub.kill()
    # On purpose on the same port, the one the OS gave the first hub: where the worker looks for its hub.
    reborn = await HubProcess(port=hub.port).started(grid.http)
    hub_processes.append(reborn)
    await workers_linked(grid, reborn.url, 1)
    assert (await grid.http.post(reborn.url + "/v1/chat/completions", json=chat())).status_code == 200


async def test_a_burst_twice_the_capacity_ends_in_success_or_an_explicit_refusal(grid: Grid) -> None:
    sim_url, sim = await grid.sim(itl_ms=50, tokens=20)  # a second each: the burst is in before one ends
    hub = await grid.hub(limits={"queue_size": 4, "queue_timeout_s": WAIT_S})
    await grid.worker(hub.value, sim_url, max_concurrency=2)
    capacity = 2 + 4  # slots and queue places
    statuses: list[int] = []

    async def one() -> None:
        response = await grid.http.post(hub.value + "/v1/chat/completions", json=chat())
        statuses.append(response.status_code)
        if response.status_code != 200:
            assert response.headers["retry-after"] and response.json()["error"]["message"]

    with trio.fail_after(WAIT_S):
        async with trio.open_nursery() as nursery:
            for _ in range(2 * capacity):
                nursery.start_soon(one)
    assert len(statuses) == 2 * capacity and set(statuses) <= {200, 429, 503}
    assert statuses.count(200) >= capacity and 429 in statuses
    assert sim.stats.completed == statuses.count(200)


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))


async def test_one_hub_holds_1000_concurrent_slow_streams(grid: Grid, hub_processes: list[HubProcess]) -> None:
    streams, tokens = 1000, 10
    hub = await HubProcess().started(grid.http)
    hub_processes.append(hub)
    sim_url, sim = await grid.sim(itl_ms=100, tokens=tokens, max_parallel=streams)
    await grid.worker(hub.url, sim_url, max_concurrency=streams)
    assert (await grid.http.post(hub.url + "/v1/chat/completions", json=chat())).status_code == 200  # warm
    baseline = peak = rss_kib(hub.process.pid)
    body = json.dumps(chat(stream=True)).encode()
    request = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
               b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    completed = 0

    async def one() -> None:
        nonlocal completed
        async with await trio.open_tcp_stream("127.0.0.1", hub.port) as stream:
            await stream.send_all(request)
            received = b""
            while not received.endswith(b"0\r\n\r\n"):
                data = await stream.receive_some(65536)
                assert data, "the hub closed a stream early"
                received += data
        completed += b"data: [DONE]" in received and received.count(b'"content":') >= tokens

    async def watch_memory() -> None:
        nonlocal peak
        while True:
            peak = max(peak, rss_kib(hub.process.pid))
            await trio.sleep(0.05)

    with trio.fail_after(120):
        async with trio.open_nursery() as outer:
            outer.start_soon(watch_memory)
            async with trio.open_nursery() as nursery:
                for index in range(streams):
                    nursery.start_soon(one)
                    if index % 100 == 99:
                        await trio.sleep(0.05)  # stay within the listen backlog
            outer.cancel_scope.cancel()
    per_stream = (peak - baseline) * 1024 / streams
    print(f"{streams} streams: hub RSS {baseline} KiB -> peak {peak} KiB, {per_stream / 1024:.1f} KiB per stream")
    assert completed == streams and sim.stats.completed == streams + 1
