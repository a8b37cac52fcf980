"""The proxy's hubs: who they are, whether they are up, which models they host, and a pool of
keep-alive HTTP/1.1 connections to each (h11 over trio streams)."""

from __future__ import annotations

import itertools
import logging
import select
import ssl
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import h11
import trio

from ghubai.observability.dashboard import hub_view

log = logging.getLogger("ghubai.proxy")

MAX_IDLE_PER_HUB = 64
# Reuse an idle connection only while the hub surely still keeps it (hypercorn closes after 5 s).
IDLE_REUSE_S = 4.0
RECEIVE_SIZE = 65536


class Upstream:
    """One connection to a hub, spoken with h11."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.h11 = h11.Connection(h11.CLIENT)
        self.idle_since = 0.0
        self.reused = False  # came from the pool: a failure may be the hub's keep-alive close, not a fault

    @property
    def socket(self) -> trio.socket.SocketType | None:
        stream = getattr(self.stream, "transport_stream", self.stream)
        return getattr(stream, "socket", None)

    async def send(self, *events: h11.Event) -> None:
        await self.stream.send_all(b"".join(self.h11.send(event) or b"" for event in events))

    async def next_event(self) -> h11.Event:
        while True:
            event = self.h11.next_event()
            if event is not h11.NEED_DATA:
                return event  # type: ignore[return-value]
            self.h11.receive_data(await self.stream.receive_some(RECEIVE_SIZE))

    def buffered_events(self) -> list[h11.Event]:
        """The events h11 can parse from what has already been received, without waiting;
        h11.RemoteProtocolError if that is malformed."""
        events = []
        while self.h11.their_state is not h11.DONE:
            event = self.h11.next_event()
            if event is h11.NEED_DATA or event is h11.PAUSED:
                break
            events.append(event)
        return events  # type: ignore[return-value]

    def stale(self) -> bool:
        """Idle too long, or the hub already closed it (readable with nothing asked = EOF)."""
        if trio.current_time() - self.idle_since > IDLE_REUSE_S:
            return True
        if self.socket is None:
            return True
        poller = select.poll()  # not select.select: it fails on descriptors above 1023
        poller.register(self.socket.fileno(), select.POLLIN)
        return bool(poller.poll(0))

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            await self.stream.aclose()


@dataclass(eq=False)
class Hub:
    name: str
    address: str
    up: bool = False
    models: frozenset[str] = frozenset()
    reason: str = "not checked yet"
    idle: list[Upstream] = field(default_factory=list)
    workers: list[dict[str, Any]] = field(default_factory=list)  # as its last health check listed them
    queue: dict[str, int] = field(default_factory=dict)  # requests waiting there, by model
    heartbeat_s: float = 0.0

    @property
    def host_port(self) -> tuple[str, int]:
        parts = urlsplit(self.address)
        return parts.hostname or "localhost", parts.port or (443 if parts.scheme == "https" else 80)

    @property
    def tls(self) -> bool:
        return self.address.startswith("https://")

    def describe(self) -> dict[str, Any]:
        return hub_view(self.name, self.address, self.up, self.reason, self.queue, self.workers, self.heartbeat_s)


class HubSet:
    def __init__(self, connect_timeout_s: float, ssl_context: ssl.SSLContext | None) -> None:
        self.hubs: dict[str, Hub] = {}
        self.connect_timeout_s = connect_timeout_s
        self.ssl_context = ssl_context
        self._turn = itertools.count()
        self.check_now = trio.Event()

    def update(self, entries: list[tuple[str, str]]) -> None:
        """Take a new list of (name, address); known hubs keep their state, new ones get checked at once."""
        wanted = {address.rstrip("/"): name for name, address in entries}
        for address in list(self.hubs):
            if address not in wanted:
                hub = self.hubs.pop(address)
                log.info("hub %s (%s) removed", hub.name, address)
                self._drop_idle(hub)
        for address, name in wanted.items():
            if address not in self.hubs:
                self.hubs[address] = Hub(name, address)
                log.info("hub %s (%s) added", name, address)
                self.check_now.set()
            else:
                self.hubs[address].name = name

    def healthy(self) -> list[Hub]:
        return [hub for hub in self.hubs.values() if hub.up]

    def candidates(self, model: str | None, exclude: set[str]) -> list[Hub]:
        """Healthy hubs that host ``model``; when none advertises it, every healthy hub."""
        healthy = [hub for hub in self.healthy() if hub.address not in exclude]
        hosting = [hub for hub in healthy if model in hub.models] if model else []
        return hosting or healthy

    def pick(self, model: str | None, exclude: set[str]) -> Hub | None:
        candidates = self.candidates(model, exclude)
        return candidates[next(self._turn) % len(candidates)] if candidates else None

    def models(self) -> list[str]:
        return sorted({model for hub in self.healthy() for model in hub.models})

    def set_health(self, hub: Hub, up: bool, reason: str = "", state: dict[str, Any] | None = None) -> None:
        """``state``: the hub's ``/api/registry`` answer, when the check read one."""
        if state is not None:
            hub.workers, hub.queue = list(state["workers"]), {str(k): int(v) for k, v in state.get("queue", {}).items()}
            hub.heartbeat_s = float(state.get("heartbeat_s", 0))
            hub.models = frozenset(str(model) for worker in hub.workers if not worker.get("draining")
                                   for model in worker["models"])
        elif not up:
            hub.workers, hub.queue = [], {}  # unreachable: what it had is unknown now
        if up != hub.up:
            if up:
                log.info("hub %s (%s) is up: %s", hub.name, hub.address, ", ".join(sorted(hub.models)) or "no models")
            else:
                log.warning("hub %s (%s) is down: %s", hub.name, hub.address, reason)
        hub.up, hub.reason = up, reason
        if not up:
            self._drop_idle(hub)

    # -- connections -----------------------------------------------------------------------------

    async def connection(self, hub: Hub) -> Upstream:
        while hub.idle:
            upstream = hub.idle.pop()
            if not upstream.stale():
                upstream.reused = True
                return upstream
            await upstream.aclose()
        host, port = hub.host_port
        with trio.fail_after(self.connect_timeout_s):
            stream: trio.abc.Stream = await trio.open_tcp_stream(host, port)
            if hub.tls:
                stream = trio.SSLStream(stream, self.ssl_context or ssl.create_default_context(),
                                        server_hostname=host, https_compatible=True)
                await stream.do_handshake()
        return Upstream(stream)

    async def release(self, hub: Hub, upstream: Upstream) -> None:
        """Keep the connection for the next request if both sides finished cleanly, else close it."""
        conn = upstream.h11
        if (conn.our_state is h11.DONE and conn.their_state is h11.DONE and not conn.trailing_data[0] and hub.up
                and self.hubs.get(hub.address) is hub and len(hub.idle) < MAX_IDLE_PER_HUB):
            conn.start_next_cycle()
            upstream.idle_since = trio.current_time()
            hub.idle.append(upstream)
        else:
            await upstream.aclose()

    def _drop_idle(self, hub: Hub) -> None:
        """Close idle connections now (synchronously, on their sockets: nothing is in flight on them)."""
        for upstream in hub.idle:
            if upstream.socket is not None:
                upstream.socket.close()
        hub.idle.clear()
