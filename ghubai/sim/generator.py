"""What the simulated engine generates and when: deterministic tokens on a timetable, embeddings,
the parallel-slot limit, and the counters that let tests see generation really stop."""

from __future__ import annotations

import hashlib
import random
import struct
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import trio

WORDS = (
    "the grid hums along as tokens flow from many quiet machines into one steady stream of "
    "words that keep arriving in order while the hub counts them and the worker listens"
).split()


@dataclass(frozen=True)
class SimOptions:
    models: tuple[str, ...] = ("sim",)
    ttft_ms: float = 20.0
    itl_ms: float = 10.0
    tokens: int = 32
    max_parallel: int = 64
    fail_rate: float = 0.0
    fail_after_tokens: int | None = None
    embed_dim: int = 16


@dataclass
class Stats:
    active: int = 0
    waiting: int = 0
    started: int = 0
    completed: int = 0
    cancelled: int = 0
    failed: int = 0
    tokens: int = 0  # generated so far, over all requests

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


class EngineFailure(Exception):
    """Raised inside a generation to end it the way a real engine fails mid-stream."""


def count_words(text: str) -> int:
    return max(1, len(text.split()))


def embedding(text: str, dim: int) -> list[float]:
    """A deterministic unit vector for ``text``."""
    seed = hashlib.blake2b(text.encode(), digest_size=8).digest()
    rng = random.Random(struct.unpack("<Q", seed)[0])
    vector = [rng.uniform(-1.0, 1.0) for _ in range(dim)]
    norm = sum(x * x for x in vector) ** 0.5 or 1.0
    return [x / norm for x in vector]


@dataclass
class Generation:
    """One reply: its tokens, why it stopped, and its counts."""
    prompt_tokens: int
    limit: int
    finish_reason: str
    tokens: list[str] = field(default_factory=list)

    @property
    def completion_tokens(self) -> int:
        return len(self.tokens)

    @property
    def text(self) -> str:
        return "".join(self.tokens)


class Simulator:
    def __init__(self, options: SimOptions) -> None:
        self.options = options
        self.stats = Stats()
        self.slots = trio.Semaphore(options.max_parallel)
        self._random = random.Random(0)

    def should_fail(self) -> bool:
        return self._random.random() < self.options.fail_rate

    def plan(self, prompt: str, requested_limit: int | None) -> Generation:
        """The request's own limit wins over ``--tokens``; running into it is finish ``length``."""
        if requested_limit is not None:
            return Generation(count_words(prompt), requested_limit, "length")
        return Generation(count_words(prompt), self.options.tokens, "stop")

    async def run(self, generation: Generation, prompt: str) -> AsyncIterator[str]:
        """Yield the tokens on the timetable, holding one parallel slot while generating.

        Counts the outcome: completed when the caller consumed every token, cancelled when it was
        cancelled or stopped early (the client left), failed on an injected failure."""
        self.stats.waiting += 1
        try:
            await self.slots.acquire()
        finally:
            self.stats.waiting -= 1
        self.stats.active += 1
        self.stats.started += 1
        outcome = "cancelled"
        try:
            start = trio.current_time()
            ttft, itl = self.options.ttft_ms / 1000, self.options.itl_ms / 1000
            offset = zlib.crc32(prompt.encode())
            fail_after = self.options.fail_after_tokens
            for index in range(generation.limit):
                if fail_after is not None and index >= fail_after:
                    outcome = "failed"
                    raise EngineFailure(f"simulated engine failure after {fail_after} tokens")
                deadline = start + ttft + index * itl
                if deadline > trio.current_time():
                    await trio.sleep_until(deadline)
                token = WORDS[(offset + index) % len(WORDS)]
                token = token if index == 0 else " " + token
                generation.tokens.append(token)
                self.stats.tokens += 1
                yield token
            if generation.limit == 0:
                await trio.sleep(ttft)
            outcome = "completed"
        finally:
            self.stats.active -= 1
            setattr(self.stats, outcome, getattr(self.stats, outcome) + 1)
            self.slots.release()
