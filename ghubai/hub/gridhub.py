"""The hub's end of a worker link: WebSocket ``/gridhub``.

One handler per worker owns a reader (this task), a writer and a heartbeat (``ghubai.link``). A
worker silent for three heartbeats is dropped, and one that answers no ping for six (it reads
nothing); when the link ends for any reason, every request on it gets a retryable error, which its
exchange turns into a retry (before the first byte) or a final error event (after).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable
from typing import Any

import trio
from quart import Response, websocket

from ghubai import link, protocol
from ghubai.auth import Secrets
from ghubai.hub.pool import Pool, RemoteWorker
from ghubai.observability.logs import whence
from ghubai.web import WS_CLOSED_BY

log = logging.getLogger("ghubai.hub")

CLOSE_S = 1.0  # for a link's close frame to go out as the hub stops
CLOSED = "ghubai.closed"  # the link's ASGI scope: hypercorn's disconnect event (``noting_close``)


def noting_close(scope: dict[str, Any], receive: Callable[[], Awaitable[dict[str, Any]]],
                 ) -> Callable[[], Awaitable[dict[str, Any]]]:
    """``receive`` for a link, keeping in its scope how the worker's end went (quart drops the event,
    and the hub's log said a worker "left" whether it stopped or its network failed)."""
    async def receiving() -> dict[str, Any]:
        event = await receive()
        if event["type"] == "websocket.disconnect":
            scope[CLOSED] = event
        return event
    return receiving


def ending(closed: Any) -> str:
    """How a link ended, from its disconnect (``web``: its close's code and reason, and who began
    it); "" when the hub ended it itself, and said why."""
    if closed is None or closed.get("code") == 1000 and WS_CLOSED_BY not in closed:  # (1000: the hub's own close)
        return ""
    code, reason = closed.get("code"), closed.get("reason") or ""
    said = f" ({code}{': ' + reason if reason else ''})" if code != 1000 or reason else ""
    if closed.get(WS_CLOSED_BY) == "server":
        return "it sent a message over the hub's limit" + said if code == 1009 else "the hub closed it" + said
    if closed.get(WS_CLOSED_BY) == "peer":
        return "it closed its link" + said
    return "its connection broke without a close"


async def serve_worker(pool: Pool, tokens: Secrets, hub_id: str, heartbeat_s: float, hello_timeout_s: float,
                       max_concurrency: int) -> Response | None:
    # (behind nginx, its address for every worker: what the front says of the worker too)
    peer = whence(websocket.headers.get("Remote-Addr", "?"), websocket.headers.get("X-Forwarded-For"))
    if origin := websocket.headers.get("Origin"):  # a browser's: no CORS guards a WebSocket, and a worker sends none
        log.warning("refused a worker link from a web page of %s (from %s)", origin, peer)
        return Response("workers do not link from web pages", 403, content_type="text/plain")
    token = tokens.identify(websocket.headers.get("Authorization"))
    if token is None:
        log.warning("refused a worker from %s: missing or wrong provider token", peer)
        return Response("missing or wrong provider token", 401, content_type="text/plain")
    if tokens.open:  # what it sent: a reload that lists that token keeps its link (it cut every one)
        token = tokens.presented(websocket.headers.get("Authorization"))
    await websocket.accept()
    hello = None
    with trio.move_on_after(hello_timeout_s):
        hello = await _hello(peer)
    if hello is None:
        return None
    if not tokens.holds(token):  # revoked by a reload during the handshake
        log.warning("refused worker %s from %s: its provider token was revoked", hello.name, peer)
        return None
    if hello.max_concurrency > max_concurrency:
        log.warning("worker %s claims max_concurrency %d: this hub gives it %d (limits.max_worker_concurrency)",
                    hello.name, hello.max_concurrency, max_concurrency)
    send, receive = trio.open_memory_channel[str | bytes](math.inf)
    worker = RemoteWorker(id=hello.worker_id, name=hello.name, models=frozenset(hello.models),
                          max_concurrency=min(hello.max_concurrency, max_concurrency), slots=hello.max_concurrency,
                          engine=hello.engine,
                          out=send, last_seen=trio.current_time(), pong_heard=trio.current_time(), token=token,
                          problem=hello.problem,
                          weight=hello.weight, version=hello.version, peer=peer,
                          apis=None if hello.apis is None else frozenset(hello.apis),
                          loaded=None if hello.loaded is None else frozenset(hello.loaded), facts=hello.facts or {})
    lost = f"lost the link to worker {worker.name}"
    try:
        async with trio.open_nursery() as nursery:
            worker.link_scope = nursery.cancel_scope
            if stale := pool.add(worker):  # the same worker, linked again: the old link is dead
                pool.cut(stale, f"lost the link to worker {stale.name}: it linked again")
            await websocket.send(protocol.encode(protocol.Welcome(hub_id, heartbeat_s)))
            nursery.start_soon(link.write_batched, receive, websocket.send, worker.pending.__contains__)
            nursery.start_soon(link.heartbeat, worker.send, lambda: worker.inflight, heartbeat_s)
            nursery.start_soon(_close_when_stopping, pool, nursery.cancel_scope)
            nursery.start_soon(_cut_when_deaf, pool, worker, heartbeat_s, lost)
            silent_s = await link.read_frames(websocket.receive, heartbeat_s, lambda frame: _handle(pool, worker, frame, heartbeat_s),
                                              lambda problem: _refuse(pool, worker, problem))
            log.warning("worker %s silent for %.1f s: dropping its link", worker.name, silent_s)
            pool.cut(worker, lost)
    finally:
        why = ending(websocket.scope.get(CLOSED))
        pool.drop(worker, lost, f"{why}, after draining" if why and worker.draining else why)
        send.close()
    return None


