"""The last minutes of a daemon in fixed steps, for the dashboards' live charts.

Prometheus keeps history for those who run it; the dashboard must work without it (one page, no
other service), so each daemon keeps a few minutes itself: per step, requests per second, generated
tokens per second and the median time to first token. A stream's tokens are known when it ends (the
engine reports them then), so they are spread evenly over the time it generated them: a long stream
shows in the steps it ran in, not as a spike at its end, and its time to first token in the step its
first token left in (a 4-minute stream's slow start showed 4 minutes late). A step keeps a uniform
sample of its first-token times (``SAMPLES``), so memory stays per step, not per request, and a late
one still finds its step.

Steps are counted on the monotonic clock, as every duration the daemon measures: a wall clock that
NTP steps back (a machine that booted with its clock in local time) would hide the chart for the
whole step, and then count the old steps again when the clock came back to them. Only a point's
label, ``t``, is wall time.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

STEP_S = 2.0
STEPS = 150  # five minutes
SAMPLES = 101  # first-token times kept per step: a busier step's median is that of a random sample


@dataclass
class _Step:
    requests: int = 0
    tokens: float = 0.0
    first_tokens: list[float] = field(default_factory=list)  # at most SAMPLES, each as likely as the others
    seen: int = 0  # first tokens in the step, sampled or not

    def first_token(self, seconds: float) -> None:
        self.seen += 1
        if len(self.first_tokens) < SAMPLES:
            self.first_tokens.append(seconds)
        elif (place := random.randrange(self.seen)) < SAMPLES:
            self.first_tokens[place] = seconds


class History:
    """Per-step figures of the last ``steps`` steps (requests, first-token times, tokens) for the
    dashboards' charts. Invariant: steps older than ``steps`` are forgotten, so memory is bounded."""
    def __init__(self, step_s: float = STEP_S, steps: int = STEPS, clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time) -> None:
        self.step_s = step_s
        self.steps = steps
        self._clock, self._wall = clock, wall
        self._first = self._index(clock())
        self._steps: dict[int, _Step] = {}

    def _index(self, at: float) -> int:
        return int(at // self.step_s)

    def request(self, first_token_s: float | None, tokens: int = 0, generating_s: float = 0.0) -> None:
        """A request that just ended: how long after it began its first byte left (None: it never
        did, or it is no stream's), and the tokens it generated over its last ``generating_s`` seconds
        (for a stream, from that first byte on)."""
        now = self._clock()
        index = self._index(now)
        self._steps.setdefault(index, _Step()).requests += 1
        start, oldest = now - max(0.0, generating_s), index - self.steps
        if first_token_s is not None and self._index(start) >= oldest:
            self._steps.setdefault(self._index(start), _Step()).first_token(first_token_s)
        for past in range(max(self._index(start), oldest), index + 1):
            begin, end = max(start, past * self.step_s), min(now, (past + 1) * self.step_s)
            share = tokens * (end - begin) / (now - start) if now > start else tokens
            self._steps.setdefault(past, _Step()).tokens += share
        for old in [old for old in self._steps if old < oldest]:
            del self._steps[old]

    def points(self) -> list[dict[str, Any]]:
        """One point per finished step of the window, oldest first (``t``: the step's end, in wall
        time)."""
        at = self._clock()
        now, wall_offset = self._index(at), self._wall() - at
        points = []
        for index in range(max(self._first, now - self.steps), now):
            step = self._steps.get(index) or _Step()
            ttft = statistics.median(step.first_tokens) if step.first_tokens else None
            points.append({"t": round((index + 1) * self.step_s + wall_offset, 3),
                           "requests_per_s": round(step.requests / self.step_s, 3),
                           "tokens_per_s": round(step.tokens / self.step_s, 1),
                           "ttft_ms": None if ttft is None else round(ttft * 1000, 1)})
        return points
