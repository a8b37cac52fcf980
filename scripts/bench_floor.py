#!/usr/bin/env python3
"""The least a hub on hypercorn can cost: a bare ASGI app on hypercorn's trio worker (no quart, no
grid) that answers every POST with the simulator's own bytes, against the simulator itself.

Captures one non-streamed and one streamed 16-token answer from the simulator, serves them from
the bare app (the stream in one ASGI message), and prints for each server the non-streamed
requests/s (16 clients) and streamed tokens/s (64 clients), each with the CPU the server spent per
request (medians of ``--repeat`` interleaved rounds). What the hub spends above the
bare app is the grid's own work and quart's; what the bare app spends, no hub on hypercorn can save.

    python scripts/bench_floor.py [--seconds 2] [--repeat 3]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import trio

sys.path.insert(0, str(Path(__file__).parent))
from bench import HOST, chat, cpu_s, drive, free_port, start, wait_ready  # noqa: E402


def bare_app(plain: bytes, stream: bytes) -> Any:
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
        streamed = b'"stream": true' in body
        payload = stream if streamed else plain
        headers = [(b"content-type", b"text/event-stream")] if streamed else \
            [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": payload})
    return app


def serve_bare(port: int, plain_path: str, stream_path: str) -> None:
    from hypercorn.config import Config
    from hypercorn.trio import serve
    config = Config()
    config.bind = [f"{HOST}:{port}"]
    config.accesslog = config.errorlog = None
    trio.run(serve, bare_app(Path(plain_path).read_bytes(), Path(stream_path).read_bytes()), config)


def measure(port: int, pid: int, seconds: float) -> tuple[float, float, float, float]:
    """(non-streamed requests/s, CPU ms per request; streamed tokens/s, CPU ms per request)."""
    before = cpu_s(pid)
    answered, _, took = trio.run(drive, port, 16, seconds, chat("sim", 16, False))
    plain_cpu = (cpu_s(pid) - before) * 1000 / answered
    before = cpu_s(pid)
    streams, tokens, took_streams = trio.run(drive, port, 64, seconds, chat("sim", 16, True))
    return answered / took, plain_cpu, tokens / took_streams, (cpu_s(pid) - before) * 1000 / streams


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    sim_port, bare_port = free_port(), free_port()
    with ExitStack() as stack, tempfile.TemporaryDirectory() as name:
        folder = Path(name)
        sim_pid = start(stack, "sim", "--listen", f"{HOST}:{sim_port}", "--ttft-ms", "0", "--itl-ms", "0",
                        "--max-parallel", "128")
        wait_ready(f"http://{HOST}:{sim_port}/api/version")
        url = f"http://{HOST}:{sim_port}/v1/chat/completions"
        (folder / "plain").write_bytes(httpx.post(url, json=chat("sim", 16, False)).content)
        (folder / "stream").write_bytes(httpx.post(url, json=chat("sim", 16, True)).content)
        bare = subprocess.Popen([sys.executable, __file__, "--serve", str(bare_port), str(folder / "plain"),
                                 str(folder / "stream")])
        stack.callback(bare.wait, 10)
        stack.callback(bare.terminate)
        wait_ready(f"http://{HOST}:{bare_port}/")
        rounds: dict[str, list[tuple[float, float, float, float]]] = {"simulator": [], "bare hypercorn": []}
        for _ in range(args.repeat):
            rounds["simulator"].append(measure(sim_port, sim_pid, args.seconds))
            rounds["bare hypercorn"].append(measure(bare_port, bare.pid, args.seconds))
    print("| server | non-streamed req/s | CPU per request (ms) "
          "| 64 streams of 16 tokens, tokens/s | CPU per request (ms) |")
    print("|---|---|---|---|---|")
    for name, figures in rounds.items():
        rate, plain_cpu, tokens, stream_cpu = (statistics.median(round_[i] for round_ in figures) for i in range(4))
        print(f"| {name} | {rate:,.0f} | {plain_cpu:.2f} | {tokens:,.0f} | {stream_cpu:.2f} |")


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--serve":
        serve_bare(int(sys.argv[2]), sys.argv[3], sys.argv[4])
    else:
        main()
