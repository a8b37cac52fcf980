"""What both ends of a hub↔worker link do alike: one writer that batches, a heartbeat, a reader
that dispatches frames and notices a silent peer, and a watch on a deaf one (it answers no ping).
The frames themselves: ``ghubai.protocol``.

Each end owns these as tasks of one nursery per link; the reader returning (the peer fell silent)
or raising (the socket closed), or the watch returning, ends the link, and its owner cancels the rest.
"""

from __future__ import annotations

import itertools
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from ghubai import protocol

SILENT_HEARTBEATS = 3  # a peer silent for this many heartbeats is gone
DEAF_HEARTBEATS = 6  # a peer that answers none of this end's pings for this many heartbeats reads nothing
DEAF_MIN_S = 5.0  # (and at least this long: a pong may wait behind what the peer writes)


class RequestText(str):
    """A request frame as queued for a link, with its request's ``id``: a writer drops it if the request
    ended before its turn came (on a link slower than the requests sent down it, the frames of requests
    whose clients had left or timed out were sent anyway, and held up every live one behind them)."""
    id: str


def request_text(request_id: str, frame: str) -> RequestText:
    queued = RequestText(frame)
    queued.id = request_id
    return queued


async def write_batched(frames: trio.MemoryReceiveChannel[str | bytes],
                        send: Callable[[str | bytes], Awaitable[Any]],
                        live: Callable[[str], bool] | None = None) -> None:
    """The one writer of a link: sends what is queued on ``frames`` (JSON text frames and binary
    chunks), everything already waiting in as few messages as order and size allow; a request frame
    (``RequestText``) only while ``live`` says its request is."""
    def dead(frame: str | bytes) -> bool:
        return live is not None and isinstance(frame, RequestText) and not live(frame.id)

    async for frame in frames:
        if dead(frame):
            continue
        batch = [frame]
        size = len(frame)
        while size < protocol.MAX_BATCH_BYTES:
            try:
                frame = frames.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel):
                break
            if not dead(frame):
                batch.append(frame)
                size += len(frame)
        for binary, group in itertools.groupby(batch, key=lambda item: isinstance(item, bytes)):
            await send(b"".join(group) if binary else "\n".join(group))  # type: ignore[arg-type]


def pong_due(last: float, heartbeat_s: float) -> bool:
    """Whether a ping is answered: once a quarter heartbeat at most, at hub and worker alike (a ping
    flood gets no pong flood: it made a worker queue thousands of pongs for a hub that did not read)."""
    return trio.current_time() - last >= heartbeat_s / 4


async def heartbeat(send: Callable[[protocol.Frame], None], inflight: Callable[[], int], every_s: float) -> None:
    """A ``ping`` every ``every_s``, carrying this side's count of running requests."""
    while True:
        await trio.sleep(every_s)
        send(protocol.Ping(inflight()))


async def deafness(last_pong: Callable[[], float], heartbeat_s: float, excused: Callable[[], bool]) -> float:
    """Returns the seconds since the peer last answered a ping (``last_pong``: trio time, the link's
    start before any) once it has answered none for ``DEAF_HEARTBEATS`` heartbeats: a peer that still
    sends (its pings keep it from silence) but reads nothing held the requests sent to it (a worker's)
    or its engine's slots (a hub's) for good. The clock starts again whenever ``excused`` says a
    pong may be held up on its way: this end's ping waits behind a large message it writes, or the
    peer's pong behind one still arriving, or behind the answers the peer is sending (a large request
    on a slow link got both ends cut)."""
    deaf_s = max(DEAF_HEARTBEATS * heartbeat_s, DEAF_MIN_S)
    owed_since = trio.current_time()
    while True:
        now = trio.current_time()
        if excused():
            owed_since = now
        late = now - max(last_pong(), owed_since)
        if late >= deaf_s:
            return now - last_pong()  # (what the log says: not the count since the last excuse)
        await trio.sleep(min(heartbeat_s, deaf_s - late))


async def read_frames(receive: Callable[[], Awaitable[str | bytes]], heartbeat_s: float,
                      handle: Callable[[protocol.Frame | protocol.Unknown], None],
                      refuse: Callable[[protocol.ProtocolError], None],
                      heard: Callable[[], float] | None = None) -> float:
    """Hand each frame of each message to ``handle`` and each refused part to ``refuse`` (both
    synchronous, so that frames of one message act in order). Returns the seconds of silence once
    the peer has said nothing for ``SILENT_HEARTBEATS`` heartbeats. ``heard``: when the peer last
    sent any bytes, where the socket tells: a large message still arriving (a big request on a slow
    link) keeps the peer alive, though no whole message has come for that long."""
    silence_s = SILENT_HEARTBEATS * heartbeat_s
    spoke = trio.current_time()  # when the peer last said anything: a message, or bytes of one
    while True:
        with trio.move_on_at(spoke + silence_s) as silence:
            message = await receive()
        if silence.cancelled_caught:
            if heard is not None and heard() > spoke:
                spoke = heard()
                continue
            return trio.current_time() - spoke
        spoke = trio.current_time()
        frames, problems = protocol.unpack(message)
        for problem in problems:
            refuse(problem)
        for frame in frames:
            handle(frame)
