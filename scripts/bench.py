#!/usr/bin/env python3
"""Measure the grid against the simulator: straight to the engine, through worker + hub, and
through proxy + hub + worker — as chats and agents feel it (short answers) and as long answers do.

Starts every part as its own process on 127.0.0.1: two simulators (``sim``: every token at once,
``--itl-ms 0``; ``paced``: a token every millisecond, each its own write, as a real engine sends
them), a worker for each, one hub and one proxy. Drives them from this process with a lean h11
client, so the client is not what is measured, and prints:

- for 16-token answers: the whole answer and its first token, p50 over sequential requests;
- tokens/s at 64 concurrent streams, for 16- and 256-token answers and for paced 16-token answers;
- non-streaming 16-token requests/s (16 clients);
- CPU time each process spent per request (from ``/proc/PID/stat`` around a run through the proxy
  at 16 concurrent streams) and per extra token, both when tokens arrive together and one by one;
- how long the engine keeps generating after a client disconnects mid-stream.

Every figure is the median of ``--repeat`` interleaved rounds: single runs on a shared 2-core
machine vary by ±20 %.

    python scripts/bench.py [--seconds 3] [--samples 200] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import h11
import httpx
import trio

TOKEN = b'{"content":'  # one per streamed token, in the simulator's SSE events and in the grid's (compact JSON)
HOST = "127.0.0.1"
PATH = "/v1/chat/completions"
TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


class Client:
    """One keep-alive HTTP/1.1 connection: POST a JSON body, stream the answer."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.stream: trio.SocketStream | None = None
        self.conn = h11.Connection(h11.CLIENT)

    async def post(self, body: dict, on_data: Callable[[bytes], None]) -> int:
        if self.stream is None or self.conn.our_state is not h11.IDLE:
            if self.stream is not None:
                await self.stream.aclose()
            self.stream = await trio.open_tcp_stream(HOST, self.port)
            self.conn = h11.Connection(h11.CLIENT)
        raw = json.dumps(body).encode()
        request = h11.Request(method="POST", target=PATH, headers=[
            ("host", f"{HOST}:{self.port}"), ("content-type", "application/json"), ("content-length", str(len(raw)))])
        await self.stream.send_all(self.conn.send(request) + self.conn.send(h11.Data(data=raw))
                                   + self.conn.send(h11.EndOfMessage()))
        status = 0
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                self.conn.receive_data(await self.stream.receive_some(1 << 16))
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                on_data(event.data)
            elif isinstance(event, h11.EndOfMessage):
                if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
                    self.conn.start_next_cycle()
                return status
            elif isinstance(event, h11.ConnectionClosed):
                raise ConnectionError("server closed the connection")

    async def aclose(self) -> None:
        if self.stream is not None:
            await self.stream.aclose()


def chat(model: str, tokens: int, stream: bool) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": "bench"}], "stream": stream,
            "max_tokens": tokens}


async def latency(port: int, count: int) -> tuple[float, float]:
    """Sequential 16-token streams: p50 of (first token, whole answer), in ms."""
    client, firsts, wholes = Client(port), [], []
    for _ in range(count):
        start, first = time.perf_counter(), []

        def seen(data: bytes) -> None:
            if not first and TOKEN in data:
                first.append(time.perf_counter())

        await client.post(chat("sim", 16, True), seen)
        firsts.append((first[0] - start) * 1000)
        wholes.append((time.perf_counter() - start) * 1000)
    await client.aclose()
    return statistics.median(firsts), statistics.median(wholes)


async def drive(port: int, clients: int, seconds: float, body: dict) -> tuple[int, int, float]:
    """``clients`` keep-alive clients post ``body`` back to back for ``seconds``:
    (answers, tokens, elapsed s)."""
    answered = tokens = 0
    deadline = trio.current_time() + seconds

    def count(data: bytes) -> None:
        nonlocal tokens
        tokens += data.count(TOKEN)

    async def one() -> None:
        nonlocal answered
        client = Client(port)
        while trio.current_time() < deadline:
            status = await client.post(body, count)
            answered += status == 200  # not "answered += await ...": that reads answered before the await
        await client.aclose()

    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(clients):
            nursery.start_soon(one)
    return answered, tokens, time.perf_counter() - start


def token_rate(port: int, model: str, tokens: int, seconds: float) -> float:
    _, counted, elapsed = trio.run(drive, port, 64, seconds, chat(model, tokens, True))
    return counted / elapsed


def request_rate(port: int, seconds: float) -> float:
    answered, _, elapsed = trio.run(drive, port, 16, seconds, chat("sim", 16, False))
    return answered / elapsed


