#!/usr/bin/env python3
"""Measure the grid against the simulator: straight to the engine, through worker + hub, and
through proxy + hub + worker.

Starts every part as its own process on 127.0.0.1 (simulator with --ttft-ms 0 --itl-ms 0, a hub, a
worker, a proxy) and drives them from this process with a lean h11 client, so the client is not what
is measured. Prints, for each target, time to first token (p50/p99), streamed tokens per second at
1, 16 and 64 concurrent streams, non-streaming requests per second, and the ratios; then how long
the engine keeps generating after a client disconnects mid-stream, through the hub and the proxy.

    python scripts/bench.py [--seconds 4] [--tokens 256]
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

TOKEN = b'{"content": '  # one per streamed token, in the simulator's and hence the grid's SSE events
HOST = "127.0.0.1"


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

    async def post(self, path: str, body: dict, on_data: Callable[[bytes], None]) -> int:
        if self.stream is None or self.conn.our_state is not h11.IDLE:
            if self.stream is not None:
                await self.stream.aclose()
            self.stream = await trio.open_tcp_stream(HOST, self.port)
            self.conn = h11.Connection(h11.CLIENT)
        raw = json.dumps(body).encode()
        request = h11.Request(method="POST", target=path, headers=[
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


def chat(tokens: int, stream: bool) -> dict:
    return {"model": "sim", "messages": [{"role": "user", "content": "bench"}], "stream": stream,
            "max_tokens": tokens}


async def ttft(port: int, path: str, count: int) -> list[float]:
    client, samples = Client(port), []
    for _ in range(count):
        start, first = time.perf_counter(), []

        def seen(data: bytes) -> None:
            if not first and TOKEN in data:
                first.append(time.perf_counter())

        await client.post(path, chat(4, True), seen)
        samples.append((first[0] - start) * 1000)
    await client.aclose()
    return samples


async def _drive(port: int, clients: int, seconds: float, body: dict,
                 on_data: Callable[[bytes], None]) -> tuple[int, float]:
    """``clients`` keep-alive clients post ``body`` back to back for ``seconds``: (answers, elapsed s)."""
    answered = 0
    deadline = trio.current_time() + seconds

    async def one() -> None:
        nonlocal answered
        client = Client(port)
        while trio.current_time() < deadline:
            status = await client.post("/v1/chat/completions", body, on_data)
            answered += status == 200  # not "answered += await ...": that reads answered before the await
        await client.aclose()

    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(clients):
            nursery.start_soon(one)
    return answered, time.perf_counter() - start


async def token_rate(port: int, streams: int, tokens: int, seconds: float) -> float:
    counted = 0

    def count(data: bytes) -> None:
        nonlocal counted
        counted += data.count(TOKEN)

    _, elapsed = await _drive(port, streams, seconds, chat(tokens, True), count)
    return counted / elapsed


async def request_rate(port: int, clients: int, seconds: float) -> float:
    answered, elapsed = await _drive(port, clients, seconds, chat(16, False), lambda data: None)
    return answered / elapsed


async def measure(port: int, args: argparse.Namespace) -> dict[str, float]:
    path = "/v1/chat/completions"
    await ttft(port, path, 20)  # warm-up: connections, caches
    samples = sorted(await ttft(port, path, args.ttft_samples))
    figures = {"ttft_p50_ms": statistics.median(samples),
               "ttft_p99_ms": samples[min(len(samples) - 1, int(len(samples) * 0.99))]}
    for streams in (1, 16, 64):
        figures[f"tok_s_{streams}"] = await token_rate(port, streams, args.tokens, args.seconds)
    figures["req_s"] = await request_rate(port, 16, args.seconds)
    return figures


async def cancel_latency(hub_port: int, sim_port: int, rounds: int) -> list[float]:
    """Client leaves mid-stream through the hub: ms until the simulator counts the cancel."""
    samples = []
    async with httpx.AsyncClient(timeout=10) as http:
        for _ in range(rounds):
            before = (await http.get(f"http://{HOST}:{sim_port}/sim/stats")).json()["cancelled"]
            stream = await trio.open_tcp_stream(HOST, hub_port)
            body = json.dumps(chat(1_000_000, True)).encode()
            await stream.send_all(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                                  b"content-length: %d\r\n\r\n%s" % (len(body), body))
            while TOKEN not in (data := await stream.receive_some(1 << 16)):
                if not data:
                    raise SystemExit("the hub closed a stream that should have run on")
            await stream.aclose()
            left = time.perf_counter()
            while (await http.get(f"http://{HOST}:{sim_port}/sim/stats")).json()["cancelled"] == before:
                await trio.sleep(0.001)
            samples.append((time.perf_counter() - left) * 1000)
    return samples


def translation_cost(samples: int = 200_000) -> tuple[float, float]:
    """Worker CPU per streamed token (µs): OpenAI chunks built from Ollama's native lines, vs the
    engine's own OpenAI chunks passed through. In-process; no network."""
    from ghubai.worker.engine import Call, Engine
    from ghubai.worker.translate import OpenAIOverOllama

    native = json.dumps({"model": "sim", "created_at": "2026-01-01T00:00:00Z",
                         "message": {"role": "assistant", "content": " word"}, "done": False}).encode()
    chunk = json.dumps({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "sim",
                        "choices": [{"index": 0, "delta": {"content": " word"}, "finish_reason": None}]}).encode()
    translator = OpenAIOverOllama("openai.chat")
    translator.request({"model": "sim", "messages": []}, True)
    translator.chunk(json.loads(native))  # the first chunk carries the role
    start = time.perf_counter()
    for _ in range(samples):
        translator.chunk(json.loads(native))
    translated = (time.perf_counter() - start) / samples * 1e6
    engine, call = Engine.__new__(Engine), Call("openai.chat", {}, True)
    start = time.perf_counter()
    for _ in range(samples):
        engine._render(call, [chunk], True)
    return translated, (time.perf_counter() - start) / samples * 1e6


