#!/usr/bin/env python3
"""A thousand workers on one hub: what linking them costs, what a pick costs, what the listings cost.

Starts a hub as a process on 127.0.0.1 and links ``--workers`` fake workers to it from this process
(trio-websocket, the real protocol: a hello, then an answer of one chunk, an end and a load report
to every request, and a pong to every ping). All of them serve model ``all``; the first 15 also serve ``few``. Prints:

- how long the workers took to link, and the hub's memory per worker;
- a chat's time through the hub, p50 over sequential requests, for ``all`` (every worker a
  candidate) and ``few`` (15 candidates): the difference is what the pick costs;
- ``/api/summary`` (a proxy's health check) and ``/api/registry`` (every worker in detail): their
  size, time p50 and max, and the hub's CPU time per request (from ``/proc/PID/stat``).

    python scripts/fleet.py [--workers 1000] [--samples 300]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import httpx
import trio
import trio_websocket

sys.path.insert(0, str(Path(__file__).parent))
from bench import HOST, cpu_s, free_port, start, wait_ready  # noqa: E402

from ghubai import protocol  # noqa: E402

ANSWER = b'{"id":"chatcmpl-fleet","object":"chat.completion","created":0,"model":"all","choices":[{"index":0,' \
         b'"message":{"role":"assistant","content":"ok"},"finish_reason":"stop"}],"usage":{"prompt_tokens":1,' \
         b'"completion_tokens":1,"total_tokens":2}}'


async def fake_worker(url: str, index: int, linked: trio.Event, count: list[int], total: int) -> None:
    async with trio_websocket.open_websocket_url(url, max_message_size=protocol.MAX_MESSAGE_BYTES) as ws:
        models = ("all", "few") if index < 15 else ("all",)
        await ws.send_message(protocol.encode(protocol.Hello(protocol.PROTOCOL, f"fleet-{index}", f"fleet-{index}",
                                                             models, 8, "ollama", "fleet")))
        await ws.get_message()  # welcome
        count[0] += 1
        if count[0] == total:
            linked.set()
        while True:
            frames, _ = protocol.unpack(await ws.get_message())
            for frame in frames:
                if isinstance(frame, protocol.Request):
                    await ws.send_message(protocol.chunk(frame.id, ANSWER))
                    end = protocol.End(frame.id, {"prompt_tokens": 1, "completion_tokens": 1})
                    await ws.send_message(protocol.encode(end) + "\n" + protocol.encode(protocol.Load(0)))
                elif isinstance(frame, protocol.Ping):
                    await ws.send_message(protocol.encode(protocol.Pong(0)))


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


async def timed(http: httpx.AsyncClient, method: str, url: str, samples: int, **kwargs: object) -> tuple[list[float], int]:
    times, size = [], 0
    for _ in range(samples):
        started = time.perf_counter()
        response = await http.request(method, url, **kwargs)  # type: ignore[arg-type]
        times.append((time.perf_counter() - started) * 1000)
        response.raise_for_status()
        size = len(response.content)
    return sorted(times), size


async def run(hub_port: int, hub_pid: int, args: argparse.Namespace) -> None:
    url = f"http://{HOST}:{hub_port}"
    linked = trio.Event()
    before = rss_kib(hub_pid)
    async with trio.open_nursery() as nursery, httpx.AsyncClient(timeout=30) as http:
        started = time.perf_counter()
        count = [0]
        for index in range(args.workers):
            nursery.start_soon(fake_worker, f"ws://{HOST}:{hub_port}/gridhub", index, linked, count, args.workers)
        await linked.wait()
        took = time.perf_counter() - started
        await trio.sleep(1)
        print(f"{args.workers} workers linked in {took:.1f} s; hub memory {(rss_kib(hub_pid) - before) / args.workers:.0f}"
              f" KiB per worker\n")
        print("| what | p50 (ms) | p99 (ms) | max (ms) | hub CPU per request (ms) | bytes |")
        print("|---|---|---|---|---|---|")
        for name, method, path, kwargs in (
                ("chat, model every worker serves", "POST", "/v1/chat/completions",
                 {"json": {"model": "all", "messages": [{"role": "user", "content": "hi"}]}}),
                ("chat, model 15 workers serve", "POST", "/v1/chat/completions",
                 {"json": {"model": "few", "messages": [{"role": "user", "content": "hi"}]}}),
                ("GET /api/summary (a proxy's health check)", "GET", "/api/summary", {}),
                ("GET /api/registry (every worker in detail)", "GET", "/api/registry", {})):
            cpu = cpu_s(hub_pid)
            times, size = await timed(http, method, url + path, args.samples, **kwargs)
            per_request = (cpu_s(hub_pid) - cpu) * 1000 / args.samples
            print(f"| {name} | {statistics.median(times):.2f} | {times[int(len(times) * 0.99)]:.1f} | {max(times):.1f} "
                  f"| {per_request:.2f} | {size} |")
        nursery.cancel_scope.cancel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=1000)
    parser.add_argument("--samples", type=int, default=300)
    args = parser.parse_args()
    with ExitStack() as stack:
        hub_port = free_port()
        hub_pid = start(stack, "hub", "--listen", f"{HOST}:{hub_port}")
        wait_ready(f"http://{HOST}:{hub_port}/health")
        trio.run(run, hub_port, hub_pid, args)


if __name__ == "__main__":
    main()
