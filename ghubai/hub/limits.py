"""Per-key request and token budgets (``limits.requests_per_minute``, ``limits.tokens_per_minute``).

Each key has a bucket per budget that refills continuously at its per-minute rate and holds at most
one minute's worth. A request needs one request-token and a non-negative token bucket; the tokens it
used (prompt + completion, from the engine's counts, or estimated when an answer ended without them:
``Exchange.spent``) are taken afterwards, so a long answer can drive the bucket below zero and the
next request waits until it refills. Over budget → 429 with Retry-After. Keys are known by their
digests only. A full bucket is as good as none: once there are many, the full ones are dropped (a
hub without api_keys counts whatever key each client presents, and keys removed by a reload went on).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import trio

from ghubai.config import HubLimits
from ghubai.errors import ApiError


@dataclass
class _Bucket:
    per_minute: int
    level: float = field(init=False)
    at: float = field(init=False)

    def __post_init__(self) -> None:
        self.level = float(self.per_minute)
        self.at = trio.current_time()

    def refill(self) -> float:
        now = trio.current_time()
        self.level = min(float(self.per_minute), self.level + (now - self.at) * self.per_minute / 60)
        self.at = now
        return self.level

    def seconds_until(self, level: float) -> int:
        return max(1, math.ceil((level - self.level) * 60 / self.per_minute))


PRUNE_AT = 1024  # buckets kept before the full ones are looked for (then twice what is left)


class RateLimits:
    """Each API key's request and token buckets. Invariant: a key's buckets exist only once it
    made a request, and never hold more than a minute's worth."""
    def __init__(self, limits: HubLimits) -> None:
        self.limits = limits
        self._requests: dict[bytes, _Bucket] = {}
        self._tokens: dict[bytes, _Bucket] = {}
        self._prune_at = PRUNE_AT

    def admit(self, key: bytes) -> None:
        """Take one request from ``key``'s budget (``b""``: the clients that present no key), or
        raise 429 saying when both budgets allow it."""
        if len(self._requests) + len(self._tokens) > self._prune_at:
            self._prune()
        refusal, wait, requests = "", 0, None
        whose = "this API key" if key else "clients that send no API key"
        if self.limits.tokens_per_minute:
            tokens = self._tokens.setdefault(key, _Bucket(self.limits.tokens_per_minute))
            if tokens.refill() < 0:
                refusal, wait = f"Token budget of {whose} exceeded", tokens.seconds_until(0)
        if self.limits.requests_per_minute:
            requests = self._requests.setdefault(key, _Bucket(self.limits.requests_per_minute))
            if requests.refill() < 1:
                refusal = refusal or f"Request rate of {whose} exceeded"
                wait = max(wait, requests.seconds_until(1))
        if refusal:
            raise ApiError(429, refusal, code="rate_limit_exceeded", retry_after=wait)
        if requests is not None:
            requests.level -= 1

    def refund(self, key: bytes) -> None:
        """A request the grid could not take (503, or 429 for a full queue) costs its client nothing."""
        if key in self._requests:
            self._requests[key].level += 1

    def spend(self, key: bytes, usage: dict[str, int] | None) -> None:
        if self.limits.tokens_per_minute and usage:
            bucket = self._tokens.setdefault(key, _Bucket(self.limits.tokens_per_minute))
            bucket.refill()
            bucket.level -= usage.get("prompt_tokens", 0) + usage.get("completion_tokens", 0)

    def _prune(self) -> None:
        for buckets in (self._requests, self._tokens):
            for key in [key for key, bucket in buckets.items() if bucket.refill() >= bucket.per_minute]:
                del buckets[key]
        self._prune_at = max(PRUNE_AT, 2 * (len(self._requests) + len(self._tokens)))