def start(stack: ExitStack, *args: str) -> None:
    process = subprocess.Popen([sys.executable, "-m", "ghubai", *args, "--log-level", "warning"])
    stack.callback(process.wait, 10)
    stack.callback(process.terminate)


def wait_ready(url: str) -> None:
    for _ in range(200):
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise SystemExit(f"{url} never became ready")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=4.0, help="duration of each throughput run")
    parser.add_argument("--tokens", type=int, default=256, help="tokens per streamed reply")
    parser.add_argument("--ttft-samples", type=int, default=300)
    parser.add_argument("--repeat", type=int, default=3,
                        help="rounds over the three targets, interleaved; the table shows medians")
    args = parser.parse_args()
    sim_port, hub_port, proxy_port = free_port(), free_port(), free_port()
    with ExitStack() as stack, tempfile.TemporaryDirectory() as tmp:
        worker_toml = Path(tmp) / "worker.toml"
        worker_toml.write_text(f'hub_url = "ws://{HOST}:{hub_port}/gridhub"\nname = "bench"\n'
                               f'[engine]\nurl = "http://{HOST}:{sim_port}"\nmax_concurrency = 128\n')
        proxy_toml = Path(tmp) / "proxy.toml"
        proxy_toml.write_text(f'listen = "{HOST}:{proxy_port}"\nregistry_url = ""\nhubs = ["http://{HOST}:{hub_port}"]\n')
        start(stack, "sim", "--listen", f"{HOST}:{sim_port}", "--ttft-ms", "0", "--itl-ms", "0",
              "--max-parallel", "128", "--tokens", str(args.tokens))
        start(stack, "hub", "--listen", f"{HOST}:{hub_port}")
        start(stack, "worker", "--config", str(worker_toml))
        start(stack, "proxy", "--config", str(proxy_toml))
        wait_ready(f"http://{HOST}:{sim_port}/api/version")
        wait_ready(f"http://{HOST}:{hub_port}/ready")
        wait_ready(f"http://{HOST}:{proxy_port}/v1/models")
        rounds: dict[str, list[dict[str, float]]] = {"direct": [], "hub": [], "proxy": []}
        for round_number in range(args.repeat):
            for name, port in (("direct", sim_port), ("hub", hub_port), ("proxy", proxy_port)):
                print(f"round {round_number + 1}/{args.repeat}: {name} ...", file=sys.stderr)
                rounds[name].append(trio.run(measure, port, args))
        direct, grid, proxied = ({key: statistics.median(r[key] for r in rounds[name]) for key in rounds[name][0]}
                                 for name in ("direct", "hub", "proxy"))
        print("measuring disconnect -> cancel ...", file=sys.stderr)
        hub_cancels = sorted(trio.run(cancel_latency, hub_port, sim_port, 20))
        proxy_cancels = sorted(trio.run(cancel_latency, proxy_port, sim_port, 20))

    rows = [("time to first token p50 (ms)", "ttft_p50_ms"), ("time to first token p99 (ms)", "ttft_p99_ms"),
            ("tokens/s, 1 stream", "tok_s_1"), ("tokens/s, 16 streams", "tok_s_16"),
            ("tokens/s, 64 streams", "tok_s_64"), ("non-streaming requests/s (16 clients)", "req_s")]
    print(f"\n{os.cpu_count()} cores, simulator --ttft-ms 0 --itl-ms 0, {args.tokens} tokens per stream, "
          f"{args.seconds:g} s per run, median of {args.repeat} interleaved rounds\n")
    print(f"| {'measure':<38} | {'direct':>8} | {'hub':>8} | {'proxy':>8} | {'hub/direct':>10} | {'proxy/hub':>9} |")
    print(f"|{'-' * 40}|{'-' * 10}|{'-' * 10}|{'-' * 10}|{'-' * 12}|{'-' * 11}|")
    for label, key in rows:
        print(f"| {label:<38} | {direct[key]:>8.1f} | {grid[key]:>8.1f} | {proxied[key]:>8.1f} | "
              f"{grid[key] / direct[key]:>10.2f} | {proxied[key] / grid[key]:>9.2f} |")
    print(f"\nadded time to first token at p50: hub {grid['ttft_p50_ms'] - direct['ttft_p50_ms']:.2f} ms, "
          f"proxy hop {proxied['ttft_p50_ms'] - grid['ttft_p50_ms']:.2f} ms")
    translated, passed = translation_cost()
    per_token = 1e6 / direct["tok_s_64"]
    print(f"worker translation (OpenAI chunks from Ollama's native stream): {translated:.2f} µs per token vs "
          f"{passed:.2f} µs passed through: +{translated - passed:.2f} µs, "
          f"{100 * (translated - passed) / per_token:.0f} % of the simulator's {per_token:.1f} µs per token")
    for name, cancels in (("hub", hub_cancels), ("proxy", proxy_cancels)):
        print(f"client disconnect -> generation stopped, through the {name} (20 runs): "
              f"p50 {statistics.median(cancels):.1f} ms, max {cancels[-1]:.1f} ms")


if __name__ == "__main__":
    main()
