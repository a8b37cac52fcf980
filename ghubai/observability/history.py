"""The last minutes of a daemon in fixed steps, for the dashboards' live charts.

Prometheus keeps history for those who run it; the dashboard must work without it (one page, no
other service), so each daemon keeps a few minutes itself: per step, requests per second, generated
tokens per second and the median time to first token. A few hundred numbers, rolled in one task.
"""

from __future__ import annotations

import statistics
import time
from collections import deque
from typing import Any

import trio

STEP_S = 2.0
STEPS = 150  # five minutes


class History:
    def __init__(self, step_s: float = STEP_S, steps: int = STEPS) -> None:
        self.step_s = step_s
        self.points: deque[dict[str, Any]] = deque(maxlen=steps)
        self._requests = 0
        self._tokens = 0
        self._first_tokens: list[float] = []

    def request(self, first_token_s: float | None, tokens: int = 0) -> None:
        """One answered request: when its first byte left (None: it never did), and the tokens it generated."""
        self._requests += 1
        self._tokens += tokens
        if first_token_s is not None:
            self._first_tokens.append(first_token_s)

    def roll(self, now: float) -> None:
        """Close the current step at wall-clock time ``now``."""
        ttft = statistics.median(self._first_tokens) if self._first_tokens else None
        self.points.append({"t": round(now, 3), "requests_per_s": round(self._requests / self.step_s, 3),
                            "tokens_per_s": round(self._tokens / self.step_s, 1),
                            "ttft_ms": None if ttft is None else round(ttft * 1000, 1)})
        self._requests, self._tokens, self._first_tokens = 0, 0, []

    async def run(self) -> None:
        while True:
            await trio.sleep(self.step_s)
            self.roll(time.time())
