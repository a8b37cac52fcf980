"""The hub's end of a worker link: WebSocket ``/gridhub``.

One handler per worker owns a reader (this task), a writer and a heartbeat. A worker silent for three
heartbeats is dropped; when the link ends for any reason, every request on it gets a retryable error,
which its exchange turns into a retry (before the first byte) or a final error event (after).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import trio
from quart import Response, websocket

from ghubai import protocol
from ghubai.auth import Secrets
from ghubai.hub.pool import Pool, RemoteWorker

log = logging.getLogger("ghubai.hub")

async def serve_worker(pool: Pool, tokens: Secrets, hub_id: str, heartbeat_s: float,
                       hello_timeout_s: float) -> Response | None:
    peer = websocket.headers.get("Remote-Addr", "?")
    token = tokens.identify(websocket.headers.get("Authorization"))
    if token is None:
        log.warning("refused a worker from %s: missing or wrong provider token", peer)
        return Response("missing or wrong provider token", 401, content_type="text/plain")
    await websocket.accept()
    hello = None
    with trio.move_on_after(hello_timeout_s):
        hello = await _hello(peer)
    if hello is None:
        return None
    if not tokens.holds(token):  # revoked by a reload during the handshake
        log.warning("refused worker %s from %s: its provider token was revoked", hello["name"], peer)
        return None
    send, receive = trio.open_memory_channel[str](math.inf)
    worker = RemoteWorker(id=hello["worker_id"], name=hello["name"], models=frozenset(hello["models"]),
                          max_concurrency=hello["max_concurrency"], engine=str(hello["engine"]),
                          out=send, last_seen=trio.current_time(), token=token)
    try:
        async with trio.open_nursery() as nursery:
            worker.link_scope = nursery.cancel_scope
            if stale := pool.add(worker):
                stale.link_scope.cancel()
            await websocket.send(protocol.welcome(hub_id, heartbeat_s))
            nursery.start_soon(protocol.write_batched, receive, websocket.send)
            nursery.start_soon(_heartbeat, worker, heartbeat_s)
            await _read(pool, worker, heartbeat_s)
            # Before anything that may wait: hypercorn's socket writes cannot be cancelled, so a
            # writer stuck on a peer that stopped reading must not hold up these requests.
            pool.drop(worker, f"lost the link to worker {worker.name}")
            nursery.cancel_scope.cancel()
    finally:
        pool.drop(worker, f"lost the link to worker {worker.name}")
        send.close()
    return None


async def _hello(peer: str) -> dict[str, Any] | None:
    try:
        frame = protocol.decode(await websocket.receive())
        if frame["type"] != "hello":
            raise protocol.ProtocolError(f"expected hello, got {frame['type']}")
    except protocol.ProtocolError as error:
        log.warning("refused a worker from %s: %s", peer, error)
        await websocket.close(protocol.CLOSE_BAD_HELLO, str(error)[:120])
        return None
    if frame["protocol"] != protocol.PROTOCOL:
        reason = f"protocol {frame['protocol']} not supported; this hub speaks {protocol.PROTOCOL}"
        log.warning("refused worker %s from %s: %s", frame["name"], peer, reason)
        await websocket.close(protocol.CLOSE_PROTOCOL_MISMATCH, reason)
        return None
    well_formed = (isinstance(frame["worker_id"], str) and isinstance(frame["name"], str)
                   and isinstance(frame["models"], list) and all(isinstance(m, str) for m in frame["models"])
                   and isinstance(frame["max_concurrency"], int) and frame["max_concurrency"] >= 1)
    if not well_formed:
        log.warning("refused a worker from %s: malformed hello", peer)
        await websocket.close(protocol.CLOSE_BAD_HELLO, "malformed hello")
        return None
    return frame


async def _heartbeat(worker: RemoteWorker, heartbeat_s: float) -> None:
    while True:
        await trio.sleep(heartbeat_s)
        worker.send(protocol.ping(worker.inflight))


async def _read(pool: Pool, worker: RemoteWorker, heartbeat_s: float) -> None:
    while True:
        with trio.move_on_after(3 * heartbeat_s) as silence:
            message = await websocket.receive()
        if silence.cancelled_caught:
            log.warning("worker %s silent for %.1f s: dropping its link", worker.name, 3 * heartbeat_s)
            return
        worker.last_seen = trio.current_time()
        frames, problems = protocol.unpack(message)
        for problem in problems:
            log.warning("bad frame from worker %s: %s", worker.name, problem)
        for frame in frames:
            kind = frame["type"]
            if kind in ("chunk", "end", "error"):
                pool.deliver(worker, frame)
            elif kind == "models":
                pool.set_models(worker, frame["models"])
            elif kind == "draining":
                pool.set_draining(worker)
            elif kind in ("load", "ping", "pong"):
                pool.report(worker, frame["inflight"])
                if kind == "ping":
                    worker.send(protocol.pong(worker.inflight))
            else:
                log.debug("ignoring %s frame from worker %s", kind, worker.name)
