#!/usr/bin/env python3
"""What a grid on this stack could reach at best, next to what the grid reaches: how much of the gap
to the direct simulator is hypercorn's and the h11 client's, and how much the grid's own.

- **bare hypercorn**: an ASGI app served as the hub is (``ghubai.web``: hypercorn with the hub's
  cheap writes; no quart, no grid) that answers every POST with the simulator's own bytes (captured
  once; a stream in one ASGI message): the least a hub on hypercorn spends on a request.
- **relay**: the same bare app, but every request goes to the simulator through the grid's h11
  client (``ghubai.http11.client``), each message carrying all that has arrived, as the hub's do:
  hub and worker fused into one process with no WebSocket hop, no scheduling, no checks and no
  translation. ``proxy → relay`` stands for the whole chain alike.
- **hub + worker**, **proxy → hub + worker**: the real grid.

Prints, for each, the non-streamed requests/s (16 clients) and the tokens/s of 64 streams of 16 and
of 256 tokens, each with its ratio to the direct simulator, and the CPU per request of the row's
processes (all but the simulator), medians of ``--repeat`` interleaved rounds.

    python scripts/bench_floor.py [--seconds 2] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import trio

sys.path.insert(0, str(Path(__file__).parent))
from bench import HOST, chat, cpu_s, drive, free_port, start, wait_ready  # noqa: E402


Handler = Callable[[dict[str, Any], bytes, Any], Awaitable[None]]


def asgi(handle: Handler) -> Any:
    """A bare ASGI app: lifespan, then ``handle(scope, body, send)`` for each request."""
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        await handle(scope, body, send)
    return app


def bare_app(folder: Path) -> Any:
    plain, stream, long = ((folder / name).read_bytes() for name in ("plain", "stream", "long"))

    async def handle(scope: dict[str, Any], body: bytes, send: Any) -> None:
        streamed = b'"stream": true' in body
        payload = (long if b'"max_tokens": 256' in body else stream) if streamed else plain
        headers = [(b"content-type", b"text/event-stream")] if streamed else \
            [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": payload})
    return asgi(handle)


def relay_app(engine_port: int) -> Any:
    from ghubai.http11.client import ConnectionPool
    pool = ConnectionPool(HOST, engine_port, ssl_context=None, connect_timeout_s=5, max_idle=128, idle_reuse_s=60)
    summary = json.dumps({"models": ["sim"], "draining": False}).encode()  # what a proxy checks

    async def handle(scope: dict[str, Any], body: bytes, send: Any) -> None:
        if scope["path"] == "/api/summary":
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
            await send({"type": "http.response.body", "body": summary})
            return
        async with pool.request(scope["method"], scope["path"], [("content-type", "application/json")], body,
                                30.0) as response:
            headers = [(name, value) for name, value in response.headers if name in (b"content-type", b"content-length")]
            await send({"type": "http.response.start", "status": response.status, "headers": headers})
            if any(name == b"content-length" for name, _ in headers):  # whole, as the hub sends it
                await send({"type": "http.response.body", "body": await response.read(1 << 24)})
                return
            with trio.fail_after(30.0):
                ended = False
                while not ended:  # like the hub, one message for all that has arrived
                    data, ended = await response.conn.body_part()
                    while not ended and response.conn.readable():
                        more, ended = await response.conn.body_part()
                        data += more
                    await send({"type": "http.response.body", "body": data, "more_body": not ended})
    return asgi(handle)


def serve(port: int, app: Any) -> None:
    """On hypercorn as the hub serves (``ghubai.web``: its cheap writes and the rest)."""
    from ghubai.web import serve_app, server_config
    trio.run(serve_app, app, server_config(f"{HOST}:{port}"))


MEASURES = ("non-streamed req/s", "64 × 16 tokens, tokens/s", "64 × 256 tokens, tokens/s")


def measure(port: int, pids: list[int], seconds: float) -> list[float]:
    """Each of ``MEASURES``, then the CPU ms ``pids`` spent per request in the first two."""
    figures, cpu = [], []
    for clients, tokens, stream in ((16, 16, False), (64, 16, True), (64, 256, True)):
        before = sum(map(cpu_s, pids))
        answered, counted, took = trio.run(drive, port, clients, seconds, chat("sim", tokens, stream))
        figures.append(counted / took if stream else answered / took)
        cpu.append((sum(map(cpu_s, pids)) - before) * 1000 / max(1, answered))
    return figures + cpu[:2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    ports = {name: free_port() for name in ("sim", "bare", "relay", "proxy", "hub", "grid proxy")}
    with ExitStack() as stack, tempfile.TemporaryDirectory() as name:
        folder = Path(name)
        sim_pid = start(stack, "sim", "--listen", f"{HOST}:{ports['sim']}", "--ttft-ms", "0", "--itl-ms", "0",
                        "--max-parallel", "128")
        wait_ready(f"http://{HOST}:{ports['sim']}/api/version")
        url = f"http://{HOST}:{ports['sim']}/v1/chat/completions"
        for tokens, stream, file in ((16, False, "plain"), (16, True, "stream"), (256, True, "long")):
            (folder / file).write_bytes(httpx.post(url, json=chat("sim", tokens, stream)).content)
        hub_pid = start(stack, "hub", "--listen", f"{HOST}:{ports['hub']}")
        (folder / "worker.toml").write_text(f'hub_url = "ws://{HOST}:{ports["hub"]}/gridhub"\nname = "w"\n[engine]\n'
                                            f'url = "http://{HOST}:{ports["sim"]}"\nmax_concurrency = 128\n')
        worker_pid = start(stack, "worker", "--config", str(folder / "worker.toml"))
        relay_pid = spawn(stack, "--relay", str(ports["relay"]), str(ports["sim"]))
        servers = {"bare hypercorn": (ports["bare"], [spawn(stack, "--bare", str(ports["bare"]), str(folder))]),
                   "relay": (ports["relay"], [relay_pid]),
                   "proxy → relay": (ports["proxy"], [proxy(stack, folder, ports["proxy"], ports["relay"]), relay_pid]),
                   "hub + worker": (ports["hub"], [hub_pid, worker_pid]),
                   "proxy → hub + worker": (ports["grid proxy"], [proxy(stack, folder, ports["grid proxy"], ports["hub"]),
                                                                  hub_pid, worker_pid])}
        for port, _ in servers.values():
            wait_ready(f"http://{HOST}:{port}/v1/models")
            for _ in range(200):  # the worker has linked, the proxy has checked its hub
                if httpx.get(f"http://{HOST}:{port}/v1/models").json().get("data", True):
                    break
                time.sleep(0.05)
            else:
                raise SystemExit(f"no model listed on port {port}")
        rounds: dict[str, list[list[float]]] = {"simulator": [], **{name: [] for name in servers}}
        for _ in range(args.repeat):
            rounds["simulator"].append(measure(ports["sim"], [sim_pid], args.seconds))
            for name, (port, pids) in servers.items():
                rounds[name].append(measure(port, pids, args.seconds))
    print("| server | " + " | ".join(f"{what} (of direct)" for what in MEASURES) +
          " | CPU per request, non-streamed / 16-token stream (ms) |")
    print("|---|" + "---|" * (len(MEASURES) + 1))
    direct = [statistics.median(round_[i] for round_ in rounds["simulator"]) for i in range(len(MEASURES))]
    for name, figures in rounds.items():
        medians = [statistics.median(round_[i] for round_ in figures) for i in range(len(MEASURES) + 2)]
        print(f"| {name} | " + " | ".join(f"{value:,.0f} ({value / direct[i]:.2f})" for i, value in
                                          enumerate(medians[:len(MEASURES)])) +
              f" | {medians[-2]:.2f} / {medians[-1]:.2f} |")


def proxy(stack: ExitStack, folder: Path, port: int, hub_port: int) -> int:
    config = folder / f"proxy-{port}.toml"
    config.write_text(f'listen = "{HOST}:{port}"\nregistry_url = ""\nhubs = ["http://{HOST}:{hub_port}"]\n')
    return start(stack, "proxy", "--config", str(config))


def spawn(stack: ExitStack, *args: str) -> int:
    process = subprocess.Popen([sys.executable, __file__, *args])
    stack.callback(process.wait, 10)
    stack.callback(process.terminate)
    return process.pid


if __name__ == "__main__":
    if sys.argv[1:2] == ["--bare"]:
        serve(int(sys.argv[2]), bare_app(Path(sys.argv[3])))
    elif sys.argv[1:2] == ["--relay"]:
        serve(int(sys.argv[2]), relay_app(int(sys.argv[3])))
    else:
        main()