def cpu_s(pid: int) -> float:
    """User + system CPU seconds the process has used."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def cpu_per_request(port: int, pids: dict[str, int], model: str, tokens: int, seconds: float) -> dict[str, float]:
    """ms of CPU per request of each process, while 16 streams run through the proxy."""
    before = {name: cpu_s(pid) for name, pid in pids.items()}
    answered, _, _ = trio.run(drive, port, 16, seconds, chat(model, tokens, True))
    return {name: (cpu_s(pid) - before[name]) * 1000 / max(1, answered) for name, pid in pids.items()}


async def cancel_latency(port: int, sim_port: int, rounds: int) -> list[float]:
    """Client leaves mid-stream: ms until the simulator counts the cancel."""
    samples = []
    async with httpx.AsyncClient(timeout=10) as http:
        for _ in range(rounds):
            before = (await http.get(f"http://{HOST}:{sim_port}/sim/stats")).json()["cancelled"]
            stream = await trio.open_tcp_stream(HOST, port)
            body = json.dumps(chat("sim", 1_000_000, True)).encode()
            await stream.send_all(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                                  b"content-length: %d\r\n\r\n%s" % (len(body), body))
            while TOKEN not in (data := await stream.receive_some(1 << 16)):
                if not data:
                    raise SystemExit("a stream that should have run on was closed")
            await stream.aclose()
            left = time.perf_counter()
            while (await http.get(f"http://{HOST}:{sim_port}/sim/stats")).json()["cancelled"] == before:
                await trio.sleep(0.001)
            samples.append((time.perf_counter() - left) * 1000)
    return samples


def start(stack: ExitStack, *args: str) -> int:
    process = subprocess.Popen([sys.executable, "-m", "ghubai", *args, "--log-level", "warning"])
    stack.callback(process.wait, 10)
    stack.callback(process.terminate)
    return process.pid


def wait_ready(url: str) -> None:
    for _ in range(200):
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise SystemExit(f"{url} never became ready")


def median(rounds: list[dict[str, float]]) -> dict[str, float]:
    return {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}


def measure(ports: dict[str, int], paced_port: int, args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """One round over the three targets."""
    figures: dict[str, dict[str, float]] = {}
    for name, port in ports.items():
        print(f"  {name} ...", file=sys.stderr)
        trio.run(latency, port, 20)  # warm-up: connections, caches
        first, whole = trio.run(latency, port, args.samples)
        figures[name] = {
            "first_ms": first, "whole_ms": whole,
            "tok_16": token_rate(port, "sim", 16, args.seconds),
            "tok_256": token_rate(port, "sim", 256, args.seconds),
            "tok_paced": token_rate(paced_port if name == "direct" else port, "paced", 16, args.seconds),
            "req_s": request_rate(port, args.seconds)}
    return figures


def cpu_round(proxy_port: int, pids: dict[str, int], args: argparse.Namespace) -> dict[str, float]:
    """CPU per request and per token of each role, through the proxy."""
    burst = {role: pids[role] for role in ("sim", "worker", "hub", "proxy")}
    paced = {**burst, "sim": pids["paced sim"], "worker": pids["paced worker"]}
    figures = {}
    for label, model, tokens, which in (("16", "sim", 16, burst), ("256", "sim", 256, burst),
                                        ("p16", "paced", 16, paced), ("p64", "paced", 64, paced)):
        for role, ms in cpu_per_request(proxy_port, which, model, tokens, args.seconds).items():
            figures[f"{role}|{label}"] = ms
    return figures


def report(rounds: dict[str, list[dict[str, float]]], cpu: dict[str, float], cancels: dict[str, list[float]],
           args: argparse.Namespace) -> None:
    direct, hub, proxy = (median(rounds[name]) for name in ("direct", "hub", "proxy"))
    rows = [("16 tokens: whole answer p50 (ms)", "whole_ms"), ("16 tokens: first token p50 (ms)", "first_ms"),
            ("tokens/s, 64 streams of 16 tokens", "tok_16"), ("tokens/s, 64 streams of 256 tokens", "tok_256"),
            ("tokens/s, 64 paced streams of 16 tokens", "tok_paced"),
            ("non-streaming requests/s (16 tokens, 16 clients)", "req_s")]
    print(f"\n{os.cpu_count()} cores, {args.seconds:g} s per run, median of {args.repeat} interleaved rounds\n")
    print(f"| {'measure':<48} | {'direct':>8} | {'hub':>8} | {'proxy':>8} | {'hub/direct':>10} | {'proxy/direct':>12} |")
    print(f"|{'-' * 50}|{'-' * 10}|{'-' * 10}|{'-' * 10}|{'-' * 12}|{'-' * 14}|")
    for label, key in rows:
        print(f"| {label:<48} | {direct[key]:>8.1f} | {hub[key]:>8.1f} | {proxy[key]:>8.1f} | "
              f"{hub[key] / direct[key]:>10.2f} | {proxy[key] / direct[key]:>12.2f} |")
    print(f"\nadded to a whole 16-token answer at p50: hub {hub['whole_ms'] - direct['whole_ms']:.2f} ms, "
          f"proxy + hub {proxy['whole_ms'] - direct['whole_ms']:.2f} ms")
    print("\nCPU per 16-token streamed request (ms), and per extra token (µs): together = tokens the engine "
          "sent at once,\none by one = a token per write every millisecond (16 streams through the proxy)\n")
    print(f"| {'role':<8} | {'per request':>11} | {'per token, together':>19} | {'per token, one by one':>21} |")
    print(f"|{'-' * 10}|{'-' * 13}|{'-' * 21}|{'-' * 23}|")
    for role in ("sim", "worker", "hub", "proxy"):
        together = (cpu[f"{role}|256"] - cpu[f"{role}|16"]) / 240 * 1000
        one_by_one = (cpu[f"{role}|p64"] - cpu[f"{role}|p16"]) / 48 * 1000
        print(f"| {role:<8} | {cpu[f'{role}|16']:>11.2f} | {together:>19.1f} | {one_by_one:>21.1f} |")
    for name, samples in cancels.items():
        samples.sort()
        print(f"\nclient disconnect -> generation stopped, through the {name} ({len(samples)} runs): "
              f"p50 {statistics.median(samples):.1f} ms, max {samples[-1]:.1f} ms", end="")
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="duration of each throughput run")
    parser.add_argument("--samples", type=int, default=200, help="sequential requests for the latency p50")
    parser.add_argument("--repeat", type=int, default=3, help="interleaved rounds; the tables show medians")
    args = parser.parse_args()
    sim_port, paced_port, hub_port, proxy_port = free_port(), free_port(), free_port(), free_port()
    with ExitStack() as stack, tempfile.TemporaryDirectory() as tmp:
        pids = {"sim": start(stack, "sim", "--listen", f"{HOST}:{sim_port}", "--ttft-ms", "0", "--itl-ms", "0",
                             "--max-parallel", "128"),
                "paced sim": start(stack, "sim", "--listen", f"{HOST}:{paced_port}", "--models", "paced",
                                   "--ttft-ms", "0", "--itl-ms", "1", "--max-parallel", "128"),
                "hub": start(stack, "hub", "--listen", f"{HOST}:{hub_port}")}
        for name, port in (("worker", sim_port), ("paced worker", paced_port)):
            config = Path(tmp) / f"{name.replace(' ', '-')}.toml"
            config.write_text(f'hub_url = "ws://{HOST}:{hub_port}/gridhub"\nname = "{name.replace(" ", "-")}"\n'
                              f'[engine]\nurl = "http://{HOST}:{port}"\nmax_concurrency = 128\n')
            pids[name] = start(stack, "worker", "--config", str(config))
        proxy_toml = Path(tmp) / "proxy.toml"
        proxy_toml.write_text(f'listen = "{HOST}:{proxy_port}"\nregistry_url = ""\nhubs = ["http://{HOST}:{hub_port}"]\n')
        pids["proxy"] = start(stack, "proxy", "--config", str(proxy_toml))
        for url in (f"http://{HOST}:{sim_port}/api/version", f"http://{HOST}:{paced_port}/api/version",
                    f"http://{HOST}:{hub_port}/ready", f"http://{HOST}:{proxy_port}/v1/models"):
            wait_ready(url)
        while {"sim", "paced"} - {m["id"] for m in httpx.get(f"http://{HOST}:{proxy_port}/v1/models").json()["data"]}:
            time.sleep(0.05)  # both workers linked, and the proxy has seen them
        ports = {"direct": sim_port, "hub": hub_port, "proxy": proxy_port}
        rounds: dict[str, list[dict[str, float]]] = {name: [] for name in ports}
        cpu_rounds = []
        for number in range(args.repeat):
            print(f"round {number + 1}/{args.repeat}", file=sys.stderr)
            for name, figures in measure(ports, paced_port, args).items():
                rounds[name].append(figures)
            print("  CPU ...", file=sys.stderr)
            cpu_rounds.append(cpu_round(proxy_port, pids, args))
        print("disconnect -> cancel ...", file=sys.stderr)
        cancels = {"hub": trio.run(cancel_latency, hub_port, sim_port, 20),
                   "proxy": trio.run(cancel_latency, proxy_port, sim_port, 20)}
    report(rounds, median(cpu_rounds), cancels, args)


if __name__ == "__main__":
    main()
