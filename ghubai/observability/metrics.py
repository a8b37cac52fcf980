"""Prometheus metrics, one private registry per role instance (``ghubai up`` runs several roles in
one process), in the exposition format of the prometheus_client library."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram,
                               disable_created_metrics, generate_latest)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

disable_created_metrics()  # the *_created series only double what operators scrape

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
CONTENT_TYPE = CONTENT_TYPE_LATEST


__all__ = ["CONTENT_TYPE", "CounterMetricFamily", "GaugeMetricFamily", "Metric", "Metrics"]


class _Live(Collector):
    def __init__(self, collect: Callable[[], Iterable[Metric]]) -> None:
        self._collect = collect

    def collect(self) -> Iterable[Metric]:
        return self._collect()


# Connections each role turned away past its connection cap (``http11.server.turn_away``), before
# any request was read: the count a role's registry exports, by the role's name.
turned_away: dict[str, int] = {}


class Metrics:
    """What every role that answers requests counts, in a registry of its own (``ghubai up`` runs
    several roles in one process). Invariant: the figures only grow, except the gauges; label values
    come from what the grid serves (models, workers, hubs), never from what a client names alone.
    ``duration``, ``inflight`` and ``first_token`` are the role's own series, bound once (a
    ``labels()`` call looks its child up under a lock: 1 % of the hub's CPU, four a request)."""

    def __init__(self, role: str, serves: Callable[[str], bool]) -> None:
        self.role = role
        self.serves = serves  # whether some worker serves a model: only those become label values
        self.registry = CollectorRegistry()
        self.requests = Counter("ghubai_requests", "Requests answered, by model and HTTP status",
                                ["role", "model", "code"], registry=self.registry)
        self._counted: dict[tuple[str, int], Counter] = {}  # requests' children, by model label and code
        self.duration = Histogram("ghubai_request_duration_seconds", "Time from request to the end of the answer",
                                  ["role"], buckets=LATENCY_BUCKETS, registry=self.registry).labels(role)
        self.inflight = Gauge("ghubai_inflight_requests", "Requests being answered now", ["role"],
                              registry=self.registry).labels(role)
        self.watch(lambda: [CounterMetricFamily(
            "ghubai_connections_turned_away", "Connections answered 503 at once, past the connection cap",
            value=turned_away.get(role, 0))])
        # (bound at once, each series is 0 from the start: an alert on absent() or rate() saw "no data" until
        # a first request)
        self.first_token = Histogram("ghubai_time_to_first_token_seconds", "Time from request to the first byte "
                                     "of a streamed answer", ["role"], buckets=LATENCY_BUCKETS,
                                     registry=self.registry).labels(role)

    def watch(self, collect: Callable[[], Iterable[Metric]]) -> None:
        """Figures read from live state at each scrape (queue depths, workers, token totals)."""
        self.registry.register(_Live(collect))

    def gauge(self, name: str, help_text: str, labels: list[str]) -> Gauge:
        return Gauge(name, help_text, labels, registry=self.registry)

    def observe(self, model: str | None, code: int, seconds: float, served: bool = False) -> None:
        """A request ended. Its model is a label only when some worker serves it, or ``served`` it (and
        has left since: a rolling restart's last answers counted as ``other``), so that clients cannot
        grow the series without bound; any other name counts as ``other``."""
        label = "" if not model else model if served or self.serves(model) else "other"
        if (counted := self._counted.get((label, code))) is None:
            counted = self._counted[(label, code)] = self.requests.labels(self.role, label, str(code))
        counted.inc()
        self.duration.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
