#!/usr/bin/env python3
"""What the hub's scheduler saves on engines with memory: the same workloads under each policy.

Starts ``--workers`` simulators that behave like LLM engines (``--max-loaded``: models in memory
at once, ``--load-ms``: the time to load another, ``--prefill-us-per-token``: prompt processing, with
a prompt cache per slot), a worker for each and one hub, all as processes on 127.0.0.1 — fresh ones
for every run, so that no run inherits another's warm models or caches. Then, once per policy
(``least-loaded``, ``llm-aware``), it drives:

- **mixed models**: 240 requests for six models of skewed popularity (Zipf), from 8 clients;
- **multi-turn chats**: 24 conversations of 8 turns that open with shared rules (300 words) and a
  context of their own (1,000 words), whose history grows every turn, 50–300 ms apart (a user
  reading, an agent running a tool);
- **one model**: short uniform requests for a model every engine holds, as fast as they are answered.

and prints one table: time to first token (mean, p50, p99), requests completed, model loads and
prompt tokens computed (from the simulators' ``/sim/stats``), and requests per second.

    python scripts/bench_routing.py [--workers 4] [--slots 4] [--max-loaded 2] [--load-ms 500]
                                    [--prefill-us 200] [--seconds 12] [--only mixed|multi-turn|one]
                                    [--policy least-loaded|llm-aware] [--runs 1]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from contextlib import ExitStack
from pathlib import Path

import httpx
import trio

sys.path.insert(0, str(Path(__file__).parent))
from bench import HOST, free_port, start, wait_ready  # noqa: E402

MODELS = [f"model-{index}" for index in range(6)]
POPULARITY = [1 / (rank + 1) ** 1.2 for rank in range(len(MODELS))]  # Zipf: the first is asked most
SYSTEM = " ".join(f"rule{index}" for index in range(300))  # rules every conversation shares
CONTEXT_WORDS = 1000  # what each conversation adds of its own: a document, a repository's files
POLICIES = ("least-loaded", "llm-aware")


class Grid:
    """Simulators with memory, a worker for each, and a hub with ``policy``: fresh processes."""

    def __init__(self, stack: ExitStack, folder: Path, policy: str, args: argparse.Namespace) -> None:
        self.sims = [free_port() for _ in range(args.workers)]
        for port in self.sims:
            start(stack, "sim", "--listen", f"{HOST}:{port}", "--models", ",".join(MODELS),
                  "--max-loaded", str(args.max_loaded),
                  "--load-ms", str(args.load_ms), "--prefill-us-per-token", str(args.prefill_us),
                  "--ttft-ms", "20", "--itl-ms", "5", "--tokens", "16", "--max-parallel", str(args.slots))
        hub_port = free_port()
        hub_toml = folder / f"hub-{policy}.toml"
        hub_toml.write_text(f'[scheduler]\npolicy = "{policy}"\n[limits]\nqueue_timeout_s = 120\n')
        start(stack, "hub", "--config", str(hub_toml), "--listen", f"{HOST}:{hub_port}")
        for index, port in enumerate(self.sims):
            path = folder / f"worker-{policy}-{index}.toml"
            path.write_text(f'hub_url = "ws://{HOST}:{hub_port}/gridhub"\nname = "gpu-{index}"\n[engine]\n'
                            f'url = "http://{HOST}:{port}"\nmax_concurrency = {args.slots}\n')
            start(stack, "worker", "--config", str(path))
        self.url = f"http://{HOST}:{hub_port}"
        wait_ready(self.url + "/ready")
        for _ in range(200):  # every worker linked
            if len(httpx.get(self.url + "/api/registry").json()["workers"]) == args.workers:
                break
            time.sleep(0.05)

    def engine_totals(self) -> dict[str, int]:
        stats = [httpx.get(f"http://{HOST}:{port}/sim/stats").json() for port in self.sims]
        return {key: sum(s[key] for s in stats) for key in ("loads", "prefill_tokens_computed", "completed")}


async def first_token(http: httpx.AsyncClient, url: str, body: dict) -> float:
    """Stream one chat; the seconds to its first content."""
    started = time.perf_counter()
    async with http.stream("POST", url + "/v1/chat/completions", json={**body, "stream": True}) as response:
        response.raise_for_status()
        first = None
        async for line in response.aiter_lines():
            if first is None and '"content":' in line:
                first = time.perf_counter() - started
        assert first is not None, "an answer without content"
        return first


async def mixed_models(http: httpx.AsyncClient, url: str, requests: int, clients: int) -> list[float]:
    """Clients asking for models of skewed popularity, each with a new short chat: the same
    ``requests`` requests under each policy."""
    ttfts: list[float] = []

    async def client(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(requests // clients):
            model = rng.choices(MODELS, POPULARITY)[0]
            ttfts.append(await first_token(http, url, {"model": model, "messages": [
                {"role": "user", "content": f"question {rng.random()}"}]}))

    async with trio.open_nursery() as nursery:
        for seed in range(clients):
            nursery.start_soon(client, seed)
    return ttfts


async def multi_turn(http: httpx.AsyncClient, url: str, conversations: int, turns: int, clients: int) -> list[float]:
    """Conversations with a long system prompt; each turn re-sends the whole history plus a question."""
    ttfts: list[float] = []
    todo = list(range(conversations))

    async def client() -> None:
        rng = random.Random(len(todo))
        while todo:
            number = todo.pop()
            # each conversation its own context (a document, a user's history) after the shared rules
            messages = [{"role": "system", "content": SYSTEM + f" document {number}: "
                         + " ".join(f"d{number}w{i}" for i in range(CONTEXT_WORDS))}]
            for turn in range(turns):
                messages.append({"role": "user", "content": f"conversation {number} turn {turn}: "
                                 + " ".join(f"word{i}" for i in range(30))})
                ttfts.append(await first_token(http, url, {"model": MODELS[0], "messages": messages}))
                messages.append({"role": "assistant", "content": "an answer of sixteen words " * 4})
                await trio.sleep(rng.uniform(0.05, 0.3))  # a user reading, an agent running a tool

    async with trio.open_nursery() as nursery:
        for _ in range(clients):
            nursery.start_soon(client)
    return ttfts


async def one_model(http: httpx.AsyncClient, url: str, seconds: float, clients: int) -> list[float]:
    """Short uniform requests for one model, as fast as they are answered."""
    ttfts: list[float] = []
    deadline = trio.current_time() + seconds
    await first_token(http, url, {"model": MODELS[0], "messages": [{"role": "user", "content": "warm up"}]})

    async def client(seed: int) -> None:
        count = 0
        while trio.current_time() < deadline:
            count += 1
            ttfts.append(await first_token(http, url, {"model": MODELS[0], "messages": [
                {"role": "user", "content": f"client {seed} request {count}"}]}))

    async with trio.open_nursery() as nursery:
        for seed in range(clients):
            nursery.start_soon(client, seed)
    return ttfts


def run(policy: str, workload: Callable[[httpx.AsyncClient, str], Awaitable[list[float]]],
        args: argparse.Namespace) -> dict[str, float]:
    with ExitStack() as stack, tempfile.TemporaryDirectory() as folder:
        grid = Grid(stack, Path(folder), policy, args)

        async def drive() -> tuple[list[float], float]:
            limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
            async with httpx.AsyncClient(timeout=300, limits=limits) as http:
                started = time.perf_counter()
                ttfts = await workload(http, grid.url)
                return ttfts, time.perf_counter() - started

        ttfts, took = trio.run(drive)
        totals = grid.engine_totals()
    ttfts.sort()
    return {"mean": statistics.fmean(ttfts) * 1000, "p50": ttfts[len(ttfts) // 2] * 1000,
            "p99": ttfts[min(len(ttfts) - 1, int(len(ttfts) * 0.99))] * 1000, "done": len(ttfts),
            "loads": totals["loads"], "prefill": totals["prefill_tokens_computed"], "rps": len(ttfts) / took}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--slots", type=int, default=4, help="parallel slots of each engine (max_concurrency)")
    parser.add_argument("--seconds", type=float, default=12.0, help="duration of the one-model workload")
    parser.add_argument("--load-ms", type=float, default=500.0)
    parser.add_argument("--max-loaded", type=int, default=2, help="models each engine holds in memory at once")
    parser.add_argument("--prefill-us", type=float, default=200.0, help="per prompt word not in the slot's cache")
    parser.add_argument("--only", choices=("mixed", "multi-turn", "one"), help="run one workload")
    parser.add_argument("--policy", choices=POLICIES, help="run one policy")
    parser.add_argument("--runs", type=int, default=1, help="runs of each, a row each: the spread between runs")
    args = parser.parse_args()
    workloads = {
        "mixed models": lambda http, url: mixed_models(http, url, requests=240, clients=8),
        "multi-turn chats": lambda http, url: multi_turn(http, url, conversations=24, turns=8, clients=8),
        "one model": lambda http, url: one_model(http, url, args.seconds, clients=16),
    }
    print(f"{args.workers} workers x {args.slots} slots; engines: {args.max_loaded} model(s) in memory, "
          f"{args.load_ms:g} ms to load another, {args.prefill_us:g} µs per prompt word not cached\n")
    print("| workload | policy | TTFT mean (ms) | TTFT p50 (ms) | TTFT p99 (ms) | requests | model loads "
          "| prompt tokens computed | requests/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, workload in workloads.items():
        if args.only and not name.startswith(args.only):
            continue
        for policy in [args.policy] if args.policy else POLICIES:
            for _ in range(args.runs):
                r = run(policy, workload, args)
                print(f"| {name} | {policy} | {r['mean']:.0f} | {r['p50']:.0f} | {r['p99']:.0f} | {r['done']:.0f} "
                      f"| {r['loads']:.0f} | {r['prefill']:.0f} | {r['rps']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