async def _cut_when_deaf(pool: Pool, worker: RemoteWorker, heartbeat_s: float, lost: str) -> None:
    """(A worker that sent pings but read nothing kept its link: every request the hub sent it waited
    for ``first_token_s``, then a 504, where another worker had free slots.)"""
    def excused() -> bool:  # its own frames wait to be written, or the worker is sending answers
        return worker.out.statistics().current_buffer_used > 0 or \
            trio.current_time() - worker.chunk_heard < heartbeat_s

    late_s = await link.deafness(lambda: worker.pong_heard, heartbeat_s, excused)
    log.warning("worker %s answered no ping for %.1f s (it reads nothing): dropping its link", worker.name, late_s)
    pool.cut(worker, lost)


async def _close_when_stopping(pool: Pool, link_scope: trio.CancelScope) -> None:
    await pool.closing.wait()
    with trio.move_on_after(CLOSE_S):
        await websocket.close(protocol.CLOSE_GOING_AWAY, "the hub is stopping")
    link_scope.cancel()


async def _hello(peer: str) -> protocol.Hello | None:
    """The worker's hello, or None once the link was closed with the reason it was refused."""
    try:
        frame = protocol.decode(await websocket.receive())
        if not isinstance(frame, protocol.Hello):
            raise protocol.ProtocolError(f"expected hello, got {protocol.type_of(frame)}")
    except protocol.VersionMismatch as error:
        log.warning("refused a worker from %s: %s", peer, error)
        await websocket.close(protocol.CLOSE_PROTOCOL_MISMATCH, str(error)[:120])
        return None
    except protocol.ProtocolError as error:
        log.warning("refused a worker from %s: %s", peer, error)
        await websocket.close(protocol.CLOSE_BAD_HELLO, str(error)[:120])
        return None
    return frame


def _refuse(pool: Pool, worker: RemoteWorker, problem: protocol.ProtocolError) -> None:
    log.warning("bad frame from worker %s: %s", worker.name, problem)
    if problem.frame_type in ("chunk", "message"):  # frames lost, whose it cannot tell: none may end as if whole
        pool.cut(worker, f"the worker sent a malformed message ({problem})")
    elif problem.request_id and problem.frame_type in ("end", "error"):  # its request would wait for nothing
        pool.fail(worker, problem.request_id, 502, f"the worker sent a malformed {problem.frame_type} frame",
                  retryable=True)


def _handle(pool: Pool, worker: RemoteWorker, frame: protocol.Frame | protocol.Unknown, heartbeat_s: float) -> None:
    worker.last_seen = trio.current_time()
    match frame:
        case protocol.Chunk():
            worker.chunk_heard = worker.last_seen
            pool.deliver(worker, frame)
        case protocol.End() | protocol.Error():
            pool.deliver(worker, frame)
        case protocol.Pong(inflight):
            worker.pong_heard = worker.last_seen
            pool.report(worker, inflight)
        case protocol.Load(inflight):
            pool.report(worker, inflight)
        case protocol.Ping(inflight):
            pool.report(worker, inflight)
            if link.pong_due(worker.last_pong, heartbeat_s):
                worker.last_pong = trio.current_time()
                worker.send(protocol.Pong(worker.inflight))
        case protocol.Models():
            pool.set_offer(worker, frame)
        case protocol.Draining():
            pool.set_draining(worker)
        case _:
            log.debug("ignoring a %s frame from worker %s", protocol.type_of(frame), worker.name)
